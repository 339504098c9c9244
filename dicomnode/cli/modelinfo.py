"""`dicomnode models info MODEL --size N`: parameters and multiply-accumulates of a model's parts.

Counts run on PyTorch's meta device (shapes only, no arithmetic), so even the paper-size
HQG-Net is measured instantly and without memory. MACs are FlopCounterMode's FLOPs / 2 (it
counts a multiply-accumulate as two FLOPs); papers' "FLOPs" tables usually report MACs.
Add a model by adding a parts builder to ``MODEL_PARTS``.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Part", "MODEL_PARTS", "measure", "register"]


@dataclass
class Part:
    """One part of a model: its module and how to run it once on a (1, C, size, size) input."""

    name: str
    module: object  # torch.nn.Module (kept untyped so this module imports without torch)
    run: Callable[[object, int], object]  # (module, size) -> output, called on the meta device
    inference: bool = True  # counted in the total (False: training-only, e.g. a discriminator)


def _hqgnet_parts(config: str) -> Callable[[int], list[Part]]:
    def build(channels: int) -> list[Part]:
        import torch

        from models.hqgnet import build_discriminator, build_hqgnet, config_by_name

        cfg = config_by_name(config, channels)
        net = build_hqgnet(cfg).eval()
        disc = build_discriminator(cfg)

        def image(size: int):
            return torch.empty(1, channels, size, size)

        return [
            Part("G", net.g, lambda m, s: m(image(s))),
            Part("E_gen", net.gen, lambda m, s: m(image(s), torch.empty(1, cfg.guidance_dim))),
            Part("discriminator", disc, lambda m, s: m(image(s)), inference=False),
        ]

    return build


# name -> (default channels, parts builder taking channels). Baselines can be added here.
MODEL_PARTS: dict[str, tuple[int, Callable[[int], list[Part]]]] = {
    "hqgnet": (3, _hqgnet_parts("paper")),
    "hqgnet-lite": (1, _hqgnet_parts("lite")),
    "stillgan": (3, lambda c: [Part(*p) for p in __import__("models.stillgan", fromlist=["_"]).model_parts(c)]),
    "lamegan": (3, lambda c: [Part(*p) for p in __import__("models.lamegan", fromlist=["_"]).model_parts(c)]),
}

# Published figures to print beside ours: name -> (M params, G MACs, source).
PUBLISHED: dict[str, tuple[float, float, str]] = {
    "hqgnet": (66.42, 87.33, "HQG-Net paper, Table IV, 384x384"),
    "stillgan": (58.38, 94.73, "HQG-Net paper, Table IV, 384x384"),
}


def measure(model: str, size: int, channels: int | None = None) -> list[tuple[str, float, float, bool]]:
    """[(part, M params, G MACs, counted in total)] for ``model`` at ``size`` x ``size``."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    try:
        default_channels, builder = MODEL_PARTS[model]
    except KeyError:
        raise ValueError(f"unknown model {model!r}; known: {', '.join(MODEL_PARTS)}") from None
    with torch.device("meta"):
        parts = builder(channels or default_channels)
        rows = []
        for part in parts:
            params = sum(p.numel() for p in part.module.parameters())  # type: ignore[attr-defined]
            counter = FlopCounterMode(display=False)
            with counter, torch.no_grad():
                part.run(part.module, size)
            rows.append((part.name, params / 1e6, counter.get_total_flops() / 2e9, part.inference))
    return rows


def _info(args: argparse.Namespace) -> int:
    if args.size < 32 or args.size % 32:
        raise SystemExit(f"--size must be a positive multiple of 32, got {args.size}")
    try:
        rows = measure(args.model, args.size, args.channels)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None
    channels = args.channels or MODEL_PARTS[args.model][0]
    print(f"{args.model}: {channels} channel(s), {args.size}x{args.size} input")
    for name, params, macs, inference in rows:
        note = "" if inference else "  (training only, not in total)"
        print(f"{name:<14} {params:9.2f} M params {macs:9.2f} G MACs{note}")
    total_p = sum(r[1] for r in rows if r[3])
    total_m = sum(r[2] for r in rows if r[3])
    names = " + ".join(r[0] for r in rows if r[3])
    print(f"{'total':<14} {total_p:9.2f} M params {total_m:9.2f} G MACs  ({names})")
    if args.model in PUBLISHED and args.size == 384:
        p, m, src = PUBLISHED[args.model]
        print(f"{'published':<14} {p:9.2f} M params {m:9.2f} G MACs  ({src})")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("models", help="information about the enhancement models")
    sub = parser.add_subparsers(dest="models_command", metavar="ACTION")
    info = sub.add_parser("info", help="parameters and MACs per part of a model (no weights needed)")
    info.add_argument("model", choices=sorted(MODEL_PARTS), help="model architecture")
    info.add_argument("--size", type=int, default=384, help="square input size in pixels (default 384, the paper's)")
    info.add_argument("--channels", type=int, choices=(1, 3), default=None, help="input channels (default: 3 for hqgnet, 1 for hqgnet-lite)")
    info.set_defaults(func=_info)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
