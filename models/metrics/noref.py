"""No-reference quality metrics: AG, EN, NIQE, BRISQUE and PIQE.

These score an enhanced image on its own, which is all one has for real low-quality scans.
AG and EN are computed on the 8-bit scale, as the HQG-Net paper reports them (AG about 1-7, EN in
bits, at most 8). NIQE is implemented here after Mittal et al. and the official MATLAB release
(96x96 blocks, two scales, MATLAB's antialiased bicubic half-size resize) with the pristine model
from basicsr (see ``data/NOTICE``); BRISQUE comes from the ``brisque`` package (its bundled LIVE
model) and PIQE from ``pypiqe`` (a port of MATLAB's ``piqe``). Lower NIQE/BRISQUE/PIQE = better.
All three run offline. Colour images are scored on MATLAB ``rgb2gray`` luminance at 8 bits.
"""

from __future__ import annotations

import functools
import warnings
from pathlib import Path

import numpy as np
from scipy.ndimage import convolve
from scipy.special import gamma as gamma_fn

from models.metrics._common import LUMA_601, LUMA_709, to_float, to_gray

DATA_DIR = Path(__file__).with_name("data")
NIQE_BLOCK = 96


def average_gradient(image: np.ndarray) -> float:
    """AG: mean of sqrt((dx^2 + dy^2) / 2) over forward differences, intensities on 0-255.

    Colour images average the per-channel AG (the usual definition for RGB fusion/enhancement).
    """
    img = to_float(image) * 255.0
    if min(img.shape[:2]) < 2:
        raise ValueError(f"average gradient needs at least 2x2 pixels, got {img.shape[:2]}")
    channels = img[..., None] if img.ndim == 2 else img
    dx = channels[:-1, 1:] - channels[:-1, :-1]
    dy = channels[1:, :-1] - channels[:-1, :-1]
    return float(np.mean(np.sqrt((dx**2 + dy**2) / 2.0)))


def entropy(image: np.ndarray) -> float:
    """EN: Shannon entropy (bits) of the 256-bin histogram of the 8-bit luminance."""
    gray = np.clip(np.round(to_gray(image, LUMA_709) * 255.0), 0, 255).astype(np.int64)
    counts = np.bincount(gray.ravel(), minlength=256).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum()) + 0.0  # + 0.0 turns -0.0 into 0.0


def _gray255(image: np.ndarray) -> np.ndarray:
    """MATLAB ``rgb2gray`` of the 8-bit image, as double in 0-255 (rounded like MATLAB's uint8)."""
    return np.round(to_gray(image, LUMA_601) * 255.0)


# ----------------------------------------------------------------------------------------- NIQE


@functools.lru_cache(maxsize=1)
def _niqe_model() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    path = DATA_DIR / "niqe_pris_params.npz"
    if not path.is_file():
        raise FileNotFoundError(f"NIQE pristine model missing: {path} (reinstall the package)")
    with np.load(path) as params:
        return (
            params["mu_pris_param"].ravel().astype(np.float64),
            params["cov_pris_param"].astype(np.float64),
            params["gaussian_window"].astype(np.float64),
        )


_AGGD_GAMMA = np.arange(0.2, 10.001, 0.001)
_AGGD_RATIO = gamma_fn(2.0 / _AGGD_GAMMA) ** 2 / (gamma_fn(1.0 / _AGGD_GAMMA) * gamma_fn(3.0 / _AGGD_GAMMA))


def _aggd_fit(x: np.ndarray) -> tuple[float, float, float]:
    """Moment-matching fit of an asymmetric generalised Gaussian: (shape, left scale, right scale)."""
    x = x.ravel()
    left, right = x[x < 0], x[x > 0]
    if left.size == 0 or right.size == 0:
        return float("nan"), float("nan"), float("nan")
    left_std = np.sqrt(np.mean(left**2))
    right_std = np.sqrt(np.mean(right**2))
    gamma_hat = left_std / right_std
    r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
    r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
    alpha = float(_AGGD_GAMMA[np.argmin((_AGGD_RATIO - r_hat_norm) ** 2)])
    scale = np.sqrt(gamma_fn(1.0 / alpha) / gamma_fn(3.0 / alpha))
    return alpha, float(left_std * scale), float(right_std * scale)


def _block_features(block: np.ndarray) -> list[float]:
    """The 18 NIQE/BRISQUE features of one block of MSCN coefficients."""
    alpha, bl, br = _aggd_fit(block)
    feats = [alpha, (bl + br) / 2.0]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # circular shifts, as in the MATLAB code
        alpha, bl, br = _aggd_fit(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * gamma_fn(2.0 / alpha) / gamma_fn(1.0 / alpha)
        feats += [alpha, mean, bl, br]
    return feats


def _cubic(x: np.ndarray) -> np.ndarray:
    ax = np.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2))


