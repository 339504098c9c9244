"""End-to-end pipeline benchmark: a 20-instance series through the node to a storescp PACS.

Measures, on this machine's CPU (or CUDA when present):
- latency from the last instance received (the sender's last C-STORE answered) to the last output
  stored at the PACS, and how much of it is the configured series quiet time;
- per-stage seconds of the enhancement (read, decode, model, encode, write) and of the send;
- images/s of the enhancement and of the whole series;
- what the guidance cache saves per image: the G forward pass on an HQ reference that the node
  would otherwise run for every request.

Run by hand (needs dcmtk's storescp and dcmsend):
    .venv/bin/python benchmarks/bench_pipeline.py                      # hqgnet-color on OP fundus crops
    .venv/bin/python benchmarks/bench_pipeline.py --model hqgnet-ccm   # synthetic CCM, gray
    .venv/bin/python benchmarks/bench_pipeline.py --model clahe --count 20 --size 512
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

WEIGHTS = REPO / "models" / "weights"


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def make_series(folder: Path, count: int, size: int, gray: bool) -> list[Path]:
    """``count`` instances of one series: degraded retina crops (OP) or synthetic CCM frames."""
    from pydicom.uid import generate_uid

    from dicomnode.tools.demo import degraded_retina, synthetic_ccm, write_sample

    study, series = generate_uid(), generate_uid()
    paths = []
    base = degraded_retina(size) if not gray else None
    for i in range(count):
        img = synthetic_ccm(size, seed=i) if gray else np.roll(base, i * 7, axis=1)
        desc = "Corneal confocal microscopy" if gray else "Colour fundus photograph"
        paths.append(write_sample(folder / f"img{i:03d}.dcm", img, study_uid=study, series_uid=series, modality="OP",
                                  series_number=1, description=desc, instance=i + 1))
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="hqgnet-color", help="hqgnet-color | hqgnet-ccm | clahe (default hqgnet-color)")
    ap.add_argument("--count", type=int, default=20, help="instances in the series (default 20)")
    ap.add_argument("--size", type=int, default=384, help="image side in pixels (default 384)")
    ap.add_argument("--quiet", type=float, default=1.0, help="series_quiet_seconds of the node (default 1.0)")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args()
    for tool in ("storescp", "dcmsend"):
        if shutil.which(tool) is None:
            sys.exit(f"needs {tool} (apt-get install dcmtk)")

    from dicomnode.config import parse_config
    from dicomnode.dispatch import Dispatcher
    from dicomnode.server import Server, ServerOptions

    work = Path(tempfile.mkdtemp(prefix="bench-pipeline-"))
    gray = args.model == "hqgnet-ccm"
    series = make_series(work / "in", args.count, args.size, gray)
    pacs_dir = work / "pacs"
    pacs_dir.mkdir()
    env = {**os.environ, "TCP_NODELAY": "1"}  # dcmtk leaves Nagle on otherwise
    pacs_port, node_port = free_port(), free_port()
    pacs = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(pacs_dir), "+xa", str(pacs_port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    if args.model.startswith("hqgnet"):
        model = {"kind": "hqgnet", "weights": str(WEIGHTS / f"{args.model}.pt"), "device": args.device}
    else:
        model = {"kind": args.model, "device": args.device}
    cfg = parse_config({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": node_port, "series_quiet_seconds": args.quiet},
        "storage": {"root": str(work / "var")},
        "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port}},
        "models": {args.model: model},
        "rules": [{"name": "op", "match": {"Modality": "OP"}, "model": args.model, "destinations": ["pacs"]}],
    }, REPO)

    sends: list[float] = []
    original_send = Dispatcher._send

    def timed_send(destination, paths):
        t = time.perf_counter()
        out = original_send(destination, paths)
        sends.append(time.perf_counter() - t)
        return out

    Dispatcher._send = staticmethod(timed_send)
    t_load = time.perf_counter()
    server = Server(cfg, options=ServerOptions(drain_seconds=10, dispatch_poll_seconds=0.05))
    server.start()
    load_s = time.perf_counter() - t_load
    if server.models.failures:
        sys.exit(f"model failed to load: {server.models.failures}")
    try:
        t_send = time.perf_counter()
        subprocess.run(["dcmsend", "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(node_port), *map(str, series)],
                       env=env, check=True, capture_output=True)
        t_last_in = time.perf_counter()
        deadline = t_last_in + 1800
        while len(list(pacs_dir.glob("*"))) < args.count and time.perf_counter() < deadline:
            time.sleep(0.02)
        stored = sorted(pacs_dir.glob("*"), key=lambda p: p.stat().st_mtime)
        if len(stored) < args.count:
            sys.exit(f"only {len(stored)} of {args.count} outputs reached the PACS")
        t_last_out = time.perf_counter() - (time.time() - stored[-1].stat().st_mtime)
        # guidance cache saving: the G forward a request would need without the cache
        g_ms = None
        resident = server.models.get(args.model)
        if resident.enhancer.uses_guidance:
            ref = np.asarray(series_image(series[0]), dtype=np.float32)
            resident.enhancer.extract_guidance([ref])  # warm-up
            runs = []
            for _ in range(5):
                t = time.perf_counter()
                resident.enhancer.extract_guidance([ref])
                runs.append(time.perf_counter() - t)
            g_ms = 1000 * statistics.median(runs)
        # the per-stage seconds each job recorded in the ledger
        timings = [j.details["timings"] for j in server.spool.ledger.jobs() if j.details and j.details.get("timings")]
    finally:
        server.stop()
        pacs.terminate()
        pacs.wait(10)
    stage = {k: round(sum(t.get(k, 0.0) for t in timings), 3) for k in (timings[0] if timings else {}) if k != "total"}
    enhance_s = sum(stage.values())
    latency = t_last_out - t_last_in
    report = {
        "model": args.model,
        "device": server.models.get(args.model).device,
        "instances": args.count,
        "image": f"{args.size}x{args.size}{'' if gray else 'x3'}",
        "model_load_s": round(load_s, 2),
        "send_to_node_s": round(t_last_in - t_send, 2),
        "latency_last_in_to_last_stored_s": round(latency, 2),
        "of_which_quiet_wait_s": args.quiet,
        "enhance_stage_s": stage,
        "send_to_pacs_s": round(sum(sends), 3),
        "images_per_s_enhance": round(args.count / enhance_s, 2) if enhance_s else None,
        "images_per_s_model_only": round(args.count / stage["model"], 2) if stage.get("model") else None,
        "images_per_s_end_to_end": round(args.count / (latency + (t_last_in - t_send)), 2),
        "guidance_g_forward_ms_saved_per_image": round(g_ms, 1) if g_ms is not None else None,
        "guidance_saving_share_of_model_time": round(g_ms / 1000 / (stage["model"] / args.count), 3)
        if g_ms and stage.get("model") else None,
    }
    print(json.dumps(report, indent=2))
    shutil.rmtree(work, ignore_errors=True)
    return 0


def series_image(path: Path) -> np.ndarray:
    from models.io import dicom_frames

    return dicom_frames(path)[0]


if __name__ == "__main__":
    sys.exit(main())
