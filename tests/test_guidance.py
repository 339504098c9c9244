"""Guidance cache: build, load, method measurement, invalidation when the weights change."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imsave

from dicomnode import guidance as gd
from models.guidance import GUIDANCE_METHODS, PSNR_TIE_DB, extract_vectors
from models.registry import Enhancer, ModelCard, ModelInfo, sha256_file


class StatsGuided(Enhancer):
    """A small guided enhancer for cache tests: guidance = intensity statistics of the reference;
    enhance maps the input's mean/std onto the guidance's (so guidance changes the output)."""

    uses_guidance = True

    def __init__(self, weights: Path):
        self.info = ModelInfo(kind="stats", name="Stats", version="1", weights_sha256=sha256_file(weights),
                              card=ModelCard(kind="stats", channels=1, size=32))
        self.g_calls = 0

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        self.g_calls += len(images)
        return np.array([[float(i.mean()), float(i.std()), float(np.median(i))] for i in images], dtype=np.float32)

    def enhance(self, images, guidance=None):
        assert guidance is not None and guidance.shape == (3,)
        out = []
        for img in images:
            z = (img - img.mean()) / max(float(img.std()), 1e-6)
            out.append(np.clip(z * guidance[1] + guidance[0], 0, 1).astype(np.float32))
        return out


def _write_refs(folder: Path, n: int, seed: int = 0) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        img = np.clip(0.5 + 0.15 * rng.standard_normal((40, 40)) + 0.02 * i, 0, 1)
        p = folder / f"ref{i}.png"
        imsave(p, (img * 255).astype(np.uint8), check_contrast=False)
        paths.append(p)
    return paths


@pytest.fixture
def model(tmp_path: Path) -> StatsGuided:
    w = tmp_path / "w.pt"
    w.write_bytes(b"weights-a")
    return StatsGuided(w)


def test_build_save_load_roundtrip(tmp_path: Path, model: StatsGuided) -> None:
    refs = _write_refs(tmp_path / "hq", 3)
    g = gd.build(model, "m", refs, modality="OP", method="mean")
    assert g.n_refs == 3 and g.method == "mean" and g.vector.shape == (3,)
    assert g.weights_sha256 == model.info.weights_sha256
    assert g.refs_sha256 == gd.refs_sha256(list(reversed(refs)))  # order does not matter
    path = gd.save(g, tmp_path / "c.json")
    back = gd.load(path)
    assert back.id == g.id and np.allclose(back.vector, g.vector) and back.modality == "OP"
    # deterministic id: same weights + references + method
    assert gd.build(model, "m", refs, modality="OP", method="mean").id == g.id
    assert gd.build(model, "m", refs[:2], modality="OP", method="mean").id != g.id


def test_single_is_the_medoid_reference(tmp_path: Path, model: StatsGuided) -> None:
    refs = _write_refs(tmp_path / "hq", 5)
    g = gd.build(model, "m", refs, method="single")
    vectors = extract_vectors(model, gd.load_references(refs, 1))
    assert any(np.allclose(g.vector, v) for v in vectors)


def test_resolve_builds_once_then_loads_from_cache(tmp_path: Path, model: StatsGuided) -> None:
    _write_refs(tmp_path / "hq", 3)
    g1 = gd.resolve(model, "m", "OP", tmp_path / "hq", tmp_path / "var")
    calls = model.g_calls
    assert calls == 3 and len(gd.list_cached(tmp_path / "var")) == 1
    g2 = gd.resolve(model, "m", "OP", tmp_path / "hq", tmp_path / "var")
    assert model.g_calls == calls, "second start-up must not run G again"
    assert g2.id == g1.id


def test_cache_for_other_weights_is_refused(tmp_path: Path, model: StatsGuided) -> None:
    refs = _write_refs(tmp_path / "hq", 2)
    path = gd.save(gd.build(model, "m", refs), tmp_path / "c.json")
    w2 = tmp_path / "w2.pt"
    w2.write_bytes(b"weights-b")
    other = StatsGuided(w2)
    with pytest.raises(gd.GuidanceError, match="other weights"):
        gd.resolve(other, "m", "OP", path, tmp_path / "var")


def test_reference_folder_rebuilds_for_new_weights(tmp_path: Path, model: StatsGuided) -> None:
    _write_refs(tmp_path / "hq", 2)
    g1 = gd.resolve(model, "m", "OP", tmp_path / "hq", tmp_path / "var")
    w2 = tmp_path / "w2.pt"
    w2.write_bytes(b"weights-b")
    other = StatsGuided(w2)
    g2 = gd.resolve(other, "m", "OP", tmp_path / "hq", tmp_path / "var")
    assert g2.weights_sha256 == other.info.weights_sha256 != g1.weights_sha256
    assert g2.id != g1.id and other.g_calls == 2


def test_changed_references_rebuild(tmp_path: Path, model: StatsGuided) -> None:
    _write_refs(tmp_path / "hq", 2)
    g1 = gd.resolve(model, "m", "OP", tmp_path / "hq", tmp_path / "var")
    _write_refs(tmp_path / "hq", 3, seed=1)
    g2 = gd.resolve(model, "m", "OP", tmp_path / "hq", tmp_path / "var")
    assert g2.refs_sha256 != g1.refs_sha256 and g2.n_refs == 3


def test_corrupt_cache_file_is_refused_with_reason(tmp_path: Path, model: StatsGuided) -> None:
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(gd.GuidanceError, match="not readable JSON"):
        gd.resolve(model, "m", "OP", bad, tmp_path / "var")
    bad.write_text(json.dumps({"format": 1, "id": "x"}))
    with pytest.raises(gd.GuidanceError, match="not a valid guidance record"):
        gd.load(bad)


def test_measure_methods_records_figures_and_choice(tmp_path: Path, model: StatsGuided) -> None:
    refs = _write_refs(tmp_path / "hq", 4)
    rng = np.random.default_rng(3)
    hq = [np.clip(0.5 + 0.15 * rng.standard_normal((32, 32)), 0, 1).astype(np.float32) for _ in range(3)]
    lq = [np.clip(0.3 * h + 0.1, 0, 1).astype(np.float32) for h in hq]  # low contrast, dark
    g = gd.build(model, "m", refs, method="auto", heldout=(lq, hq))
    m = g.measurements
    assert set(m["methods"]) == set(GUIDANCE_METHODS) and m["n_heldout"] == 3
    assert g.method == m["chosen"]
    best = max(r["psnr"] for r in m["methods"].values())
    assert m["methods"][g.method]["psnr"] >= best - PSNR_TIE_DB
    assert m["methods"][g.method]["psnr"] > m["input"]["psnr"]  # guidance restores the contrast
    assert "PSNR" in gd.describe(g)


def test_nearest_picks_the_most_similar_exemplar() -> None:
    ex = np.array([[1, 0, 0], [0, 1, 0]], dtype=np.float32)
    g = gd.Guidance(id="g", model="m", modality="OP", vector=ex.mean(0), method="nearest", weights_sha256="a",
                    refs_sha256="b", n_refs=2, exemplars=ex)
    assert np.allclose(g.vector_for(np.array([0.1, 0.9, 0])), ex[1])
    assert np.allclose(g.vector_for(None), ex.mean(0))


def test_cli_build_and_show(tmp_path: Path, model: StatsGuided, monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    from dicomnode.cli import main

    _write_refs(tmp_path / "hq", 2)
    w = tmp_path / "w.pt"
    monkeypatch.setattr("models.registry.load_checkpoint", lambda weights, device="auto", options=None: StatsGuided(Path(weights)))
    out = tmp_path / "g.json"
    assert main(["guidance", "build", "--weights", str(w), "--model", "m", "--hq", str(tmp_path / "hq"),
                 "--modality", "OP", "--method", "mean", "--out", str(out)]) == 0
    assert gd.load(out).modality == "OP"
    assert main(["guidance", "show", str(out)]) == 0
    assert "method=mean" in capsys.readouterr().out
    assert main(["guidance", "build", "--weights", str(w), "--hq", str(tmp_path / "nothing"), "--out", str(out)]) == 1


def test_guidance_strength_is_measured_and_applied(tmp_path: Path, model: StatsGuided) -> None:
    """Targets half as bright and contrasty as the references: the guidance at half strength restores them
    best, so the cache keeps half the vector (a different id), and a file without ``scale`` reads as 1."""
    from models.guidance import GuidanceMathError, measure_scales

    refs = _write_refs(tmp_path / "hq", 4)
    rng = np.random.default_rng(5)
    hq = [np.clip(0.25 + 0.075 * rng.standard_normal((32, 32)), 0, 1).astype(np.float32) for _ in range(3)]
    lq = [np.clip(0.5 * h + 0.3, 0, 1).astype(np.float32) for h in hq]
    plain = gd.build(model, "m", refs, method="mean", heldout=(lq, hq))
    scaled = gd.build(model, "m", refs, method="mean", heldout=(lq, hq), scales=(0.25, 0.5, 0.75, 1.0))
    strength = scaled.measurements["strength"]
    assert strength["chosen_scale"] == 0.5 == scaled.scale and plain.scale == 1.0
    assert strength["scales"]["0.5"]["psnr"] > strength["scales"]["1"]["psnr"] + 3
    assert np.allclose(scaled.vector, 0.5 * plain.vector) and scaled.id != plain.id
    back = gd.load(gd.save(scaled, tmp_path / "s.json"))
    assert back.scale == 0.5 and np.allclose(back.vector, scaled.vector) and back.id == scaled.id
    data = json.loads((tmp_path / "s.json").read_text())
    del data["scale"]
    assert gd.Guidance.from_json(data).scale == 1.0  # caches written before the strength was measured
    with pytest.raises(GuidanceMathError, match="scales"):
        measure_scales(model, np.ones((2, 3), np.float32), lq, hq, "mean", scales=(0.0,))


def test_strength_ties_go_to_the_scale_nearest_one(model: StatsGuided) -> None:
    """Scales go above 1 (an under-correcting model), so a tie must not favour the largest: among scales within
    0.1 dB of the best, the one nearest x1 (the vectors G produces) wins; an edge above 1 wins when it is best."""
    from models.guidance import measure_scales

    lq = [np.full((8, 8), 0.5, np.float32)]
    hq = [np.full((8, 8), 0.5, np.float32)]

    def flat(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        return {"psnr": 30.0, "ssim": 1.0}  # every strength scores the same: a tie everywhere

    tied = measure_scales(model, np.ones((2, 3), np.float32), lq, hq, "mean", scales=(0.25, 0.5, 1.0, 2.0), metric=flat)
    assert tied["chosen_scale"] == 1.0

    calls: list[int] = []

    def grows(out: np.ndarray, ref: np.ndarray) -> dict[str, float]:
        calls.append(1)  # scales are scored in increasing order: the later, the better
        return {"psnr": 20.0 + len(calls), "ssim": 1.0}

    assert measure_scales(model, np.ones((2, 3), np.float32), lq, hq, "mean", scales=(0.5, 1.0, 2.0), metric=grows)["chosen_scale"] == 2.0
