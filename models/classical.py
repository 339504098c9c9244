"""Classical enhancers: CLAHE, global histogram equalisation and multi-scale Retinex.

They need no weights, run on the CPU, and serve both as baselines in `dicomnode evaluate` and as
node models (``kind: clahe | histeq | retinex``) usable before any trained weights exist.
Colour images are processed on their intensity only and the chroma is kept, so hues do not shift.
With the ``fov`` option (fundus, endoscopy) the black surround of a colour frame's field of view is
kept as it was: equalisation otherwise lifts it (measured: 4.6-8.6 grey levels on held-out frames).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from scipy.ndimage import gaussian_filter
from skimage import exposure

from models.color import apply_to_intensity
from models.fov import keep_surround
from models.registry import Enhancer, ModelInfo

VERSION = "1.0"


def _as_float(image: np.ndarray) -> np.ndarray:
    img = np.asarray(image, dtype=np.float32)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {img.shape}")
    return np.clip(img, 0.0, 1.0)


def clahe(image: np.ndarray, clip_limit: float = 0.01, kernel_fraction: float = 1 / 8) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation (scikit-image), tiles of 1/8 the image."""

    if not clip_limit > 0 or not 0 < kernel_fraction <= 1:
        raise ValueError(f"clahe needs clip_limit > 0 and 0 < kernel_fraction <= 1, got {clip_limit}, {kernel_fraction}")

    def op(gray: np.ndarray) -> np.ndarray:
        kernel = max(8, int(min(gray.shape) * kernel_fraction))
        return exposure.equalize_adapthist(gray, kernel_size=kernel, clip_limit=clip_limit)

    return apply_to_intensity(_as_float(image), op)


def histeq(image: np.ndarray, nbins: int = 256) -> np.ndarray:
    """Global histogram equalisation."""
    return apply_to_intensity(_as_float(image), lambda g: exposure.equalize_hist(g, nbins=nbins))


def retinex(image: np.ndarray, sigmas: Sequence[float] = (0.02, 0.1, 0.3), clip_percent: float = 1.0) -> np.ndarray:
    """Multi-scale Retinex on intensity (MSRCP-style chroma preservation).

    ``sigmas`` are fractions of the shorter image side, so the method behaves the same at any
    resolution; the log-ratio output is stretched between the ``clip_percent`` percentiles.
    """

    if not sigmas or any(float(s) <= 0 for s in sigmas):
        raise ValueError(f"retinex sigmas must be a non-empty list of positive fractions, got {list(sigmas)}")
    if not 0 <= clip_percent < 50:
        raise ValueError(f"retinex clip_percent must be in [0, 50), got {clip_percent}")

    def op(gray: np.ndarray) -> np.ndarray:
        eps = 1e-4
        side = min(gray.shape)
        log_img = np.log(gray + eps)
        msr = np.zeros_like(gray, dtype=np.float64)
        for frac in sigmas:
            msr += log_img - np.log(gaussian_filter(gray.astype(np.float64), sigma=max(1.0, frac * side)) + eps)
        msr /= len(sigmas)
        lo, hi = np.percentile(msr, [clip_percent, 100 - clip_percent])
        if hi - lo < 1e-9:
            return gray
        return (msr - lo) / (hi - lo)

    return apply_to_intensity(_as_float(image), op)


class ClassicalEnhancer(Enhancer):
    """Adapter from a per-image function to the node's Enhancer interface."""

    def __init__(self, kind: str, name: str, func, params: Mapping[str, Any], *, fov: bool = False):
        options = {**params, **({"fov": True} if fov else {})}
        self.info = ModelInfo(kind=kind, name=name, version=VERSION, weights_sha256=None, options=options)
        self._func = func
        self._params = dict(params)
        self.fov = fov

    def _one(self, img: np.ndarray) -> np.ndarray:
        out = self._func(img, **self._params)
        if self.fov and np.ndim(img) == 3:
            out = keep_surround(img, out, in_place=True)  # out is this call's own array
        return out

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        return [self._one(img) for img in images]


def _builder(kind: str, name: str, func, allowed: set[str]):
    def build(*, weights: Path | None, device: str, options: dict[str, Any]) -> Enhancer:
        options = dict(options)
        fov = options.pop("fov", False)
        if not isinstance(fov, bool):
            raise ValueError(f"{kind}: option fov must be true or false, got {fov!r}")
        unknown = set(options) - allowed
        if unknown:
            raise ValueError(f"{kind}: unknown option(s) {sorted(unknown)}; allowed: {sorted(allowed | {'fov'})}")
        if weights is not None:
            raise ValueError(f"{kind}: takes no weights")
        # Try the options on a small ramp now, so a bad value fails at start-up, not on the first study.
        probe = np.linspace(0, 1, 32 * 32, dtype=np.float32).reshape(32, 32)
        try:
            if not np.isfinite(func(probe, **options)).all():
                raise ValueError("the output is not finite")
        except (TypeError, ValueError, ArithmeticError) as exc:
            raise ValueError(f"{kind}: invalid option value(s) {options}: {exc}") from exc
        # The full parameter set, defaults included, so that provenance and derived UIDs name what ran.
        defaults = {k: p.default for k, p in inspect.signature(func).parameters.items() if p.default is not p.empty}
        return ClassicalEnhancer(kind, name, func, {**defaults, **options}, fov=fov)

    return build


build_clahe = _builder("clahe", "CLAHE", clahe, {"clip_limit", "kernel_fraction"})
build_histeq = _builder("histeq", "Histogram equalisation", histeq, {"nbins"})
build_retinex = _builder("retinex", "Multi-scale Retinex", retinex, {"sigmas", "clip_percent"})
