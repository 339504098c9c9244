"""Veil removal with a dark-channel prior measured on the modality's HQ images.

A scattering veil (lens fog, a dirty window, cataract) adds light: ``I = J t + A (1 - t)``, with the veil's
colour ``A`` and a smooth transmission ``t``. In a clear photograph some channel is dark somewhere in every
neighbourhood (the *dark channel*: the minimum over channels and a small window); a veil lifts it towards
the local mean. Both are linear in the image, so with ``dark' = t dark + 1 - t`` and ``mean' = t mean + 1 - t``
(on ``I / A``) and a clear scene's ratio ``dark = r0 mean``, the veil is
``1 - t = (dark' - r0 mean') / (1 - r0)``. ``r0`` is measured on the modality's training HQ images (inside
their fields of view, stored beside the field-normalisation targets). Inverting the model,
``J = (I - A) / t + A``, lowers the veiled level and restores contrast in one step.

Why a ratio: brighter light (an endoscope's lamp nearer the mucosa) raises the dark channel and the mean
together and leaves their ratio alone, so it is not mistaken for a veil; a veil raises the dark channel
towards the mean. A frame that is simply dark (a deep lumen) is not lifted into a grey veil either. Pixel
noise is not amplified with the detail: the part of the finest detail within ``noise_guard`` noise
deviations keeps its input amplitude. The chroma moves at most ``chroma_limit`` CIELAB units (the veil's
warm tint is removed, a real image is not repainted), and the black surround of the field of view neither
enters the statistics nor changes. Figures and the choice of the options: ``docs/models.md`` ("Veil removal").
"""

from __future__ import annotations

import math

import cv2
import numpy as np

from models.classical import _builder
from models.color import limit_chroma, unit_range
from models.fieldnorm import Targets, _to_full, _working_copy, shipped_targets
from models.fov import feather, fov_mask

PATCH = 0.03  # the dark channel's minimum window, as a fraction of sqrt(field area)
SMOOTH = 0.05  # the transmission's Gaussian sigma, same unit
AIR_FRACTION = 0.002  # the veil colour: mean of the pixels with the highest dark channel (this fraction)
MIN_AIR = 0.5


def _channels(img: np.ndarray) -> np.ndarray:
    return img if img.ndim == 3 else img[..., None]


