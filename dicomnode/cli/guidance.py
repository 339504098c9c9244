"""`dicomnode guidance build | show`: HQ guidance caches for guided models (HQG-Net)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


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
    b.add_argument("--size", type=int, help="image size G sees (default: the model's training size)")
    b.add_argument("--device", default="auto", help="auto, cpu, cuda ...")
    b.add_argument("--out", type=Path, help="cache file to write (default with --config: under storage.root/guidance/)")
    b.set_defaults(func=cmd_build)

    s = sub.add_parser("show", help="list guidance caches and their measurements")
    s.add_argument("paths", nargs="*", type=Path, help="cache files (default: all under the config's storage root)")
    s.add_argument("--config", type=Path, help="node configuration: show storage.root/guidance/")
    s.set_defaults(func=cmd_show)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])


def _paired(lq_dir: Path, hq_dir: Path, channels: int, size: int):
    from dicomnode.guidance import GuidanceError, load_references, reference_files

    lq = {p.stem: p for p in reference_files(lq_dir)}
    hq = {p.stem: p for p in reference_files(hq_dir)}
    common = sorted(set(lq) & set(hq))
    if not common:
        raise GuidanceError(f"no file names in common between {lq_dir} and {hq_dir}")
    return (load_references([lq[k] for k in common], channels, size), load_references([hq[k] for k in common], channels, size))


def cmd_build(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from dicomnode import guidance as gd
    from models.registry import ModelLoadError, build_model, load_checkpoint

    try:
        if args.config:
            if not args.model:
                print("guidance build: --config needs --model NAME", file=sys.stderr)
                return 2
            from dicomnode.config import load_config

            config = load_config(args.config)
            if args.model not in config.models:
                print(f"guidance build: model {args.model!r} is not in {args.config} (models: {', '.join(config.models)})", file=sys.stderr)
                return 2
            mc = config.models[args.model]
            enhancer = build_model(mc.kind, weights=mc.weights, device=args.device if args.device != "auto" else mc.device, options=mc.options)
            storage_root = Path(config.storage.root)
            name = args.model
        else:
            enhancer = load_checkpoint(args.weights, device=args.device)
            storage_root = None
            name = args.model or Path(args.weights).stem
        refs = gd.reference_files(args.hq)
        channels = gd.model_channels(enhancer) or gd._infer_channels(refs)
        size = args.size or gd.model_size(enhancer)
        heldout = None
        if args.heldout_lq or args.heldout_hq:
            if not (args.heldout_lq and args.heldout_hq):
                print("guidance build: --heldout-lq and --heldout-hq go together", file=sys.stderr)
                return 2
            heldout = _paired(args.heldout_lq, args.heldout_hq, channels, size)
        elif args.heldout_synthetic > 0:
            refs, held = gd.split_refs(refs, args.heldout_synthetic)
            if not held:
                print("guidance build: --heldout-synthetic needs at least 2 reference images", file=sys.stderr)
                return 2
            heldout = gd.synthetic_heldout(gd.load_references(held, channels, size))
        bar = tqdm(total=3 if heldout else 2, desc="guidance", unit="step")
        g = gd.build(enhancer, name, refs, modality=args.modality, method=args.method, heldout=heldout,
                     channels=channels, size=size, progress=lambda msg: (bar.set_postfix_str(msg), bar.update(1)))
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


def cmd_show(args: argparse.Namespace) -> int:
    from dicomnode import guidance as gd

    paths = list(args.paths)
    if not paths:
        if not args.config:
            print("guidance show: give cache files or --config", file=sys.stderr)
            return 2
        from dicomnode.config import load_config

        paths = gd.list_cached(Path(load_config(args.config).storage.root))
        if not paths:
            print("no guidance caches yet (dicomnode guidance build …, or start the node)")
            return 0
    status = 0
    for p in paths:
        try:
            print(gd.describe(gd.load(p)))
            print(f"  file: {p}")
        except gd.GuidanceError as exc:
            print(f"{p}: {exc}", file=sys.stderr)
            status = 1
    return status
