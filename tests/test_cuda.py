"""The GPU path: mixed precision, channels_last, torch.compile and the node serving a series on CUDA.

Marked ``cuda`` and run by ``benchmarks/gpu_check.sh`` on a GPU machine. Without a GPU they skip,
except under ``DICOMNODE_GPU_DRY_RUN=1`` (``gpu_check.sh --dry-run``, run by CI), where the same code
runs on the CPU so the script and these tests cannot rot while no GPU is lent.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pydicom
import pytest
import torch

from dicomnode import guidance as gd
from dicomnode.configtypes import builtin_dir
from models.metrics import psnr
from models.registry import build_model

from factories import free_port, image_dataset, write

pytestmark = pytest.mark.cuda
DRY_RUN = os.environ.get("DICOMNODE_GPU_DRY_RUN") == "1"
WEIGHTS = builtin_dir()


@pytest.fixture(scope="module")
def device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if DRY_RUN:
        return "cpu"
    pytest.skip("no CUDA device (benchmarks/gpu_check.sh runs these on a GPU machine; --dry-run on the CPU)")


def _ccm_frames(n: int, size: int = 384) -> list[np.ndarray]:
    rng = np.random.default_rng(7)
    yy, xx = np.mgrid[0:size, 0:size] / size
    shade = 0.35 + 0.65 * np.exp(-((yy - 0.45) ** 2 + (xx - 0.5) ** 2) / 0.2)
    return [np.clip(shade * rng.uniform(0.2, 0.8, (size, size)), 0, 1).astype(np.float32) for _ in range(n)]


def test_the_device_output_matches_fp32_on_the_cpu(device: str) -> None:
    """bf16 autocast and channels_last on CUDA change the pixels only at the level of rounding."""
    frames = _ccm_frames(4)
    vector = gd.load(WEIGHTS / "hqgnet-ccm.guidance-default.json").vector
    on_device = build_model("hqgnet", weights=WEIGHTS / "hqgnet-ccm.pt", device=device)
    reference = build_model("hqgnet", weights=WEIGHTS / "hqgnet-ccm.pt", device="cpu")
    assert on_device.info.options["device"] == torch.device(device).type  # in provenance and the derived UIDs
    out, ref = on_device.enhance(frames, vector), reference.enhance(frames, vector)
    for o, r, f in zip(out, ref, frames, strict=True):
        assert o.shape == f.shape and o.dtype == np.float32
        assert psnr(o, r) > 40.0, f"device output differs from fp32: {psnr(o, r):.1f} dB"
        assert np.abs(o - f).mean() > 0.01  # the model did change the frame


def test_compiled_generator_matches_eager(device: str) -> None:
    if device != "cuda":
        pytest.skip("torch.compile is checked on the GPU only (on this CPU inductor takes minutes to build)")
    from models.hqgnet import build_hqgnet, config_by_name

    net = build_hqgnet(config_by_name("lite", 1)).to(device).eval()
    compiled = torch.compile(net.gen)
    x = torch.rand(2, 1, 256, 256, device=device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16):
        v = net.g(x[:1]).expand(2, -1)
        eager, fast = net.gen(x, v).float(), compiled(x, v).float()
    assert torch.allclose(eager, fast, atol=2e-2), float((eager - fast).abs().max())


def test_the_node_serves_a_series_on_the_device(device: str, tmp_path: Path) -> None:
    """A CCM series through the running node with its model on ``device``; prints the latency from the
    last instance stored to the last output written (quiet period 1 s)."""
    from dicomnode.config import parse_config
    from dicomnode.server import Server, ServerOptions
    from dicomnode.tools.demo import send

    out = tmp_path / "out"
    cfg = parse_config({
        "node": {"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 1.0},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(out)}},
        "models": {"ccm": {"kind": "hqgnet", "weights": str(WEIGHTS / "hqgnet-ccm.pt"), "device": device,
                           "guidance": {"default": str(WEIGHTS / "hqgnet-ccm.guidance-default.json")}}},
        "rules": [{"name": "ccm", "match": {"Modality": "OP"}, "model": "ccm", "destinations": ["out"]}],
    }, tmp_path)
    count = 4 if DRY_RUN else 20
    pixels = [(f * 255).round().astype(np.uint8) for f in _ccm_frames(count)]
    files = [write(image_dataset(p, study="cuda", series="ccm", index=i, modality="OP",
                                 description="Corneal confocal microscopy"), tmp_path / "in" / f"{i}.dcm")
             for i, p in enumerate(pixels)]
    server = Server(cfg, options=ServerOptions(drain_seconds=10, dispatch_poll_seconds=0.05))
    server.start()
    try:
        assert server.models.failures == {}
        assert server.models.get("ccm").device.startswith(device)
        assert send(files, "127.0.0.1", server.port, cfg.node.ae_title) == [0] * count
        sent = time.monotonic()
        deadline = sent + 120
        while len(list(out.glob("*.dcm"))) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        latency = time.monotonic() - sent
    finally:
        server.stop()
    outputs = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
    assert len(outputs) == count
    assert all(ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.7" and "HQG-Net" in ds.DerivationDescription for ds in outputs)
    print(f"\n{count}-instance series on {device}: last instance stored -> last output written {latency:.2f} s "
          f"(quiet period 1.0 s)")