def _matlab_half_weights(n_in: int) -> tuple[np.ndarray, np.ndarray]:
    """Weights/indices of MATLAB ``imresize(x, 0.5)`` (bicubic, antialiasing) along one axis."""
    scale, width = 0.5, 4.0 / 0.5
    n_out = int(np.ceil(n_in * scale))
    x = np.arange(1, n_out + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps)[None, :]
    weights = scale * _cubic(scale * (u[:, None] - idx))
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(n_in), np.arange(n_in - 1, -1, -1)])  # symmetric padding
    idx = mirror[np.mod(idx.astype(np.int64) - 1, 2 * n_in)]
    return weights, idx


def _matlab_resize_half(img: np.ndarray) -> np.ndarray:
    w, idx = _matlab_half_weights(img.shape[0])
    img = np.einsum("ij,ijk->ik", w, img[idx])
    w, idx = _matlab_half_weights(img.shape[1])
    return np.einsum("ij,kij->ki", w, img[:, idx])


def niqe(image: np.ndarray) -> float:
    """NIQE (lower = more natural) with the standard pristine model, 96x96 blocks, no overlap.

    Needs at least two 96x96 blocks (e.g. 96x192). Blocks without structure on one side of the
    AGGD are ignored, as MATLAB's ``nanmean``/``nancov`` do.
    """
    mu_p, cov_p, window = _niqe_model()
    img = _gray255(image)
    h, w = img.shape
    nbh, nbw = h // NIQE_BLOCK, w // NIQE_BLOCK
    if nbh * nbw < 2:
        raise ValueError(f"NIQE needs at least two {NIQE_BLOCK}x{NIQE_BLOCK} blocks, got an image of {h}x{w}")
    img = img[: nbh * NIQE_BLOCK, : nbw * NIQE_BLOCK]
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(img * img, window, mode="nearest") - mu * mu))
        mscn = (img - mu) / (sigma + 1.0)
        bs = NIQE_BLOCK // scale
        per_scale.append(
            np.array([_block_features(mscn[i * bs : (i + 1) * bs, j * bs : (j + 1) * bs]) for i in range(nbh) for j in range(nbw)])
        )
        if scale == 1:
            img = _matlab_resize_half(img / 255.0) * 255.0
    feats = np.concatenate(per_scale, axis=1)
    valid = feats[~np.isnan(feats).any(axis=1)]
    if len(valid) < 2:
        raise ValueError("NIQE: too few textured blocks (the image is nearly flat)")
    mu_d = valid.mean(axis=0)
    cov_d = np.cov(valid, rowvar=False)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ diff))


# ------------------------------------------------------------------------------ BRISQUE / PIQE


@functools.lru_cache(maxsize=1)
def _brisque_model():
    with warnings.catch_warnings():  # the package imports deprecated scipy namespaces
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            from brisque import BRISQUE
        except ImportError as exc:
            raise ImportError(f"BRISQUE needs the 'brisque' package and OpenCV: pip install brisque==0.2.0 opencv-python-headless ({exc})") from exc
        return BRISQUE(url=False)


def brisque(image: np.ndarray) -> float:
    """BRISQUE score of the LIVE-trained model shipped with ``brisque`` (lower = better, ~0-100)."""
    gray = _gray255(image).astype(np.uint8)
    if min(gray.shape) < 16:
        raise ValueError(f"BRISQUE needs at least 16x16 pixels, got {gray.shape}")
    # The package converts with skimage rgb2gray, so hand it the luminance replicated to RGB.
    with warnings.catch_warnings():  # the package's float() of 1-element arrays warns on numpy 2
        warnings.simplefilter("ignore", RuntimeWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        return float(_brisque_model().score(np.repeat(gray[..., None], 3, axis=2)))


def piqe(image: np.ndarray) -> float:
    """PIQE score in [0, 100] (lower = better); a flat image scores 100, as in MATLAB."""
    try:
        from pypiqe import piqe as _piqe
    except ImportError as exc:
        raise ImportError(f"PIQE needs pypiqe and OpenCV: pip install --no-deps pypiqe==1.2; pip install opencv-python-headless ({exc})") from exc
    gray = _gray255(image).astype(np.uint8)
    if min(gray.shape) < 16:
        raise ValueError(f"PIQE needs at least 16x16 pixels, got {gray.shape}")
    if gray.max() == gray.min():
        return 100.0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(_piqe(gray)[0])
