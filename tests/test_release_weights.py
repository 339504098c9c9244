"""scripts/release_weights.py: the validation stage the release choices are made on, run on the shipped
colour weights with small synthetic validation pairs (the shared data are not needed)."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "models" / "weights"


@pytest.fixture(scope="module")
def release():
    spec = importlib.util.spec_from_file_location("release_weights", REPO / "scripts" / "release_weights.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["release_weights"] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("release_weights", None)


def _disc_image(rng: np.random.Generator, size: int = 160) -> np.ndarray:
    """An RGB disc on a black surround, like a fundus or endoscopy frame."""
    yy, xx = np.mgrid[:size, :size]
    inside = (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (0.45 * size) ** 2
    texture = rng.random((size // 8, size // 8, 3))
    img = np.kron(texture, np.ones((8, 8, 1))) * 0.6 + 0.2
    return (img * inside[..., None] * 255).astype(np.uint8)


def _pairs(root: Path, domains: tuple[str, ...]) -> None:
    rng = np.random.default_rng(0)
    for kind in ("lq", "hq"):
        (root / "val_pairs" / kind).mkdir(parents=True)
    for domain in domains:
        for i in range(2):
            hq = _disc_image(rng)
            lq = (hq.astype(np.float32) * 0.6).astype(np.uint8)  # darker: something to correct
            Image.fromarray(hq).save(root / "val_pairs" / "hq" / f"{domain}_{i}.png")
            Image.fromarray(lq).save(root / "val_pairs" / "lq" / f"{domain}_{i}.png")


@pytest.mark.skipif(not (WEIGHTS / "hqgnet-color.pt").is_file(), reason="shipped colour weights missing")
def test_validate_scores_each_domain_of_the_shared_colour_model(release, tmp_path: Path) -> None:
    _pairs(tmp_path / "color", ("fundus", "endoscopy"))
    summary = release.validate("color", tmp_path, WEIGHTS / "hqgnet-color.pt", tmp_path / "out")
    assert set(summary) == {"fundus", "endoscopy"}
    for domain, table in summary.items():
        model = next(m for m in table["methods"] if m.startswith("hqgnet"))
        assert {"input", "clahe"} <= set(table["methods"])
        assert table["count"][model]["psnr"] == 2, domain  # its own two pairs, not the other domain's
        assert np.isfinite(table["mean"][model]["psnr"])
        assert "guidance_effect" in table  # two caches: the effect between them is measured
    assert (tmp_path / "out" / "validation.json").is_file()


@pytest.mark.skipif(not (WEIGHTS / "hqgnet-color.pt").is_file(), reason="shipped colour weights missing")
def test_validate_of_a_single_modality_model_reads_only_its_domain(release, tmp_path: Path) -> None:
    """A per-modality model (``--target fundus``) is scored on fundus pairs only, with its one cache."""
    _pairs(tmp_path / "fundus", ("fundus", "endoscopy"))  # the colour split holds both domains
    weights = tmp_path / "w" / "hqgnet-fundus.pt"
    weights.parent.mkdir()
    shutil.copyfile(WEIGHTS / "hqgnet-color.pt", weights)
    shutil.copyfile(WEIGHTS / "hqgnet-color.json", weights.with_suffix(".json"))
    shutil.copyfile(WEIGHTS / "hqgnet-color.guidance-OP.json", weights.with_name("hqgnet-fundus.guidance-OP.json"))
    summary = release.validate("fundus", tmp_path, weights, tmp_path / "out")
    assert set(summary) == {"fundus"}
    assert "guidance_effect" not in summary["fundus"]  # one cache: nothing to compare
