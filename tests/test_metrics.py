"""Metrics on hand-computed cases, dtype handling, and no-reference rankings of clean vs degraded."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter
from skimage import data, transform

from models import metrics as M


@pytest.fixture(scope="module")
def clean() -> np.ndarray:
    """A 192 x 256 natural gray photo (two NIQE blocks wide)."""
    return transform.resize(data.camera(), (192, 256), anti_aliasing=True)


# ------------------------------------------------------------------------------------ PSNR/SSIM


def test_psnr_of_known_mse():
    a = np.zeros((8, 8), dtype=np.uint8)
    b = a.copy()
    b[:4] = 10  # half the pixels off by 10/255: MSE = 50 (8-bit units)
    assert M.psnr(a, b) == pytest.approx(10 * math.log10(255**2 / 50.0), abs=1e-9)
    # The same pair as uint16 (x257) and as floats gives the same PSNR: data range follows dtype.
    assert M.psnr(a.astype(np.uint16) * 257, b.astype(np.uint16) * 257) == pytest.approx(M.psnr(a, b))
    assert M.psnr(a / 255.0, b / 255.0) == pytest.approx(M.psnr(a, b))
    assert M.psnr(a, a) == math.inf


def test_ssim_identity_and_order(clean):
    assert M.ssim(clean, clean) == pytest.approx(1.0)
    light, heavy = gaussian_filter(clean, 1), gaussian_filter(clean, 3)
    assert 1.0 > M.ssim(clean, light) > M.ssim(clean, heavy)
    rgb = np.dstack([clean] * 3)
    assert M.ssim(rgb, rgb) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="differ in shape"):
        M.ssim(clean, clean[:-1])


def test_unsupported_dtype_and_shape_are_named():
    with pytest.raises(ValueError, match="int32"):
        M.psnr(np.zeros((8, 8), np.int32), np.zeros((8, 8), np.int32))
    with pytest.raises(ValueError, match="RGB"):
        M.entropy(np.zeros((8, 8, 2)))
    with pytest.raises(ValueError, match="NaN"):
        M.average_gradient(np.full((8, 8), np.nan))


# ------------------------------------------------------------------------------------- AG / EN


def test_entropy_of_two_levels_is_one_bit():
    img = np.zeros((10, 10), dtype=np.uint8)
    img[:, 5:] = 200
    assert M.entropy(img) == pytest.approx(1.0)
    assert M.entropy(np.full((10, 10), 7, np.uint8)) == 0.0
    assert M.entropy(np.arange(256, dtype=np.uint8).reshape(16, 16)) == pytest.approx(8.0)
    four = np.repeat(np.array([0, 60, 120, 250], np.uint8), 25).reshape(10, 10)
    assert M.entropy(four) == pytest.approx(2.0)


def test_average_gradient_of_a_ramp():
    # Horizontal ramp rising 3 grey levels per column: dx = 3, dy = 0 -> AG = sqrt(9 / 2).
    ramp = np.tile(np.arange(0, 60, 3, dtype=np.uint8), (12, 1))
    assert M.average_gradient(ramp) == pytest.approx(3 / math.sqrt(2))
    # A float ramp on [0, 1] is measured on the same 8-bit scale.
    assert M.average_gradient(ramp / 255.0) == pytest.approx(3 / math.sqrt(2))
    assert M.average_gradient(np.full((5, 5), 0.3)) == 0.0
    # RGB averages its channels.
    rgb = np.dstack([ramp, np.zeros_like(ramp), np.zeros_like(ramp)])
    assert M.average_gradient(rgb) == pytest.approx(3 / math.sqrt(2) / 3)


# ------------------------------------------------------------------------ no-reference rankings


def test_no_reference_metrics_prefer_clean(clean):
    rng = np.random.default_rng(0)
    noisy = np.clip(clean + rng.normal(0, 0.08, clean.shape), 0, 1)
    blurred = gaussian_filter(clean, 2.5)
    for metric in (M.niqe, M.brisque, M.piqe):
        score = metric(clean)
        assert np.isfinite(score)
        assert score < metric(noisy), metric.__name__
        assert score < metric(blurred), metric.__name__
    assert M.average_gradient(clean) > M.average_gradient(blurred)


def test_no_reference_metrics_accept_rgb_and_uint(clean):
    u8 = np.round(clean * 255).astype(np.uint8)
    rgb = np.dstack([u8] * 3)
    for metric in (M.niqe, M.brisque, M.piqe):
        assert metric(rgb) == pytest.approx(metric(u8), abs=1e-6)
        assert metric(u8.astype(np.uint16) * 257) == pytest.approx(metric(u8), abs=1e-6)


def test_niqe_matches_the_reference_algorithm():
    """basicsr's calculate_niqe, run here on the same image, where installed (`make test` installs it); the
    full comparison on the holdout images is in test_metric_references.py. Without basicsr: the value it
    gave once (3.0962066 with older SciPy / OpenCV; 3.0963769 with SciPy 1.17), to 1e-3."""
    image = data.camera()
    try:
        from test_metric_references import _basicsr_niqe

        reference = _basicsr_niqe().calculate_niqe(image, crop_border=0, input_order="HW", convert_to="y")
    except pytest.skip.Exception:
        assert M.niqe(image) == pytest.approx(3.0962066, abs=1e-3)
    else:
        assert M.niqe(image) == pytest.approx(reference, abs=1e-6)


def test_niqe_needs_two_blocks():
    with pytest.raises(ValueError, match="96x96"):
        M.niqe(np.zeros((100, 100)))


def test_piqe_of_flat_image_is_worst():
    assert M.piqe(np.full((64, 64), 0.5)) == 100.0


# ---------------------------------------------------------------------------------------- SNR


def _line_image(bg_std: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = np.clip(0.2 + rng.normal(0, bg_std, (64, 64)), 0, 1)
    mask = np.zeros((64, 64), bool)
    mask[32, 8:56] = True
    img[31:34, 8:56] = 0.9  # a 3-px bright fibre around the traced centre line
    return img, mask


def test_snr_on_a_synthetic_line():
    img, mask = _line_image(0.02)
    # The background excludes the disk-dilated line, so it is pure noise: SNR = 10 log10(0.9^2 / var).
    from scipy.ndimage import binary_dilation
    from skimage.morphology import disk

    for r in M.SNR_RADII:
        bg = img[~binary_dilation(mask, structure=disk(r))]
        assert M.snr(img, mask, r) == pytest.approx(10 * np.log10(0.81 / bg.var()))
    # Less background noise = higher SNR.
    assert M.snr(*_line_image(0.01), r=3) > M.snr(*_line_image(0.04), r=3)
    # With r = 0 the fibre's bright edge pixels fall in the background and pull SNR down.
    assert M.snr(img, mask, 0) < M.snr(img, mask, 3)


def test_snr_errors():
    img, mask = _line_image(0.02)
    with pytest.raises(ValueError, match="no pixels"):
        M.snr(img, np.zeros_like(mask), 3)
    with pytest.raises(ValueError, match="shape"):
        M.snr(img, mask[:-1], 3)


# --------------------------------------------------------------------- illumination uniformity


def test_illumination_uniformity():
    flat = np.full((192, 192), 0.4)
    assert M.illumination_uniformity(flat) == pytest.approx(0.0, abs=1e-12)
    yy, xx = np.mgrid[:192, :192]
    vignette = 0.6 * np.exp(-((yy - 96) ** 2 + (xx - 96) ** 2) / (2 * 60.0**2))
    ramp = 0.2 + 0.4 * xx / 191
    u_vig, u_ramp = M.illumination_uniformity(vignette), M.illumination_uniformity(ramp)
    assert u_vig > 0.03 and u_ramp > 0.05
    # Half the illumination contrast = half the score (the measure is linear in intensity).
    assert M.illumination_uniformity(0.2 + 0.2 * xx / 191) == pytest.approx(u_ramp / 2, rel=1e-6)
    # Fine texture averages out inside patches: uneven lighting dominates the score.
    checker = 0.4 + 0.2 * ((yy // 4 + xx // 4) % 2)
    assert M.illumination_uniformity(checker) < 0.01 < u_ramp


# --------------------------------------------------------------------------- segmentation metrics


def test_segmentation_metrics_on_small_masks():
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0], [0, 0, 0, 0]], bool)
    # TP = 2, FP = 1, FN = 2, TN = 11
    assert M.dice(pred, truth) == pytest.approx(2 * 2 / (3 + 4))
    assert M.sensitivity(pred, truth) == pytest.approx(0.5)
    assert M.specificity(pred, truth) == pytest.approx(11 / 12)
    assert M.g_mean(pred, truth) == pytest.approx(math.sqrt(0.5 * 11 / 12))
    assert M.dice(truth, truth) == 1.0
    assert M.dice(np.zeros((3, 3)), np.zeros((3, 3))) == 1.0
    # uint8 masks (0/255) count the same as bool.
    assert M.dice(pred.astype(np.uint8) * 255, truth.astype(np.uint8)) == M.dice(pred, truth)


def test_auc():
    truth = np.array([[1, 1, 0, 0]], bool)
    assert M.auc(np.array([[0.9, 0.8, 0.1, 0.2]]), truth) == 1.0
    assert M.auc(np.array([[0.1, 0.2, 0.9, 0.8]]), truth) == 0.0
    # Pairs (pos, neg): (0.9>0.5), (0.9>0.1), (0.3<0.5), (0.3>0.1) -> 3/4
    assert M.auc(np.array([[0.9, 0.3, 0.5, 0.1]]), truth) == pytest.approx(0.75)
    assert M.auc(np.full((1, 4), 0.5), truth) == pytest.approx(0.5)  # ties count one half
    with pytest.raises(ValueError, match="both"):
        M.auc(np.zeros((2, 2)), np.zeros((2, 2), bool))
