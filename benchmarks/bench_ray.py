"""Ray executor: a batch of series through the pipeline with 1 actor vs 2 actors (and the local executor).

A Ray cluster on loopback (``ray start --head`` and one worker node, each with ``--cpus`` CPUs; tests/raycluster.py)
holds the shipped HQG-Net colour model on ``executor.actors`` actors of one CPU each. The node's side runs in this
process: the same :class:`dicomnode.pipeline.Pipeline` as ``dicomnode serve`` (route, bind, decode, remote
enhance, gate, derive, encode, write), series after series. Frames are large enough that the model is the
bottleneck (its share of the series time is printed). Rounds alternate 1 and 2 actors so a busy machine
affects both alike; the best round of each counts.

    .venv/bin/python benchmarks/bench_ray.py                       # 4 series x 4 instances of 384x384 RGB
    .venv/bin/python benchmarks/bench_ray.py --series 6 --size 512 --rounds 3 --json out.json
    .venv/bin/python benchmarks/bench_ray.py --model-only --local   # the actors alone, and torch in this process
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from raycluster import DRIVER_ENV, RayCluster  # noqa: E402

os.environ.update(DRIVER_ENV)  # before Ray is imported: this driver stays on loopback


def make_series(folder: Path, series: int, count: int, size: int) -> list[Path]:
    from installs import fundus_series

    return [folder / f"s{i}" for i in range(series) if fundus_series(folder / f"s{i}", count, study=f"bench-{i}", size=size)]


def config(root: Path, kind: str, address: str, actors: int, batch: int):
    from dicomnode.config import parse_config

    return parse_config({
        "storage": {"root": str(root)},
        "destinations": {"out": {"folder": str(root / "out")}},
        "models": {"hqgnet-color": {"kind": "hqgnet", "weights": "builtin:hqgnet-color.pt", "batch_size": batch,
                                    "guidance": {"OP": "builtin:hqgnet-color.guidance-OP.json"}}},
        "rules": [{"name": "fundus", "match": {"Modality": "OP"}, "model": "hqgnet-color", "destinations": ["out"]}],
        "executor": {"kind": kind, "address": address, "actors": actors, "num_cpus": 1},
    }, root)


def run_batch(cfg, folders: list[Path], out: Path) -> dict[str, float]:
    from dicomnode.assemble import series_from_files
    from dicomnode.executor import load_models
    from dicomnode.pipeline import Pipeline
    from dicomnode.route import routing_keywords

    models = load_models(cfg)
    assert not models.failures, models.failures
    pipeline = Pipeline(cfg, models)
    keywords = routing_keywords(cfg)
    batches = [series_from_files(sorted(f.glob("*.dcm")), keywords, "BENCH")[0][0] for f in folders]
    pipeline.run(batches[0], out / "warm")  # first call: connections, lazy imports
    images = model = 0.0
    started = time.perf_counter()
    for i, series in enumerate(batches):
        outcome = pipeline.run(series, out / f"s{i}")
        assert not outcome.failed and outcome.outputs, outcome.error
        images += len(outcome.outputs)
        model += outcome.timings.get("model", 0.0)
    wall = time.perf_counter() - started
    for m in models.models.values():  # free the cluster's CPUs for the next configuration
        for actor in getattr(m.enhancer, "actors", []):
            import ray

            ray.kill(actor)
    return {"seconds": round(wall, 2), "images": int(images), "images_per_s": round(images / wall, 3),
            "model_share": round(model / wall, 3)}


def model_only(cfg, frames: int, size: int, batch: int) -> dict[str, float]:
    """The model alone: ``frames`` RGB frames through the bound enhancer in batches (no decode, derive or write)."""
    import numpy as np
    import ray

    from dicomnode.executor import load_models

    models = load_models(cfg)
    assert not models.failures, models.failures
    bound = models.bind("hqgnet-color", "OP")
    rng = np.random.default_rng(0)
    images = [rng.random((size, size, 3), dtype=np.float32) for _ in range(batch)]
    bound.enhancer.enhance(images)  # warm
    started = time.perf_counter()
    for _ in range(frames // batch):
        bound.enhancer.enhance(images)
    wall = time.perf_counter() - started
    for m in models.models.values():
        for actor in getattr(m.enhancer, "actors", []):
            ray.kill(actor)
    return {"seconds": round(wall, 2), "images": frames, "images_per_s": round(frames / wall, 3)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--count", type=int, default=4, help="instances per series")
    parser.add_argument("--size", type=int, default=384, help="frame side (RGB)")
    parser.add_argument("--batch", type=int, default=4, help="models.*.batch_size (split across the actors)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--local", action="store_true", help="also time the local executor (torch in this process)")
    parser.add_argument("--model-only", action="store_true",
                        help="time the bound enhancer alone (series x count frames), not the whole pipeline")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()

    import torch

    results: dict[str, list[dict[str, float]]] = {"1 actor": [], "2 actors": [], "local": []}
    with tempfile.TemporaryDirectory(prefix="bench-ray-") as tmp, RayCluster(workers=1) as cluster:
        root = Path(tmp)
        folders = make_series(root / "src", args.series, args.count, args.size)
        for r in range(args.rounds):
            for actors in ((1, 2) if r % 2 == 0 else (2, 1)):
                label = f"{actors} actor{'s' if actors > 1 else ''}"
                cfg = config(root / f"var-{r}-{actors}", "ray", cluster.address, actors, args.batch)
                res = (model_only(cfg, args.series * args.count, args.size, args.batch) if args.model_only
                       else run_batch(cfg, folders, root / f"out-{r}-{actors}"))
                results[label].append(res)
                print(f"round {r + 1}: {label}: {res}", flush=True)
            if args.local:
                cfg = config(root / f"var-{r}-local", "local", cluster.address, 1, args.batch)
                res = (model_only(cfg, args.series * args.count, args.size, args.batch) if args.model_only
                       else run_batch(cfg, folders, root / f"out-{r}-local"))
                results["local"].append(res)
                print(f"round {r + 1}: local ({torch.get_num_threads()} torch threads): {res}", flush=True)
    best = {k: min(v, key=lambda x: x["seconds"]) for k, v in results.items() if v}
    ratio = best["1 actor"]["seconds"] / best["2 actors"]["seconds"]
    summary = {"series": args.series, "instances_per_series": args.count, "size": args.size, "batch": args.batch,
               "cpus": os.cpu_count(), "load_average": os.getloadavg(), "best": best,
               "speedup_2_vs_1_actor": round(ratio, 2), "rounds": results}
    print(json.dumps({k: summary[k] for k in ("best", "speedup_2_vs_1_actor", "load_average")}, indent=2))
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
