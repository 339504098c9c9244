"""Field of view: where a fundus camera or an endoscope actually imaged, as opposed to its black surround.

Fundus photographs show a round disc and endoscopy frames an octagon or a rounded rectangle on black;
the surround carries no anatomy, yet a model that lifts it (red speckle, a bright rim) or a metric
that averages over it (SSIM rewarding a painted surround) both mislead. The mask is found from the
image itself:

1. luminance (the channel maximum, so a saturated red disc still counts as bright), smoothed with a
   Gaussian of about 1 % of the shorter side so JPEG noise and thin overlay strokes do not split it;
2. "dark" = below a threshold relative to the frame's own bright level (``0.2 * p95``, kept within
   [0.03, 0.12]), so a dim but real image is not mistaken for surround;
3. the surround is the dark region connected to the frame border; the field is the largest remaining
   component (which drops burnt-in text or a timestamp sitting in the surround) and then its convex
   hull: a camera's or endoscope's field is convex, so a dark lumen or a dim, vignetted edge that
   touches the rim stays inside instead of being cut out as a notch.

The work is done on a copy whose longer side is at most 512 px, so an 8-megapixel photograph costs
about as much as a small frame.

A frame whose field covers nearly everything (``full_fraction``) has no surround: the mask is all ones.
"""

from __future__ import annotations

import cv2
import numpy as np
from scipy import ndimage as ndi
from skimage.morphology import convex_hull_image

from models.color import intensity, unit_range

WORK_SIDE = 512

__all__ = ["fov_mask", "has_surround", "feather", "keep_surround"]


def _luminance(img: np.ndarray) -> np.ndarray:
    a = np.asarray(img, dtype=np.float32)
    return intensity(a) if a.ndim == 3 else a


def fov_mask(img: np.ndarray, *, full_fraction: float = 0.97) -> np.ndarray:
    """Boolean (H, W) mask, True inside the field of view. ``img``: (H, W) or (H, W, 3) in [0, 1]."""
    lum = _luminance(img)
    h, w = lum.shape
    if h < 8 or w < 8:
        return np.ones((h, w), dtype=bool)
    if max(h, w) > WORK_SIDE:
        # area averaging (anti-aliased, and far cheaper than a Gaussian at full resolution)
        scale = WORK_SIDE / max(h, w)
        small = cv2.resize(np.ascontiguousarray(lum), (max(8, round(w * scale)), max(8, round(h * scale))),
                           interpolation=cv2.INTER_AREA)
        mask = fov_mask(small, full_fraction=full_fraction)
        if mask.all():
            return np.ones((h, w), dtype=bool)
        return cv2.resize(mask.astype(np.float32), (w, h), interpolation=cv2.INTER_LINEAR) > 0.5
    sigma = max(1.0, 0.01 * min(h, w))
    smooth = ndi.gaussian_filter(lum, sigma)
    bright = float(np.percentile(smooth, 95))
    thresh = float(np.clip(0.2 * bright, 0.03, 0.12))
    dark = smooth < thresh
    labels, n = ndi.label(dark)
    if n == 0:
        return np.ones((h, w), dtype=bool)
    border = np.unique(np.concatenate([labels[0], labels[-1], labels[:, 0], labels[:, -1]]))
    border = border[border > 0]
    surround = np.isin(labels, border)
    field = ~surround
    flabels, fn = ndi.label(field)
    if fn == 0:  # everything is dark and touches the border: no field can be told apart
        return np.ones((h, w), dtype=bool)
    if fn > 1:
        sizes = ndi.sum(field, flabels, index=np.arange(1, fn + 1))
        field = flabels == (1 + int(np.argmax(sizes)))
    field = convex_hull_image(field)
    if field.mean() >= full_fraction or field.mean() < 0.05:
        return np.ones((h, w), dtype=bool)
    return field


def has_surround(mask: np.ndarray) -> bool:
    """True when the mask leaves part of the frame out (a fundus disc, an endoscope frame)."""
    return not bool(np.all(mask))


def feather(mask: np.ndarray, radius: float = 2.0) -> np.ndarray:
    """A soft float mask in [0, 1]: the hard field eroded by about ``radius`` px, then smoothed.

    Used to blend an enhanced field back into the untouched surround without a visible seam; the
    erosion keeps the blurred rim of the disc on the surround side, and the smoothing's tail is cut at the
    field's edge, so nothing outside the field changes at all.
    """
    m = np.asarray(mask, dtype=bool)
    if m.all():
        return np.ones(m.shape, dtype=np.float32)
    r = max(1, int(round(radius)))
    inner = ndi.binary_erosion(m, iterations=r)
    return np.clip(ndi.gaussian_filter(inner.astype(np.float32), radius / 2.0), 0.0, 1.0) * m


def keep_surround(original: np.ndarray, enhanced: np.ndarray, *, in_place: bool = False) -> np.ndarray:
    """``enhanced`` inside the field of view, ``original`` in its black surround, blended by :func:`feather`.

    Returns float32 in [0, 1]; frames without a surround come back as ``enhanced``. Computed in place
    (``out = original + m * (enhanced - original)``) on a copy of ``enhanced``, or on ``enhanced`` itself
    with ``in_place`` (callers that own the array): on an 8-megapixel photograph every copy is 100 MB.
    """
    src = unit_range(original)
    if in_place and isinstance(enhanced, np.ndarray) and enhanced.dtype == np.float32 and enhanced.flags.writeable:
        out = enhanced
    else:
        out = np.array(enhanced, dtype=np.float32)
    mask = fov_mask(src)
    if not has_surround(mask):
        return np.clip(out, 0.0, 1.0, out=out)
    m = feather(mask)
    if out.ndim == 3:
        m = m[..., None]
    out -= src
    out *= m
    out += src
    return np.clip(out, 0.0, 1.0, out=out)
