"""`dicomnode guidance build | show`: HQ guidance caches for guided models (HQG-Net)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from dicomnode import guidance as gd
from dicomnode.cli.common import config_or_exit
from models.degrade import degrade_many
from models.registry import ModelLoadError, build_model, load_checkpoint


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("guidance", help="build or show HQ guidance caches (HQG-Net)")
    sub = parser.add_subparsers(dest="guidance_command", metavar="ACTION")

    b = sub.add_parser(
        "build",
        help="run G once over high-quality reference images and store the guidance vector",
        description="Builds the guidance of one model for one modality from a folder of HQ images (PNG/JPEG/TIFF "
        "or DICOM). With --config/--model the cache goes to storage.root/guidance/ where the node finds it at "
        "start-up; with --weights it goes to --out. --method auto measures mean, single and nearest on a "
        "held-out paired set and keeps the best.",
    )
    src = b.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", type=Path, help="node configuration (YAML); needs --model")
    src.add_argument("--weights", type=Path, help="a weights file with its model card beside it (X.pt + X.json)")
    b.add_argument("--model", help="model name in the configuration (with --config); name recorded with --weights")
    b.add_argument("--hq", type=Path, required=True, help="folder of high-quality reference images")
    b.add_argument("--modality", default="default", help='modality the guidance is for, e.g. OP, ES, XC (default "default")')
    b.add_argument("--method", default="auto", choices=("auto", "mean", "single", "nearest"), help="how references combine (default auto = measured)")
    b.add_argument("--heldout-lq", type=Path, help="held-out low-quality images, paired by file name with --heldout-hq")
    b.add_argument("--heldout-hq", type=Path, help="clean targets of --heldout-lq")
    b.add_argument("--heldout-synthetic", type=float, default=0.0, metavar="FRACTION",
                   help="hold out this fraction of --hq, degrade it synthetically and measure on it (e.g. 0.3)")
    b.add_argument("--strength", action=argparse.BooleanOptionalAction, default=True,
                   help="with a held-out set, also measure the guidance strength (vector x 0.25 ... 2) and keep "
                        "the best (default on)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    b.add_argument("--out", type=Path, help="cache file to write (default with --config: under storage.root/guidance/)")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("show", help="list guidance caches and their measurements")
    s.add_argument("paths", nargs="*", type=Path, help="cache files (default: those the config uses and the node built)")
    s.add_argument("--config", type=Path, help="node configuration (default: the embedded default)")
    s.set_defaults(func=cmd_show)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _paired(lq_dir: Path, hq_dir: Path, channels: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    lq = {p.stem: p for p in gd.reference_files(lq_dir)}
    hq = {p.stem: p for p in gd.reference_files(hq_dir)}
    common = sorted(set(lq) & set(hq))
    if not common:
        raise gd.GuidanceError(f"no file names in common between {lq_dir} and {hq_dir}")
    return gd.load_references([lq[k] for k in common], channels), gd.load_references([hq[k] for k in common], channels)


def cmd_build(args: argparse.Namespace) -> int:
    try:
        if args.config:
            if not args.model:
                print("guidance build: --config needs --model NAME", file=sys.stderr)
                return 2
            config = config_or_exit(args.config)
            if args.model not in config.models:
                print(f"guidance build: model {args.model!r} is not in {args.config} (models: {', '.join(config.models)})", file=sys.stderr)
                return 2
            mc = config.models[args.model]
            enhancer = build_model(mc.kind, weights=mc.weights, device=args.device if args.device != "auto" else mc.device, options=mc.options)
            storage_root: Path | None = Path(config.storage.root)
            name = args.model
        else:
            enhancer = load_checkpoint(args.weights, device=args.device)
            storage_root = None
            name = args.model or Path(args.weights).stem
        refs = gd.reference_files(args.hq)
        card = enhancer.info.card
        channels = int(card.channels) if card is not None and card.channels in (1, 3) else 3
        heldout = None
        if args.heldout_lq or args.heldout_hq:
            if not (args.heldout_lq and args.heldout_hq):
                print("guidance build: --heldout-lq and --heldout-hq go together", file=sys.stderr)
                return 2
            heldout = _paired(args.heldout_lq, args.heldout_hq, channels)
        elif args.heldout_synthetic > 0:
            refs, held = gd.split_refs(refs, args.heldout_synthetic)
            if not held:
                print("guidance build: --heldout-synthetic needs at least 2 reference images", file=sys.stderr)
                return 2
            clean = gd.load_references(held, channels)
            heldout = (list(degrade_many(clean, "mixed", seed=0)), clean)
        from models.guidance import GUIDANCE_SCALES

        scales = GUIDANCE_SCALES if heldout and args.strength else None
        bar = tqdm(total=(3 + bool(scales)) if heldout else 2, desc="guidance", unit="step")
        g = gd.build(enhancer, name, refs, modality=args.modality, method=args.method, heldout=heldout, scales=scales,
                     progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
        out = args.out or (gd.cache_path(storage_root, name, args.modality, g.weights_sha256, g.refs_sha256) if storage_root else None)
        if out is None:
            print("guidance build: --weights needs --out FILE", file=sys.stderr)
            return 2
        gd.save(g, out)
        bar.update(bar.total - bar.n)
        bar.close()
    except (gd.GuidanceError, ModelLoadError) as exc:
        print(f"guidance build: {exc}", file=sys.stderr)
        return 1
    print(gd.describe(g))
    print(f"written: {out}")
    return 0


def _configured(config_path: Path | None) -> list[tuple[str, Path]]:
    """(label, cache file) for every guidance the config names, plus caches the node built under storage.root."""
    config = config_or_exit(config_path)
    found: list[tuple[str, Path]] = []
    for name, model in config.models.items():
        for modality, source in model.guidance.items():
            if Path(source).is_file():
                found.append((f"model {name}, modality {modality} (configured file)", Path(source)))
    found += [(f"built by the node under {config.storage.root}", p) for p in gd.list_cached(Path(config.storage.root))]
    return found


def cmd_show(args: argparse.Namespace) -> int:
    entries = [(str(p), Path(p)) for p in args.paths] or _configured(args.config)
    if not entries:
        print("no guidance caches configured or built (dicomnode guidance build …, or start the node)")
        return 0
    status = 0
    for label, p in entries:
        try:
            print(gd.describe(gd.load(p)))
            print(f"  {label}: {p}")
        except gd.GuidanceError as exc:
            print(f"{p}: {exc}", file=sys.stderr)
            status = 1
    return status
