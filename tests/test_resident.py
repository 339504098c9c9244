"""Resident models: loaded once, failures isolated per model, device gate, guidance lookup."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import parse_config
from dicomnode.resident import GatedEnhancer, ModelUnavailable, ResidentModels, shipped_guidance
from models.registry import Enhancer, ModelInfo


def _config(tmp_path: Path, models: dict) -> object:
    data = {
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(tmp_path / "out")}},
        "models": models,
        "rules": [{"name": f"r-{n}", "match": {"Modality": "OP"}, "model": n, "destinations": ["out"]} for n in models],
    }
    return parse_config(data, tmp_path)


def _corrupt_weights(tmp_path: Path) -> Path:
    w = tmp_path / "broken.pt"
    w.write_bytes(b"not the weights the card describes")
    w.with_suffix(".json").write_text(json.dumps({"kind": "hqgnet", "name": "HQG-Net", "version": "1", "config": {},
                                                  "weights_sha256": "0" * 64}))
    return w


def test_corrupt_weights_fail_that_model_only(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    cfg = _config(tmp_path, {"good": {"kind": "clahe"}, "bad": {"kind": "hqgnet", "weights": str(_corrupt_weights(tmp_path))}})
    resident = ResidentModels.load(cfg)
    assert set(resident.models) == {"good"}
    reason = resident.failures["bad"]
    assert "bad" in reason and "broken.pt" in reason and "corrupt" in reason
    with pytest.raises(ModelUnavailable, match="corrupt"):
        resident.get("bad")
    assert any("bad" in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)
    # the good model serves
    bound = resident.bind("good", "OP")
    out = bound.enhancer.enhance([np.linspace(0, 1, 64, dtype=np.float32).reshape(8, 8)])
    assert out[0].shape == (8, 8)
    assert bound.guidance_id is None  # CLAHE takes no guidance


def test_missing_weights_fail_clearly(tmp_path: Path) -> None:
    cfg = _config(tmp_path, {"m": {"kind": "hqgnet", "weights": str(tmp_path / "nope.pt")}})
    resident = ResidentModels.load(cfg)
    assert "not found" in resident.failures["m"] and not resident.models
    with pytest.raises(ModelUnavailable, match="not configured"):
        resident.get("other")


def test_models_are_loaded_once_and_shared(tmp_path: Path) -> None:
    resident = ResidentModels.load(_config(tmp_path, {"a": {"kind": "clahe"}}))
    e1, e2 = resident.bind("a", "OP").enhancer, resident.bind("a", "XC").enhancer
    assert e1.inner is e2.inner is resident.get("a").enhancer
    assert resident.get("a").device == "cpu" or resident.get("a").device.startswith("cuda")


class _Slow(Enhancer):
    info = ModelInfo(kind="slow", name="Slow", version="1")

    def __init__(self) -> None:
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()

    def enhance(self, images, guidance=None):
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        return list(images)


def test_device_gate_serialises_inference() -> None:
    inner = _Slow()
    gate = threading.BoundedSemaphore(1)
    gated = [GatedEnhancer(inner, gate) for _ in range(3)]
    threads = [threading.Thread(target=g.enhance, args=([np.zeros((2, 2), np.float32)],)) for g in gated]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inner.peak == 1
    assert sum(g.waited_seconds for g in gated) > 0.04


def test_shipped_guidance_discovery(tmp_path: Path) -> None:
    w = tmp_path / "hqgnet-x.pt"
    for name in ("hqgnet-x.guidance-default.json", "hqgnet-x.guidance-OP.json", "other.guidance-ES.json"):
        (tmp_path / name).write_text("{}")
    assert set(shipped_guidance(w)) == {"default", "OP"}
    assert shipped_guidance(None) == {}
