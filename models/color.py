"""Colour conversions shared by every enhancer and metric: one definition of each.

* **Intensity** (HSV value, the channel maximum) is what a gray model sees of a colour frame;
  :func:`apply_to_intensity` scales R, G and B by the new/old intensity ratio, which keeps hue and
  saturation exactly. An RGB model given a gray frame sees it in three channels and its output is
  read back through the same intensity.
* **CIELAB** (sRGB, D65) is for colour fidelity: :func:`keep_chroma` keeps the input's a*, b* and
  takes only the lightness L* of an enhanced frame (the colour-preserving output mode), and the
  ΔE metrics compare colours in it. float32 throughout, so an 8-megapixel photograph converts in
  well under a second.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

__all__ = ["apply_to_intensity", "intensity", "keep_chroma", "lab_to_rgb", "rgb_to_lab", "unit_range"]

_RGB_TO_XYZ = np.array([[0.4124564, 0.3575761, 0.1804375],
                        [0.2126729, 0.7151522, 0.0721750],
                        [0.0193339, 0.1191920, 0.9503041]], dtype=np.float32)
_XYZ_TO_RGB = np.linalg.inv(_RGB_TO_XYZ.astype(np.float64)).astype(np.float32)
_WHITE = np.array([0.95047, 1.0, 1.08883], dtype=np.float32)  # D65
_EPS = 216.0 / 24389.0
_KAPPA = 24389.0 / 27.0


def unit_range(image: np.ndarray) -> np.ndarray:
    """``image`` as float32 in [0, 1], copied only when it is not already: frames are often 100+ MB."""
    a = np.asarray(image, dtype=np.float32)
    return np.clip(a, 0.0, 1.0) if a.size and (a.min() < 0.0 or a.max() > 1.0) else a


def intensity(rgb: np.ndarray) -> np.ndarray:
    """The HSV value (channel maximum) of an (H, W, 3) frame in [0, 1].

    Two element-wise maxima rather than ``max(axis=2)``: numpy's reduction over a 3-wide last axis is
    about 10x slower on a large photograph."""
    a = np.asarray(rgb, dtype=np.float32)
    return np.maximum(np.maximum(a[..., 0], a[..., 1]), a[..., 2])


def apply_to_intensity(image: np.ndarray, op: Callable[[np.ndarray], np.ndarray]) -> np.ndarray:
    """Apply a gray transform ``op`` ([0,1] -> [0,1]) to a frame; for RGB to its intensity, keeping hue.

    A uniform frame (blank, all black) has no contrast to enhance and passes through unchanged.
    Black pixels have no hue to keep: they take the new intensity as neutral gray.
    """
    img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
    value = img if img.ndim == 2 else intensity(img)
    if float(value.max() - value.min()) < 1e-6:
        return img
    new = np.clip(np.asarray(op(value), dtype=np.float32), 0, 1)
    if img.ndim == 2:
        return new
    dark = value <= 1e-6
    gain = new / np.maximum(value, 1e-6)
    out = img * gain[..., None]  # in place from here: a photograph is tens of megabytes per copy
    if dark.any():
        out[dark] = new[dark][:, None]
    return np.clip(out, 0, 1, out=out)


def _srgb_to_linear(c: np.ndarray) -> np.ndarray:
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4).astype(np.float32)


def _linear_to_srgb(c: np.ndarray) -> np.ndarray:
    c = np.clip(c, 0.0, 1.0)
    return np.where(c <= 0.0031308, c * 12.92, 1.055 * np.power(c, 1 / 2.4) - 0.055).astype(np.float32)


def rgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] (..., 3) -> CIELAB (L* in [0, 100]), D65."""
    lin = _srgb_to_linear(np.clip(np.asarray(rgb, dtype=np.float32), 0.0, 1.0))
    xyz = lin @ _RGB_TO_XYZ.T / _WHITE
    f = np.where(xyz > _EPS, np.cbrt(xyz), (_KAPPA * xyz + 16.0) / 116.0).astype(np.float32)
    lab = np.empty_like(f)
    lab[..., 0] = 116.0 * f[..., 1] - 16.0
    lab[..., 1] = 500.0 * (f[..., 0] - f[..., 1])
    lab[..., 2] = 200.0 * (f[..., 1] - f[..., 2])
    return lab


