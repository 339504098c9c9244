"""`dicomnode demo`: run the node end to end on bundled sample images and write an HTML page."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="start a node, send it sample studies over DICOM, write before/after HTML",
        description="Starts the node in this process (temporary storage, a free port, the shipped models and the rules "
        "of the embedded default configuration), sends sample studies built from images inside the installed packages "
        "(retina photograph as OP, pydicom CT and MR, a synthetic corneal confocal image) over DICOM C-STORE, "
        "waits for the enhanced series and writes OUT/index.html with before/after images and metrics.",
    )
    p.add_argument("--out", type=Path, default=Path("demo-out"), help="folder for index.html, PNGs and the enhanced DICOM files, relative to the working directory (default demo-out)")
    p.add_argument("--config", type=Path, default=None, help="take models and rules from this config instead of the default")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the enhanced series (default 600)")
    p.set_defaults(func=cmd_demo)


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.tools.demo import run_demo  # noqa: PLC0415 - the node and its models load only for this command

    try:
        result = run_demo(args.out, config_path=args.config, timeout=args.timeout)
    except (RuntimeError, TimeoutError, OSError) as exc:
        print(f"demo: {exc}", file=sys.stderr)
        return 1
    print(f"\n{len(result.items)} images sent, {result.enhanced} enhanced, in {result.seconds:.1f} s")
    for item in result.items:
        status = f"-> {item.output.name}" if item.output else f"({item.note})"
        delta = ""
        if item.metrics_after:
            k = "NIQE ↓"
            if k in item.metrics_before and k in item.metrics_after:
                delta = f"  NIQE {item.metrics_before[k]:.2f} -> {item.metrics_after[k]:.2f}"
        print(f"  {item.sample.key:7s} {item.sample.modality:3s} {item.source.name:14s} {status}{delta}")
    print(f"page: {result.page.resolve()}")
    return 0 if result.enhanced else 1
