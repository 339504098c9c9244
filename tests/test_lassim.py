"""LaSSIM: exactness against the authors' OpenCV recipe, input handling, and the Table I property."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter, map_coordinates, uniform_filter
from skimage import data, transform
from skimage.color import rgb2gray
from skimage.metrics import structural_similarity

from models.metrics import lassim, ssim
from models.metrics.lassim import pyr_down, pyr_up


def _u8(img: np.ndarray) -> np.ndarray:
    return np.clip(np.round(img * 255.0), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def rgb() -> np.ndarray:
    """A natural RGB photo at the authors' working size (272 x 480)."""
    return _u8(transform.resize(data.astronaut(), (272, 480), anti_aliasing=True))


@pytest.fixture(scope="module")
def gray() -> np.ndarray:
    return _u8(transform.resize(data.camera(), (256, 256), anti_aliasing=True))


def _box_blur(img: np.ndarray, k: int = 17) -> np.ndarray:
    """The authors' strong blur: a k x k box filter."""
    size = (k, k) if img.ndim == 2 else (k, k, 1)
    return np.clip(np.round(uniform_filter(img.astype(np.float64), size=size, mode="reflect")), 0, 255).astype(np.uint8)


def _elastic(img: np.ndarray, alpha: float, sigma: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    h, w = img.shape[:2]
    dy = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    dx = gaussian_filter(rng.uniform(-1, 1, (h, w)), sigma) * alpha
    yy, xx = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    chans = [img] if img.ndim == 2 else [img[..., c] for c in range(3)]
    out = [map_coordinates(c.astype(np.float64), [yy + dy, xx + dx], order=1, mode="reflect") for c in chans]
    res = out[0] if img.ndim == 2 else np.stack(out, axis=-1)
    return np.clip(np.round(res), 0, 255).astype(np.uint8)


@pytest.mark.parametrize("shape", [(16, 16), (17, 13), (5, 9), (48, 48), (33, 20), (3, 3), (2, 5), (271, 480)])
def test_pyramid_matches_opencv_exactly(shape):
    cv2 = pytest.importorskip("cv2")
    a = np.random.default_rng(sum(shape)).random(shape)
    down = cv2.pyrDown(a)
    np.testing.assert_allclose(pyr_down(a), down, rtol=0, atol=1e-12)
    up = cv2.pyrUp(down, dstsize=(shape[1], shape[0]))
    np.testing.assert_allclose(pyr_up(down, shape), up, rtol=0, atol=1e-12)


def test_pyr_up_rejects_impossible_size():
    with pytest.raises(ValueError, match="cannot map"):
        pyr_up(np.zeros((4, 4)), (10, 8))


def _reference_lassim(a: np.ndarray, b: np.ndarray, level: int = 3) -> float:
    """The authors' published recipe (OpenCV pyramid, 5 levels, skimage SSIM), for RGB input."""
    cv2 = pytest.importorskip("cv2")

    def residual(img):
        gauss = [rgb2gray(img)]
        for _ in range(5):
            gauss.append(cv2.pyrDown(gauss[-1]))
        size = (gauss[level].shape[1], gauss[level].shape[0])
        return cv2.subtract(gauss[level], cv2.pyrUp(gauss[level + 1], dstsize=size))

    ra, rb = residual(a), residual(b)
    rng = max(ra.max(), rb.max()) - min(ra.min(), rb.min())
    return structural_similarity(ra, rb, data_range=rng)


@pytest.mark.parametrize("level", [1, 2, 3])
def test_matches_reference_recipe(rgb, level):
    other = _box_blur(_elastic(rgb, 100, 2.5, seed=level))
    assert lassim(rgb, other, level=level) == pytest.approx(_reference_lassim(rgb, other, level), abs=1e-10)


def test_identical_images_score_one(rgb, gray):
    assert lassim(rgb, rgb) == pytest.approx(1.0)
    assert lassim(gray, gray.copy()) == pytest.approx(1.0)
    assert lassim(np.zeros((64, 64)), np.zeros((64, 64))) == 1.0


def test_dtypes_and_gray_agree(rgb):
    blurred = _box_blur(rgb, 9)
    ref = lassim(rgb, blurred)
    # uint16 holding the same values (x257 maps 255 -> 65535) and float in [0, 1] give the same score.
    assert lassim(rgb.astype(np.uint16) * 257, blurred.astype(np.uint16) * 257) == pytest.approx(ref, abs=1e-9)
    assert lassim(rgb / 255.0, blurred.astype(np.float32) / 255.0) == pytest.approx(ref, abs=1e-6)
    # Gray input is the luminance itself: a gray image equals its 3-channel copy.
    g, gb = rgb[..., 1], blurred[..., 1]
    assert lassim(g, gb) == pytest.approx(lassim(np.dstack([g] * 3), np.dstack([gb] * 3)), abs=1e-6)
    assert lassim(rgb, blurred) == pytest.approx(lassim(blurred, rgb), abs=1e-12)


def test_table1_blur_keeps_lassim_high_while_deformation_lowers_it(rgb, gray):
    for img in (rgb, gray):
        blur = _box_blur(img)
        deform_blur = _box_blur(_elastic(img, 100, 2.5, seed=0))
        ssim_blur, ssim_deform = ssim(img, blur), ssim(img, deform_blur)
        la_blur, la_deform = lassim(img, blur), lassim(img, deform_blur)
        assert ssim_blur < 0.65 < la_blur - 0.2  # blur wrecks SSIM but not LaSSIM
        assert la_blur - la_deform > 0.2  # LaSSIM sees the moved structures...
        assert la_blur - la_deform > 2 * (ssim_blur - ssim_deform)  # ...far better than SSIM does


def test_shift_lowers_lassim(gray):
    assert lassim(gray, np.roll(gray, 6, axis=1)) < 0.8


def test_bad_inputs():
    with pytest.raises(ValueError, match="too small"):
        lassim(np.zeros((40, 40)), np.zeros((40, 40)))
    with pytest.raises(ValueError, match="differ in shape"):
        lassim(np.zeros((64, 64)), np.zeros((64, 65)))
    with pytest.raises(ValueError, match="level"):
        lassim(np.zeros((256, 256)), np.zeros((256, 256)), level=5)
    with pytest.raises(ValueError, match="RGB"):
        lassim(np.zeros((64, 64, 4)), np.zeros((64, 64, 4)))
