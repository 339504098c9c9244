"""Large fundus photographs: model time at the working resolution, and how far it is from native inference.

Run by hand (prints a table; not a test):

    .venv/bin/python benchmarks/bench_large_images.py                     # ../shared/data/fundus/eyeq
    .venv/bin/python benchmarks/bench_large_images.py --native            # + native-resolution inference (slow)
    .venv/bin/python benchmarks/bench_large_images.py --images DIR --max-sides 512 1024

For each image (EyeQ: 2,592 x 3,888 and similar) it times the shipped colour HQG-Net at each working side
(the card's is 512: the model runs on a shrunk copy and its smooth correction fields are carried back to
full resolution, so full-resolution detail is the input's own), field normalisation (the default route
for fundus), veil removal (the endoscopy route, timed on the same large frames) and CLAHE with the
field-of-view option. With ``--native`` it also runs the model at full resolution and prints
PSNR(working-resolution output, native output): how much the shortcut changes the result.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from dicomnode import guidance as gd  # noqa: E402
from dicomnode.configtypes import builtin_dir  # noqa: E402
from models.io import list_images, load_image  # noqa: E402
from models.metrics import psnr  # noqa: E402
from models.registry import build_model  # noqa: E402


def timed(fn, repeats: int, *, warmup: bool = True) -> tuple[float, np.ndarray]:
    """Median seconds of ``fn()`` over ``repeats`` (at least 1) calls, after one warm-up call unless told not."""
    out = fn() if warmup else None
    times = []
    for _ in range(max(1, repeats)):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=Path, default=ROOT.parent / "shared" / "data" / "fundus" / "eyeq")
    parser.add_argument("--max-sides", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--native", action="store_true", help="also run at full resolution and compare")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    paths = list_images(args.images) if args.images.is_dir() else []
    if not paths:
        print(f"no images at {args.images} (the public sample images are not shipped)")
        return 2
    weights = builtin_dir() / "hqgnet-color.pt"
    vector = gd.load(builtin_dir() / "hqgnet-color.guidance-OP.json").vector
    models = {side: build_model("hqgnet", weights=weights, device="cpu", options={"max_side": side}) for side in args.max_sides}
    native = build_model("hqgnet", weights=weights, device="cpu", options={"max_side": None}) if args.native else None
    clahe = build_model("clahe", device="cpu", options={"fov": True})
    fieldnorm = build_model("fieldnorm", device="cpu", options={"targets": "fundus", "fov": True})
    dehaze = build_model("dehaze", device="cpu", options={"targets": "endoscopy", "fov": True})
    header = ["image", "size", "clahe-fov s", "fieldnorm-fundus s", "dehaze s"] + [f"hqgnet@{s} s" for s in args.max_sides]
    if native is not None:
        header += ["native s"] + [f"PSNR@{s} vs native" for s in args.max_sides]
    print("| " + " | ".join(header) + " |")
    print("|" + " --- |" * len(header))
    rows: list[list[float]] = []
    for i, path in enumerate(paths, 1):
        img = load_image(path, 3)
        print(f"[{i}/{len(paths)}] {path.name} {img.shape[1]}x{img.shape[0]}", file=sys.stderr, flush=True)
        t_clahe, _ = timed(lambda im=img: clahe.enhance([im])[0], args.repeats)
        t_fieldnorm, _ = timed(lambda im=img: fieldnorm.enhance([im])[0], args.repeats)
        t_dehaze, _ = timed(lambda im=img: dehaze.enhance([im])[0], args.repeats)
        outs, secs = {}, []
        for side, model in models.items():
            t, outs[side] = timed(lambda m=model, im=img: m.enhance([im], vector)[0], args.repeats)
            secs.append(t)
        row = [t_clahe, t_fieldnorm, t_dehaze, *secs]
        cells = [path.name, f"{img.shape[1]}x{img.shape[0]}", f"{t_clahe:.2f}", f"{t_fieldnorm:.2f}", f"{t_dehaze:.2f}", *(f"{t:.2f}" for t in secs)]
        if native is not None:
            t_native, ref = timed(lambda im=img: native.enhance([im], vector)[0], 1, warmup=False)
            gaps = [psnr(outs[s], ref) for s in args.max_sides]
            row += [t_native, *gaps]
            cells += [f"{t_native:.1f}", *(f"{g:.1f} dB" for g in gaps)]
        rows.append(row)
        print("| " + " | ".join(cells) + " |", flush=True)
    means = np.mean(np.array(rows), axis=0)
    print(f"\nmean over {len(rows)} image(s): CLAHE-fov {means[0]:.2f} s; field normalisation {means[1]:.2f} s; "
          f"veil removal {means[2]:.2f} s; "
          + ", ".join(f"HQG-Net at {s}: {means[3 + k]:.2f} s" for k, s in enumerate(args.max_sides))
          + (f"; native {means[3 + len(args.max_sides)]:.1f} s" if native is not None else ""))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
