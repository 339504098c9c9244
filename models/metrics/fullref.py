"""Paired (full-reference) metrics: PSNR and SSIM against a ground-truth image.

Both images are scaled to [0, 1] by their dtype first, which makes the data range 1 and the
result identical to computing in native units with the dtype's range (255, 65535 or 1).
"""

from __future__ import annotations

import numpy as np
from skimage.metrics import structural_similarity

from models.metrics._common import same_shape, to_float


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Peak signal-to-noise ratio in dB; ``inf`` for identical images. ``mask``: only those pixels count."""
    a, b = same_shape(a, b)
    err = (to_float(a, "a") - to_float(b, "b")) ** 2
    if mask is not None:
        err = err[np.asarray(mask, dtype=bool)]
    mse = float(np.mean(err))
    if mse == 0.0:
        return float("inf")
    return float(10.0 * np.log10(1.0 / mse))


def ssim(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float:
    """SSIM with scikit-image defaults (7x7 uniform window, K1 0.01, K2 0.03), mean over channels.

    ``mask``: the SSIM map is averaged over those pixels only (e.g. a field of view).
    """
    a, b = same_shape(a, b)
    fa, fb = to_float(a, "a"), to_float(b, "b")
    if min(fa.shape[:2]) < 7:
        raise ValueError(f"SSIM needs images of at least 7x7 pixels, got {fa.shape[:2]}")
    if mask is None:
        return float(structural_similarity(fa, fb, data_range=1.0, channel_axis=2 if fa.ndim == 3 else None))
    _, smap = structural_similarity(fa, fb, data_range=1.0, channel_axis=2 if fa.ndim == 3 else None, full=True)
    smap = smap.mean(axis=2) if smap.ndim == 3 else smap
    return float(smap[np.asarray(mask, dtype=bool)].mean())