def _lab_to_linear(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> linear RGB, not clipped (values outside [0, 1] are outside the sRGB gamut)."""
    lab = np.asarray(lab, dtype=np.float32)
    fy = (lab[..., 0] + 16.0) / 116.0
    fx = fy + lab[..., 1] / 500.0
    fz = fy - lab[..., 2] / 200.0
    f = np.stack([fx, fy, fz], axis=-1)
    xyz = np.where(f**3 > _EPS, f**3, (116.0 * f - 16.0) / _KAPPA) * _WHITE
    return (xyz @ _XYZ_TO_RGB.T).astype(np.float32)


def lab_to_rgb(lab: np.ndarray) -> np.ndarray:
    """CIELAB (D65) -> sRGB in [0, 1]; colours outside the gamut are clipped."""
    return _linear_to_srgb(_lab_to_linear(lab))


def _into_gamut(lab: np.ndarray, steps: int = 10) -> np.ndarray:
    """sRGB of (N, 3) CIELAB colours; those outside the sRGB gamut keep their L* and hue angle and lose
    just enough chroma to fit (a*, b* scaled by the largest factor that fits, to 1/2**steps, by bisection).
    Clipping each channel instead moves a brightened orange towards yellow-green and darkens it."""
    lab = np.array(lab, dtype=np.float32)
    lin = _lab_to_linear(lab)
    out = ((lin < -1e-5) | (lin > 1.0 + 1e-5)).any(axis=1)
    if out.any():
        far = lab[out]
        lo = np.zeros(len(far), dtype=np.float32)  # grey of the same lightness: always inside
        hi = np.ones(len(far), dtype=np.float32)
        for _ in range(steps):
            mid = (lo + hi) / 2
            trial = far.copy()
            trial[:, 1:] *= mid[:, None]
            t = _lab_to_linear(trial)
            fits = ((t >= -1e-5) & (t <= 1.0 + 1e-5)).all(axis=1)
            lo, hi = np.where(fits, mid, lo), np.where(fits, hi, mid)
        far[:, 1:] *= lo[:, None]
        lin[out] = _lab_to_linear(far)
    return _linear_to_srgb(lin)


def limit_chroma(original: np.ndarray, enhanced: np.ndarray, limit: float) -> np.ndarray:
    """The enhanced frame with its chroma (a*, b*) moved at most ``limit`` CIELAB units from the original's.

    A correction may remove a small cast (haze is a coloured veil) but not repaint a real image in another
    camera's colours; 0 is :func:`keep_chroma`. OpenCV's conversion and the same gamut mapping as there.
    """
    import cv2  # noqa: PLC0415 - as in keep_chroma

    src = cv2.cvtColor(np.ascontiguousarray(unit_range(original)), cv2.COLOR_RGB2Lab)
    lab = cv2.cvtColor(np.ascontiguousarray(unit_range(enhanced)), cv2.COLOR_RGB2Lab)
    shift = lab[..., 1:] - src[..., 1:]
    norm = np.sqrt((shift * shift).sum(axis=-1, keepdims=True))
    lab[..., 1:] = src[..., 1:] + shift * np.minimum(1.0, limit / np.maximum(norm, 1e-6))
    return _lab_to_rgb_in_gamut(lab)


def _lab_to_rgb_in_gamut(lab: np.ndarray) -> np.ndarray:
    """OpenCV's Lab -> sRGB, with colours outside the gamut brought in at constant L* and hue (:func:`_into_gamut`)
    rather than clipped channel by channel: a brightened orange optic disc must not turn yellow-green."""
    import cv2  # noqa: PLC0415 - as in keep_chroma

    rgb = cv2.cvtColor(lab, cv2.COLOR_Lab2RGB)  # OpenCV clips colours outside the gamut channel by channel
    np.clip(rgb, 0.0, 1.0, out=rgb)
    # candidates: a channel at a bound (black, the blue of a fundus, a white disc), black itself excluded; only
    # those really outside the gamut are mapped (an 8-megapixel fundus: 2.6 -> ~0.5 s)
    edge = np.flatnonzero((((rgb >= 1.0 - 1e-4) | (rgb <= 1e-4)).any(axis=-1) & (lab[..., 0] > 0.5)).ravel())
    if edge.size:
        flat_lab, flat_rgb = lab.reshape(-1, 3), rgb.reshape(-1, 3)
        lin = _lab_to_linear(flat_lab[edge])
        # beyond about one 8-bit level (linear 3e-4 at black, 3e-3 at white): less is what clipping does anyway
        outside = edge[((lin < -3e-4) | (lin > 1.0 + 3e-3)).any(axis=1)]
        if outside.size:
            flat_rgb[outside] = _into_gamut(flat_lab[outside])
    return rgb


def keep_chroma(original: np.ndarray, enhanced: np.ndarray) -> np.ndarray:
    """The enhanced frame's lightness with the original's chroma (a*, b*): a correction that cannot shift colour.

    A lightness raised beyond what the original's chroma allows in sRGB is brought into the gamut by
    lowering the chroma at constant lightness and hue (:func:`_into_gamut`), not by clipping each
    channel, which would change the hue and lower the lightness.

    OpenCV's sRGB <-> CIELAB (D65) conversion does the work: it runs on every frame the colour model
    outputs, at full resolution, and is about 10x faster than :func:`rgb_to_lab` on an 8-megapixel
    photograph (0.05 vs 0.4-1.8 s). It agrees with it to within 0.7 in a*/b* and round-trips to 4e-4; the
    metrics keep the exact formulas above.
    """
    import cv2  # noqa: PLC0415 - OpenCV only here: the metrics and the rest of the module are numpy

    lab = cv2.cvtColor(np.ascontiguousarray(unit_range(original)), cv2.COLOR_RGB2Lab)
    lab[..., 0] = cv2.cvtColor(np.ascontiguousarray(unit_range(enhanced)), cv2.COLOR_RGB2Lab)[..., 0]
    # where a channel would hit a bound the colour lies outside the gamut: mapped in by lowering its chroma at
    # constant L* and hue (a brightened orange optic disc must not turn yellow and darker); few pixels, exact formulas
    return _lab_to_rgb_in_gamut(lab)
