"""`dicomnode evaluate`: score enhancers on an image/DICOM folder or a built-in paired benchmark.

Writes results.md, results.csv (mean ± std per metric and method, the input as its own row),
per_image.csv and montage.png to --out, and prints the summary table.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _csv(value: str) -> list[str]:
    return [v.strip() for v in value.split(",") if v.strip()]


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "evaluate",
        help="score enhancement methods with no-reference, paired and mask-based metrics",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--input", type=Path, help="folder of low-quality images (PNG/JPEG/TIFF/BMP or DICOM)")
    src.add_argument("--benchmark", choices=("ccm", "fundus"),
                     help="built-in paired benchmark: clean images degraded with a fixed seed")
    src.add_argument("--holdout", action="store_true",
                     help="every configured model (as --config routes and guides it), the input and CLAHE on the "
                          "held-out images: degraded clean references, real CCM pairs, real low-quality images")
    p.add_argument("--config", type=Path, default=None, help="with --holdout: the node config whose models are evaluated (default: embedded)")
    p.add_argument("--holdout-dir", type=Path, default=None, help="with --holdout: the held-out images (default: ../shared/data/holdout)")
    p.add_argument("--reference", type=Path, help="clean references with the same file names as --input (adds PSNR/SSIM/LaSSIM)")
    p.add_argument("--masks", type=Path, help="structure masks with the same file names (adds SNR_r and segmentation scores)")
    p.add_argument("--guidance", type=Path, help="high-quality images for guided models (HQG-Net): mean guidance vector")
    p.add_argument("--methods", type=_csv, default=["clahe", "histeq", "retinex"],
                   help="comma list of model kinds (clahe,histeq,retinex,...) and/or weights files X.pt with X.json "
                        "(default: clahe,histeq,retinex)")
    p.add_argument("--metrics", type=_csv, default=None,
                   help="comma list of metrics (default: all the inputs allow): psnr,ssim,lassim,lassim_in,ag,en,niqe,"
                        "brisque,piqe,illum,snr3,snr5,snr7,snr9,auc,dice,sens,gmean")
    p.add_argument("--out", type=Path, default=Path("evaluation"), help="output folder for the tables and montage (default evaluation)")
    p.add_argument("--size", type=int, default=384, help="scale the longer side down to this many pixels (0 = keep; default 384)")
    p.add_argument("--device", default="auto", help="device for trained models: auto, cpu, cuda (default auto)")
    p.add_argument("--montage-images", type=int, default=4, help="images shown in montage.png (default 4)")
    p.add_argument("--lassim-level", type=int, default=3, help="Laplacian pyramid level for LaSSIM (default 3)")
    p.add_argument("--seed", type=int, default=0, help="benchmark: seed of the degradations (default 0)")
    p.add_argument("--severity", type=float, default=1.0, help="benchmark: degradation strength (default 1.0)")
    p.add_argument("--limit", type=int, default=None, help="benchmark: use only the first N clean images")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=main)


def _holdout(args: argparse.Namespace) -> int:
    from dicomnode.cli.common import config_or_exit  # noqa: PLC0415
    from dicomnode.resident import ResidentModels  # noqa: PLC0415
    from dicomnode.tools.holdout import run_holdout  # noqa: PLC0415
    from models.evaluate import shared_data_root  # noqa: PLC0415

    config = config_or_exit(args.config)
    models = ResidentModels.load(config)
    for name, reason in models.failures.items():
        print(f"model {name} not evaluated: {reason}")
    methods = [m for m in args.methods if m not in ("clahe", "histeq", "retinex")] if args.methods != ["clahe", "histeq", "retinex"] else []
    try:
        run_holdout(config, models, args.holdout_dir or shared_data_root() / "holdout", args.out, extra_methods=methods,
                    progress=not args.no_progress)
    except FileNotFoundError as exc:
        print(f"error: {exc}")
        return 2
    return 0


def main(args: argparse.Namespace) -> int:
    from models.evaluate import EvalConfig, evaluate, format_table, run_benchmark
    from models.registry import ModelLoadError

    if args.holdout:
        return _holdout(args)

    if args.benchmark is None and args.input is not None and not args.input.is_dir():
        print(f"error: --input {args.input} is not a folder")
        return 2
    cfg = EvalConfig(
        input=args.input,
        out=args.out,
        methods=args.methods,
        reference=args.reference,
        masks=args.masks,
        guidance=args.guidance,
        metrics=args.metrics,
        size=args.size or None,
        device=args.device,
        montage_images=args.montage_images,
        lassim_level=args.lassim_level,
        progress=not args.no_progress,
    )
    try:
        if args.benchmark:
            if args.reference:
                print("error: --benchmark makes its own references; drop --reference")
                return 2
            result = run_benchmark(args.benchmark, cfg, seed=args.seed, severity=args.severity, limit=args.limit)
        else:
            result = evaluate(cfg)
    except (ValueError, FileNotFoundError, ModelLoadError) as exc:
        print(f"error: {exc}")
        return 2
    print(format_table(result.summary))
    n = len({r["image"] for r in result.per_image})
    n_methods = len([m for m in result.summary.methods if m not in ("input", "reference")])
    print(f"\n{n} image(s) x {n_methods} method(s); wrote "
          + ", ".join(str(p) for p in result.files.values() if p.exists()))
    return 0
