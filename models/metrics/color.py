"""Colour fidelity: what a model did to hue and saturation, and to the surround it should not touch.

* :func:`delta_e` (paired sets): mean CIEDE2000 between output and reference, the perceptual colour
  difference (about 1 = just noticeable, 2-3 = visible at a glance).
* :func:`chroma_shift` (unpaired sets): mean CIEDE2000 between output and input with the output's
  lightness set to the input's, so brightening or contrast is not counted, only a change of hue or
  saturation (a cast).
* :func:`border_damage`: mean absolute change (0-255 scale) where the input's field of view ends and
  its black surround begins; an enhancer must leave the surround as it was.

All three take an optional boolean field-of-view mask. Gray images have no colour: their ΔE values are
computed on lightness alone (a gray image cannot have a cast: ``chroma_shift`` is 0).
"""

from __future__ import annotations

import numpy as np
from skimage.color import deltaE_ciede2000, rgb2lab

from models.metrics._common import same_shape, to_float

__all__ = ["border_damage", "chroma_shift", "delta_e"]


def _lab(img: np.ndarray) -> np.ndarray:
    f = to_float(img)
    rgb = f if f.ndim == 3 else np.repeat(f[..., None], 3, axis=2)
    return rgb2lab(np.clip(rgb, 0, 1).astype(np.float64))


def _masked_mean(values: np.ndarray, mask: np.ndarray | None) -> float:
    if mask is not None:
        values = values[np.asarray(mask, dtype=bool)]
    return float(values.mean()) if values.size else float("nan")


def delta_e(output: np.ndarray, reference: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean CIEDE2000 colour difference between ``output`` and ``reference`` (inside ``mask``)."""
    output, reference = same_shape(output, reference)
    return _masked_mean(deltaE_ciede2000(_lab(output), _lab(reference)), mask)


def chroma_shift(output: np.ndarray, source: np.ndarray, mask: np.ndarray | None = None) -> float:
    """Mean CIEDE2000 between output and source with lightness removed (the output's L* := the source's)."""
    output, source = same_shape(output, source)
    if to_float(output).ndim == 2 and to_float(source).ndim == 2:
        return 0.0
    lab_out, lab_src = _lab(output), _lab(source)
    lab_out[..., 0] = lab_src[..., 0]
    return _masked_mean(deltaE_ciede2000(lab_out, lab_src), mask)


def border_damage(output: np.ndarray, source: np.ndarray, field: np.ndarray | None) -> float:
    """Mean |output - source| (0-255) outside the source's field of view; 0 when the image has no surround."""
    output, source = same_shape(output, source)
    if field is None or np.asarray(field, dtype=bool).all():
        return 0.0
    diff = np.abs(to_float(output) - to_float(source)) * 255.0
    diff = diff.mean(axis=2) if diff.ndim == 3 else diff
    return float(diff[~np.asarray(field, dtype=bool)].mean())