def airlight(img: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The veil's colour: the mean of the field's pixels whose channel minimum is highest (at least 0.5)."""
    x = _channels(img)[field]
    if not len(x):
        return np.ones(_channels(img).shape[-1], dtype=np.float32)
    low = x.min(axis=1)
    top = x[low >= np.quantile(low, 1.0 - AIR_FRACTION)]
    return np.maximum(top.mean(axis=0), MIN_AIR).astype(np.float32)


def _field_smooth(values: np.ndarray, field: np.ndarray, side: float) -> np.ndarray:
    """Gaussian smoothing (SMOOTH x the field's side) normalised by the field's weight: the surround pulls
    nothing towards black."""
    m = field.astype(np.float32)
    v = np.where(field, np.minimum(values, 1.0), 0.0).astype(np.float32)
    sigma = max(0.5, SMOOTH * side)
    return cv2.GaussianBlur(v * m, (0, 0), sigma) / (cv2.GaussianBlur(m, (0, 0), sigma) + 1e-6)


def _side(field: np.ndarray) -> float:
    return math.sqrt(max(1.0, float(field.sum())))


def dark_channel(img: np.ndarray, air: np.ndarray, field: np.ndarray) -> np.ndarray:
    """min over channels of ``img / air``, then over a window of PATCH x the field's side, then smoothed
    (SMOOTH); the surround is ignored by the minimum and by the smoothing."""
    side = _side(field)
    dc = (_channels(img) / air).min(axis=2).astype(np.float32)
    dc[~field] = np.inf  # the surround never wins the minimum
    size = max(3, int(PATCH * side) | 1)
    dc = cv2.erode(dc, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
    return _field_smooth(dc, field, side)


def local_mean(img: np.ndarray, air: np.ndarray, field: np.ndarray) -> np.ndarray:
    """The mean over channels of ``img / air``, smoothed as the dark channel is (SMOOTH, surround ignored)."""
    return _field_smooth((_channels(img) / air).mean(axis=2), field, _side(field))


def dark_ratio(img: np.ndarray) -> float:
    """The median of dark channel / local mean of one clear image inside its field of view (what ``r0`` is
    made of)."""
    small = _working_copy(unit_range(img))
    field = fov_mask(small)
    air = airlight(small, field)
    ratio = dark_channel(small, air, field) / np.maximum(local_mean(small, air, field), 1e-3)
    return float(np.median(ratio[field]))


def _unamplified_noise(img: np.ndarray, k: float) -> np.ndarray:
    """The part of the finest detail (a 1 px Gaussian band) within ``k`` robust noise deviations of zero,
    per channel: what the transmission should not amplify."""
    band = img - cv2.GaussianBlur(img, (0, 0), 1.0)
    step = max(1, int(math.sqrt(img.shape[0] * img.shape[1] / 1e6)))  # the deviation from about 1 M pixels
    field = fov_mask(img[::step, ::step])
    sample = _channels(band[::step, ::step])
    values = sample[field] if field.any() else sample.reshape(-1, sample.shape[-1])
    sigma = np.median(np.abs(values), axis=0) / 0.6745  # Donoho's MAD: detail is sparse, noise is not
    limit = (k * sigma).astype(np.float32) if img.ndim == 3 else np.float32(k * sigma[0])
    return np.clip(band, -limit, limit)


def dehaze(
    image: np.ndarray,
    targets: str | Targets = "endoscopy",
    omega: float = 1.0,
    min_transmission: float = 0.75,
    chroma_limit: float = 3.0,
    noise_guard: float = 3.0,
) -> np.ndarray:
    """Remove as veil what lifts the dark channel above the modality's clear ratio ``r0`` of the local mean.

    ``omega`` < 1 leaves a trace of the veil; ``min_transmission`` bounds the contrast gain (1 / t, by
    default at most 1.33: a varying gain reshapes local structure, chosen on the training frames);
    ``chroma_limit`` bounds the colour change (CIELAB units); ``noise_guard`` (noise deviations, 0 = off)
    keeps pixel noise at its input amplitude.
    """
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if not 0.05 <= min_transmission <= 1.0:
        raise ValueError(f"min_transmission must be in [0.05, 1], got {min_transmission}")
    if not chroma_limit >= 0.0:
        raise ValueError(f"chroma_limit must be >= 0, got {chroma_limit}")
    if not 0.0 <= noise_guard <= 10.0:
        raise ValueError(f"noise_guard must be in [0, 10], got {noise_guard}")
    img = unit_range(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {img.shape}")
    prior = targets if not isinstance(targets, str) else shipped_targets(targets)
    r0 = prior.dark_ratio if img.ndim == 3 else prior.dark_ratio_grey  # a grey frame's "dark channel" is its luminance
    if r0 is None or not 0.0 <= r0 < 1.0:
        raise ValueError(f"the {prior.modality!r} targets have no dark-channel ratio: regenerate them (scripts/fieldnorm_targets.py)")
    small = _working_copy(img)  # the dark channel and t are smooth: computed on a copy at most 512 px wide
    field = fov_mask(small)
    air = airlight(small, field)
    lifted = dark_channel(small, air, field) - r0 * local_mean(small, air, field)
    veil = np.clip(lifted / (1.0 - r0), 0.0, 1.0) * omega
    t = np.maximum(1.0 - veil, min_transmission)
    if not field.all():  # the surround keeps t = 1 (unchanged), the edge feathered as fieldnorm's
        t = 1.0 - feather(field) * field * (1.0 - t)
    t = _to_full(t.astype(np.float32), img.shape[:2])
    a = air if img.ndim == 3 else air[0]
    t = t[..., None] if img.ndim == 3 else t
    if noise_guard > 0:  # J = (I - n - A) / t + A + n: the noise n keeps its amplitude
        noise = _unamplified_noise(img, noise_guard)
        out = (img - noise - a) / t + a + noise
    else:
        out = (img - a) / t + a
    np.clip(out, 0.0, 1.0, out=out)
    if img.ndim == 3:
        out = limit_chroma(img, out, chroma_limit)
    return out.astype(np.float32, copy=False)


# registry kind ``dehaze`` (models.registry), with the classical enhancers' option checking and provenance
build = _builder("dehaze", "Veil removal (dark-channel prior)", dehaze,
                 {"targets", "omega", "min_transmission", "chroma_limit", "noise_guard"})
