"""Veil removal with a dark-channel prior measured on the modality's HQ images.

A scattering veil (lens fog, a dirty window, cataract) adds light: ``I = J t + A (1 - t)``, with the veil's
colour ``A`` and a smooth transmission ``t``. In a clear photograph some channel is dark somewhere in every
neighbourhood (the *dark channel*: the minimum over channels and a small window); a veil lifts it. So the
veil is ``1 - t ~ (dark(I / A) - d0) / (1 - d0)``, where ``d0`` is how high the dark channel of the
modality's *clear* images sits (the median measured on the training HQ images inside their fields of view,
stored beside the field-normalisation targets). Inverting the model, ``J = (I - A) / t + A``, lowers the
veiled level and restores contrast in one step.

Why this and not a level/contrast match for endoscopy: a frame that is simply dark (a deep lumen) has a low
dark channel, so ``t`` stays 1 and nothing is lifted into a grey veil; a frame whose level and contrast are
already right is left as it is. Only a lifted dark channel is treated. The chroma moves at most
``chroma_limit`` CIELAB units (the veil's warm tint is removed, a real image is not repainted), and the
black surround of the field of view neither enters the dark channel nor changes. Figures and the choice of
``d0``: ``docs/models.md`` ("Veil removal").
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


def dark_channel(img: np.ndarray, air: np.ndarray, field: np.ndarray) -> np.ndarray:
    """min over channels of ``img / air``, then over a window of PATCH x the field's side, then smoothed
    (SMOOTH); the surround is ignored by the minimum and by the smoothing (normalised by the field's weight)."""
    side = math.sqrt(max(1.0, float(field.sum())))
    dc = (_channels(img) / air).min(axis=2).astype(np.float32)
    dc[~field] = np.inf  # the surround never wins the minimum
    size = max(3, int(PATCH * side) | 1)
    dc = cv2.erode(dc, np.ones((size, size), np.uint8), borderType=cv2.BORDER_REPLICATE)
    m = field.astype(np.float32)
    dc = np.where(field, np.minimum(dc, 1.0), 0.0).astype(np.float32)
    sigma = max(0.5, SMOOTH * side)
    den = cv2.GaussianBlur(m, (0, 0), sigma) + 1e-6
    return cv2.GaussianBlur(dc * m, (0, 0), sigma) / den


def dark_level(img: np.ndarray) -> float:
    """The median dark channel of one clear image inside its field of view (what ``d0`` is made of)."""
    small = _working_copy(unit_range(img))
    field = fov_mask(small)
    return float(np.median(dark_channel(small, airlight(small, field), field)[field]))


def dehaze(
    image: np.ndarray,
    targets: str | Targets = "endoscopy",
    omega: float = 0.85,
    min_transmission: float = 0.35,
    chroma_limit: float = 3.0,
) -> np.ndarray:
    """Remove the part of the dark channel above the modality's clear level ``d0`` as a veil.

    ``omega`` < 1 leaves a trace of the veil (depth cue; 0.85 was chosen on the training frames), ``min_transmission`` bounds the contrast gain
    (1 / t, here at most 2.9), ``chroma_limit`` bounds the colour change (CIELAB units).
    """
    if not 0.0 <= omega <= 1.0:
        raise ValueError(f"omega must be in [0, 1], got {omega}")
    if not 0.05 <= min_transmission <= 1.0:
        raise ValueError(f"min_transmission must be in [0.05, 1], got {min_transmission}")
    if not chroma_limit >= 0.0:
        raise ValueError(f"chroma_limit must be >= 0, got {chroma_limit}")
    img = unit_range(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {img.shape}")
    prior = targets if not isinstance(targets, str) else shipped_targets(targets)
    d0 = prior.dark if img.ndim == 3 else prior.dark_grey  # a grey frame's "dark channel" is its luminance
    if d0 is None or not 0.0 <= d0 < 1.0:
        raise ValueError(f"the {prior.modality!r} targets have no dark-channel level: regenerate them (scripts/fieldnorm_targets.py)")
    small = _working_copy(img)  # the dark channel and t are smooth: computed on a copy at most 512 px wide
    field = fov_mask(small)
    air = airlight(small, field)
    veil = np.clip((dark_channel(small, air, field) - d0) / (1.0 - d0), 0.0, 1.0) * omega
    t = np.maximum(1.0 - veil, min_transmission)
    if not field.all():  # the surround keeps t = 1 (unchanged), the edge feathered as fieldnorm's
        t = 1.0 - feather(field) * field * (1.0 - t)
    t = _to_full(t.astype(np.float32), img.shape[:2])
    a = air if img.ndim == 3 else air[0]
    out = (img - a) / (t[..., None] if img.ndim == 3 else t) + a
    np.clip(out, 0.0, 1.0, out=out)
    if img.ndim == 3:
        out = limit_chroma(img, out, chroma_limit)
    return out.astype(np.float32, copy=False)


# registry kind ``dehaze`` (models.registry), with the classical enhancers' option checking and provenance
build = _builder("dehaze", "Veil removal (dark-channel prior)", dehaze,
                 {"targets", "omega", "min_transmission", "chroma_limit"})
