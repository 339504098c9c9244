"""`dicomnode models info MODEL --size N`: parameters and multiply-accumulates of a model's parts.

Counts run on PyTorch's meta device (shapes only, no arithmetic), so even the paper-size
HQG-Net is measured instantly and without memory. MACs are FlopCounterMode's FLOPs / 2 (it
counts a multiply-accumulate as two FLOPs); papers' "FLOPs" tables usually report MACs.
A model kind appears here when its :class:`models.registry.ModelSpec` names its ``parts``.
"""

from __future__ import annotations

import argparse

from models.registry import MODELS, load_symbol

__all__ = ["measurable", "measure", "register"]


def measurable() -> list[str]:
    """Model kinds (and aliases) whose parts can be counted."""
    return sorted(name for name, spec in MODELS.items() if spec.parts)


def measure(model: str, size: int, channels: int | None = None) -> list[tuple[str, float, float, bool]]:
    """[(part, M params, G MACs, counted in total)] for ``model`` at ``size`` x ``size``."""
    import torch  # noqa: PLC0415 - only this command needs torch
    from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

    spec = MODELS.get(model)
    if spec is None or spec.parts is None:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(measurable())}")
    builder = load_symbol(spec.parts)
    with torch.device("meta"):
        rows = []
        for name, module, run, inference in builder(channels or spec.default_channels):
            params = sum(p.numel() for p in module.parameters())
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                run(module, size)
            rows.append((name, params / 1e6, counter.get_total_flops() / 2e9, inference))
    return rows


def _info(args: argparse.Namespace) -> int:
    if args.size < 32 or args.size % 32:
        raise SystemExit(f"--size must be a positive multiple of 32, got {args.size}")
    try:
        rows = measure(args.model, args.size, args.channels)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    spec = MODELS[args.model]
    print(f"{args.model}: {args.channels or spec.default_channels} channel(s), {args.size}x{args.size} input")
    for name, params, macs, inference in rows:
        note = "" if inference else "  (training only, not in total)"
        print(f"{name:<14} {params:9.2f} M params {macs:9.2f} G MACs{note}")
    total_p = sum(r[1] for r in rows if r[3])
    total_m = sum(r[2] for r in rows if r[3])
    names = " + ".join(r[0] for r in rows if r[3])
    print(f"{'total':<14} {total_p:9.2f} M params {total_m:9.2f} G MACs  ({names})")
    if spec.published and args.size == 384:
        p, m, src = spec.published
        print(f"{'published':<14} {p:9.2f} M params {m:9.2f} G MACs  ({src})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="information about the enhancement models")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    info = sub.add_parser("info", help="parameters and MACs per part of a model (no weights needed)")
    info.add_argument("model", choices=measurable(), help="model architecture")
    info.add_argument("--size", type=int, default=384, help="square input size in pixels (default 384, the paper's)")
    info.add_argument("--channels", type=int, choices=(1, 3), default=None, help="input channels (default: the model's)")
    info.set_defaults(func=_info)
    from dicomnode.cli.ops import register_models_list  # noqa: PLC0415 - the configured models: `models list`

    register_models_list(sub)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
