"""Synthetic degradations: reproducible, shape/dtype-preserving, and each does what its name says."""

from __future__ import annotations

import numpy as np
import pytest
from skimage import data, transform

from models import degrade as D
from models.metrics import average_gradient, illumination_uniformity, psnr


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    return transform.resize(data.camera(), (128, 160), anti_aliasing=True)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    return transform.resize(data.astronaut(), (128, 128), anti_aliasing=True)


@pytest.mark.parametrize("kind", [*D.KINDS, "mixed"])
def test_every_kind_is_seeded_and_keeps_shape(kind, gray, rgb):
    for img in (gray, rgb, np.round(rgb * 255).astype(np.uint8)):
        out = D.degrade(img, kind, seed=3)
        assert out.shape == img.shape and out.dtype == np.float32
        assert 0.0 <= out.min() and out.max() <= 1.0
        np.testing.assert_array_equal(out, D.degrade(img, kind, seed=3))
        assert not np.array_equal(out, D.degrade(img, kind, seed=4))
        assert psnr(img, out) < 40  # visibly damaged


@pytest.mark.parametrize("kind", D.KINDS)
def test_zero_severity_is_identity(kind, rgb):
    np.testing.assert_allclose(D.degrade(rgb, kind, seed=1, severity=0.0), rgb, atol=1e-6)


@pytest.fixture(scope="module")
def texture() -> np.ndarray:
    """Evenly lit fine texture: any large-scale shading in a result comes from the degradation."""
    from scipy.ndimage import gaussian_filter

    t = gaussian_filter(np.random.default_rng(0).standard_normal((128, 160)), 1.5)
    return np.clip(0.5 + 0.2 * t / t.std(), 0, 1)


def test_each_kind_has_its_effect(texture, gray):
    uni = illumination_uniformity(texture)
    ag, std = average_gradient(gray), gray.std()
    for seed in range(3):
        assert illumination_uniformity(D.degrade(texture, "vignetting", seed)) > uni + 0.01
        assert illumination_uniformity(D.degrade(texture, "illumination", seed)) > uni + 0.01
        assert average_gradient(D.degrade(gray, "blur", seed)) < 0.8 * ag
        assert average_gradient(D.degrade(gray, "noise", seed)) > 1.2 * ag
        assert D.degrade(gray, "low_contrast", seed).std() < 0.75 * std
        hazy = D.degrade(gray, "haze", seed)
        assert hazy.mean() > gray.mean() and hazy.std() < 0.75 * std


def test_stronger_severity_damages_more(gray):
    assert psnr(gray, D.degrade(gray, "mixed", 5, severity=0.5)) > psnr(gray, D.degrade(gray, "mixed", 5, severity=1.5))


def test_mixed_plan_draws_from_its_pool():
    for seed in range(20):
        steps = D.plan("mixed", seed, "ccm")
        assert 2 <= len(steps) <= 3 and len(set(steps)) == len(steps)
        assert set(steps) <= set(D.PRESETS["ccm"])
        assert steps == [k for k in D.KINDS if k in steps]  # physical order: noise last
    assert D.plan("blur", 0) == ["blur"]
    assert {tuple(D.plan("mixed", s)) for s in range(30)}.__len__() > 5  # varied combinations
    assert set(D.plan("mixed", 0, ["haze", "noise"])) == {"haze", "noise"}


def test_bad_arguments_are_named(gray):
    with pytest.raises(ValueError, match="unknown degradation 'fog'"):
        D.degrade(gray, "fog")
    with pytest.raises(ValueError, match="preset 'xray'"):
        D.degrade(gray, "mixed", pool="xray")
    with pytest.raises(ValueError, match="pool"):
        D.degrade(gray, "mixed", pool=["haze", "smoke"])
    with pytest.raises(ValueError, match="severity"):
        D.degrade(gray, "blur", severity=-1)


def test_degrade_many_uses_consecutive_seeds(gray):
    outs = list(D.degrade_many([gray, gray], "noise", seed=7))
    np.testing.assert_array_equal(outs[0], D.degrade(gray, "noise", 7))
    np.testing.assert_array_equal(outs[1], D.degrade(gray, "noise", 8))
