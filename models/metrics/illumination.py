"""StillGAN's measures for confocal/fundus images: nerve SNR and illumination uniformity.

``snr`` is the paper's Table I metric: the brightest traced nerve (centre-line) pixel against the
spread of the background, where the background excludes a disk dilation of radius ``r`` around
the tracings so that fibre edges do not count as noise. ``illumination_uniformity`` turns the
illumination regulariser (Eq. 5) into a metric: the mean absolute bicubic-upsampled difference
between patch means and the global mean, averaged over 48- and 96-pixel patches.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy.ndimage import binary_dilation
from skimage.morphology import disk
from skimage.transform import resize

from models.metrics._common import check_image, to_gray

SNR_RADII = (3, 5, 7, 9)


def _mask(mask: np.ndarray, shape: tuple[int, int], name: str) -> np.ndarray:
    m = np.asarray(mask)
    if m.ndim == 3:
        m = m.max(axis=2)
    if m.shape != shape:
        raise ValueError(f"{name} has shape {m.shape}, the image {shape}")
    return m > (0.5 * m.max() if m.dtype.kind == "f" else 0) if m.dtype != bool else m


def snr(image: np.ndarray, centerline_mask: np.ndarray, r: int = 3) -> float:
    """SNR in dB = 10 log10(max(I_signal)^2 / var(I_background)).

    ``centerline_mask``: nonzero on the traced nerve centre lines (1 px wide tracings, same H, W).
    Background = every pixel farther than a disk of radius ``r`` from the tracings.
    """
    gray = to_gray(check_image(image))
    mask = _mask(centerline_mask, gray.shape, "centerline_mask")
    if not mask.any():
        raise ValueError("centerline_mask marks no pixels: SNR needs traced centre lines")
    if r < 0:
        raise ValueError(f"SNR radius must be >= 0, got {r}")
    near = binary_dilation(mask, structure=disk(r)) if r > 0 else mask
    background = gray[~near]
    if background.size < 2:
        raise ValueError(f"no background left outside the radius-{r} dilation of the centre lines")
    var = float(background.var())
    peak = float(gray[mask].max())
    if var == 0.0:
        return float("inf")
    if peak == 0.0:
        return float("-inf")
    return float(10.0 * np.log10(peak**2 / var))


def _patch_means(gray: np.ndarray, patch: int) -> np.ndarray:
    """Means of non-overlapping ``patch`` x ``patch`` tiles; partial edge tiles use their pixels."""
    h, w = gray.shape
    nh, nw = -(-h // patch), -(-w // patch)
    padded = np.full((nh * patch, nw * patch), np.nan)
    padded[:h, :w] = gray
    return np.nanmean(padded.reshape(nh, patch, nw, patch), axis=(1, 3))


def illumination_uniformity(image: np.ndarray, patch_sizes: Sequence[int] = (48, 96)) -> float:
    """Mean |bicubic-upsampled (patch means - global mean)| over ``patch_sizes``; lower = more uniform.

    On the [0, 1] intensity scale; 0 for an evenly lit image.
    """
    gray = to_gray(check_image(image))
    if not patch_sizes:
        raise ValueError("illumination_uniformity needs at least one patch size")
    values = []
    for p in patch_sizes:
        if p < 1:
            raise ValueError(f"patch size must be positive, got {p}")
        diff = _patch_means(gray, p) - gray.mean()
        upsampled = resize(diff, gray.shape, order=3, mode="edge", anti_aliasing=False)
        values.append(float(np.mean(np.abs(upsampled))))
    return float(np.mean(values))
