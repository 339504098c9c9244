"""Peak memory (VmHWM) of the enhancement work, each case in a fresh process.

    .venv/bin/python benchmarks/bench_memory.py
    .venv/bin/python benchmarks/bench_memory.py --side 4096 --cases paper-resident lite-4096

Cases:
- ``baseline``: the interpreter with torch, the node and the models imported, nothing loaded;
- ``paper-resident``: HQG-Net in the paper configuration (66 M parameters) built and resident on the CPU,
  with one 384x384 inference (what a node serving it holds);
- ``lite-4096``: the shipped colour model (lite, working side 512) enhancing one SIDE x SIDE RGB frame
  with its field-of-view surround, in luminance mode, as the node would;
- ``clahe-4096``: CLAHE with the field-of-view option on the same frame.
Prints peak resident memory per case and the increase over the baseline.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CASES = ("baseline", "paper-resident", "lite-4096", "clahe-4096")


def peak_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def frame(side: int):
    """A fundus-like RGB frame: a lit disc on a black surround, with texture."""
    import numpy as np

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side].astype(np.float32) / side
    disc = (((yy - 0.5) ** 2 + (xx - 0.5) ** 2) < 0.2).astype(np.float32)
    base = np.stack([0.7 * disc, 0.35 * disc, 0.15 * disc], axis=-1)
    return np.clip(base * (0.8 + 0.2 * rng.random((side, side, 1), dtype=np.float32)), 0, 1)


def run_case(case: str, side: int) -> None:
    import numpy as np
    import torch

    from dicomnode import guidance as gd
    from dicomnode.configtypes import builtin_dir
    from models.hqgnet import build_hqgnet, config_by_name
    from models.registry import build_model

    if case == "paper-resident":
        net = build_hqgnet(config_by_name("paper", 3)).eval()
        with torch.inference_mode():
            x = torch.rand(1, 3, 384, 384)
            net.enhance(x, net.g(x))
    elif case == "lite-4096":
        enh = build_model("hqgnet", weights=builtin_dir() / "hqgnet-color.pt", device="cpu",
                          options={"color_mode": "luminance", "fov": True})
        out = enh.enhance([frame(side)], gd.load(builtin_dir() / "hqgnet-color.guidance-OP.json").vector)[0]
        assert out.shape == (side, side, 3) and np.isfinite(out).all()
    elif case == "clahe-4096":
        enh = build_model("clahe", device="cpu", options={"fov": True})
        out = enh.enhance([frame(side)])[0]
        assert out.shape == (side, side, 3)
    print(f"{peak_mb():.0f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", type=int, default=4096)
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # internal: run one case in this process
    args = parser.parse_args(argv)
    if args.case:
        run_case(args.case, args.side)
        return 0
    base = None
    print(f"| case | peak RSS MB | over baseline MB |  ({args.side}x{args.side} RGB where a frame is used)")
    print("| --- | ---: | ---: |")
    for case in ["baseline", *[c for c in args.cases if c != "baseline"]]:
        print(f"running {case} ...", file=sys.stderr, flush=True)
        run = subprocess.run([sys.executable, __file__, "--case", case, "--side", str(args.side)], cwd=ROOT,
                             capture_output=True, text=True)
        if run.returncode != 0:
            print(f"| {case} | failed: {run.stderr.strip().splitlines()[-1] if run.stderr.strip() else run.returncode} | |")
            continue
        mb = float(run.stdout.strip().splitlines()[-1])
        base = mb if case == "baseline" else base
        print(f"| {case} | {mb:.0f} | {'-' if case == 'baseline' or base is None else f'{mb - base:.0f}'} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
