"""Batching across series: several workers enhancing series at once, with and without merging their calls.

Each worker enhances whole series the way the enhance stage does (calls of at most ``batch_size``
frames) through the node's resident model and device queue (``dicomnode.resident``). With merging,
a series' last partial call shares a forward pass with another series' frames; without it, the
model pads that pass with copies. Prints seconds, calls and merged calls for both.

    .venv/bin/python benchmarks/bench_cross_series.py --series 8 --frames 5 --workers 4 --batch 4
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from dicomnode.config import parse_config  # noqa: E402
from dicomnode.resident import ResidentModels  # noqa: E402


def run(resident: ResidentModels, name: str, series: list[list[np.ndarray]], workers: int, batch: int) -> float:
    todo = list(range(len(series)))
    lock = threading.Lock()

    def worker() -> None:
        while True:
            with lock:
                if not todo:
                    return
                k = todo.pop(0)
            bound = resident.bind(name, "OP")
            frames = series[k]
            for start in range(0, len(frames), batch):
                bound.enhancer.enhance(frames[start : start + batch])

    threads = [threading.Thread(target=worker) for _ in range(workers)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=8)
    parser.add_argument("--frames", type=int, default=5, help="frames per series (default 5)")
    parser.add_argument("--size", type=int, default=384, help="RGB frame side (default 384)")
    parser.add_argument("--workers", type=int, default=4, help="series enhanced at once (node.workers)")
    parser.add_argument("--batch", type=int, default=4, help="frames per call and per forward pass (default 4)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args(argv)
    weights = REPO / "models" / "weights" / "hqgnet-color.pt"
    rng = np.random.default_rng(0)
    series = [[rng.random((args.size, args.size, 3)).astype(np.float32) for _ in range(args.frames)] for _ in range(args.series)]
    with tempfile.TemporaryDirectory() as tmp:
        models = {name: {"kind": "hqgnet", "weights": str(weights), "device": args.device, "batch_size": args.batch,
                         "options": {"batch_size": args.batch}, "merge_series": merge}
                  for name, merge in (("merged", True), ("separate", False))}
        config = parse_config({"storage": {"root": tmp}, "destinations": {"out": {"folder": tmp}}, "models": models,
                               "rules": [{"name": "r", "match": {"Modality": "OP"}, "model": "merged", "destinations": ["out"]}]},
                              Path(tmp))
        resident = ResidentModels.load(config)
        queue = resident.queue(resident.get("merged").device)
        run(resident, "separate", series[:1], 1, args.batch)  # warm-up
        print(f"{args.series} series x {args.frames} frames {args.size}² RGB, {args.workers} workers, batch {args.batch}, "
              f"hqgnet-color on {args.device}")
        for name in ("separate", "merged", "separate", "merged")[: 2 * args.rounds]:
            calls, merged = queue.calls, queue.merged_calls
            seconds = run(resident, name, series, args.workers, args.batch)
            print(f"{name:<9} {seconds:6.2f} s  {queue.calls - calls:3d} calls ({queue.merged_calls - merged} merged)  "
                  f"{args.series * args.frames / seconds:5.1f} frames/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
