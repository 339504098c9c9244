"""Resident models: loaded once, failures isolated per model, device gate, guidance lookup."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import parse_config
from dicomnode.resident import DeviceQueue, GatedEnhancer, ModelUnavailable, ResidentModels, shipped_guidance
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
    queue = DeviceQueue()
    gated = [GatedEnhancer(inner, queue) for _ in range(3)]
    threads = [threading.Thread(target=g.enhance, args=([np.zeros((2, 2), np.float32)],)) for g in gated]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert inner.peak == 1 and queue.calls == 3 and queue.merged_calls == 0  # batch_size 1: nothing to merge
    assert sum(g.waited_seconds for g in gated) > 0.04


class _Recording(_Slow):
    """Records each call's frame count; a frame holding NaN makes the whole call fail."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[int] = []

    def enhance(self, images, guidance=None):
        self.calls.append(len(images))
        if any(np.isnan(i).any() for i in images):
            raise ValueError("bad frame")
        return [i + 1 for i in super().enhance(images)]


def _concurrently(calls):
    """Run (enhancer, frames) calls while a first call holds the device, so the others queue up together."""
    results: dict[int, object] = {}

    def go(k, enhancer, frames):
        try:
            results[k] = enhancer.enhance(frames)
        except Exception as exc:
            results[k] = exc

    threads = [threading.Thread(target=go, args=(k, e, f)) for k, (e, f) in enumerate(calls)]
    threads[0].start()
    time.sleep(0.02)  # the first call is on the device
    for t in threads[1:]:
        t.start()
        time.sleep(0.005)
    for t in threads:
        t.join()
    return [results[k] for k in range(len(calls))]


def test_waiting_series_share_full_batches_and_get_their_own_frames_back() -> None:
    inner = _Recording()
    queue = DeviceQueue()
    series = [GatedEnhancer(inner, queue, batch_size=4) for _ in range(4)]
    frames = [[np.full((2, 2), 10 * k + j, np.float32) for j in range(n)] for k, n in enumerate((1, 3, 1, 2))]
    out = _concurrently(list(zip(series, frames)))
    for k, got in enumerate(out):
        assert [float(g[0, 0]) for g in got] == [10 * k + j + 1 for j in range(len(frames[k]))]
    assert inner.calls == [1, 4, 2]  # 3 + 1 filled one batch of 4; the last series' 2 did not fit
    assert queue.merged_calls == 1 and inner.peak == 1


def test_a_bad_frame_in_a_merged_call_fails_only_its_own_series() -> None:
    inner = _Recording()
    queue = DeviceQueue()
    series = [GatedEnhancer(inner, queue, batch_size=8) for _ in range(3)]
    bad = np.full((2, 2), np.nan, np.float32)
    out = _concurrently([(series[0], [np.zeros((2, 2), np.float32)]), (series[1], [np.ones((2, 2), np.float32)]),
                         (series[2], [bad])])
    assert float(out[0][0][0, 0]) == 1.0 and float(out[1][0][0, 0]) == 2.0
    assert isinstance(out[2], ValueError)
    assert inner.calls == [1, 2, 1, 1]  # the merged call failed, then each series alone


def test_different_models_or_guidance_never_share_a_call() -> None:
    a, b = _Recording(), _Recording()
    queue = DeviceQueue()
    out = _concurrently([(GatedEnhancer(a, queue, batch_size=4), [np.zeros((2, 2), np.float32)]),
                         (GatedEnhancer(b, queue, batch_size=4), [np.zeros((2, 2), np.float32)]),
                         (GatedEnhancer(a, queue, batch_size=4), [np.zeros((2, 2), np.float32)])])
    assert all(float(o[0][0, 0]) == 1.0 for o in out)
    assert a.calls == [1, 1] and b.calls == [1] and queue.merged_calls == 0


def test_shipped_guidance_discovery(tmp_path: Path) -> None:
    w = tmp_path / "hqgnet-x.pt"
    for name in ("hqgnet-x.guidance-default.json", "hqgnet-x.guidance-OP.json", "other.guidance-ES.json"):
        (tmp_path / name).write_text("{}")
    assert set(shipped_guidance(w)) == {"default", "OP"}
    assert shipped_guidance(None) == {}


@pytest.mark.parametrize("passes", [1, 4])
def test_merging_series_with_the_shipped_colour_model(tmp_path: Path, passes: int) -> None:
    weights = Path(__file__).resolve().parents[1] / "models" / "weights" / "hqgnet-color.pt"
    models = {"color": {"kind": "hqgnet", "weights": str(weights), "batch_size": 4, "options": {"batch_size": passes}},
              "alone": {"kind": "hqgnet", "weights": str(weights), "batch_size": 4, "options": {"batch_size": passes},
                        "merge_series": False}}
    resident = ResidentModels.load(_config(tmp_path, models))
    assert not resident.failures, resident.failures
    rng = np.random.default_rng(0)
    # the first series' large frame keeps the device busy while the other two queue up
    frames = [[rng.random((384, 512, 3)).astype(np.float32)]] + [[rng.random((48, 64, 3)).astype(np.float32)
                                                                  for _ in range(n)] for n in (3, 1)]
    alone = [resident.bind("color", "OP").enhancer.enhance(f) for f in frames]  # one series at a time
    queue = resident.queue(resident.get("color").device)
    before = queue.merged_calls
    merged = _concurrently([(resident.bind("color", "OP").enhancer, f) for f in frames])
    assert queue.merged_calls == before + 1  # the 3 + 1 frames of two series went through one call
    for a, m in zip(alone, merged):
        assert len(a) == len(m)
        for x, y in zip(a, m):
            if passes == 1:  # each frame in its own pass: bit for bit
                assert np.array_equal(x, y)
            else:  # neighbours in a pass: float rounding only, under one output level
                assert float(np.abs(x - y).max()) < 1 / 255
    before = queue.merged_calls
    _concurrently([(resident.bind("alone", "OP").enhancer, f) for f in frames])
    assert queue.merged_calls == before  # merge_series: false
