"""Seeded, modality-like degradations of clean images, for paired benchmarks and training pairs.

Real low-quality scans have no clean twin, so full-reference metrics (PSNR, SSIM, LaSSIM against
the truth) need synthetic damage that looks like the real thing: confocal microscopy suffers
vignetting, low contrast and noise; fundus photographs haze, uneven illumination and defocus.
Every kind draws its strength from a seeded generator, works on gray (H, W) or RGB (H, W, 3)
images in [0, 1] (uint8/uint16 are scaled) and sizes its spatial parameters relative to the
image, so a 384-px crop and a 3000-px photograph are damaged alike. ``severity`` scales all
strengths (1 = the default ranges, 0 = no change).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
from scipy.ndimage import convolve, gaussian_filter

from models.metrics._common import to_float

Rng = np.random.Generator

# Order matters for "mixed": lighting and optics act before the sensor adds noise.
KINDS: tuple[str, ...] = ("vignetting", "illumination", "haze", "low_contrast", "blur", "noise")
# Which damage each modality typically shows; "mixed" draws from one of these pools.
PRESETS: dict[str, tuple[str, ...]] = {
    "ccm": ("vignetting", "low_contrast", "noise", "blur"),
    "fundus": ("illumination", "haze", "blur", "low_contrast"),
    "endoscopy": ("illumination", "haze", "blur", "noise"),
    "generic": KINDS,
}


def _grid(shape: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates: y, x in [-1, 1] scaled by the shorter side (isotropic)."""
    h, w = shape[:2]
    s = min(h, w) / 2.0
    yy, xx = np.mgrid[:h, :w].astype(np.float64)
    return (yy - (h - 1) / 2.0) / s, (xx - (w - 1) / 2.0) / s


def _gain(img: np.ndarray, gain: np.ndarray) -> np.ndarray:
    return img * (gain[..., None] if img.ndim == 3 else gain)


def vignetting(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Radial fall-off from an off-centre optical axis (confocal/endoscope optics)."""
    yy, xx = _grid(img.shape)
    cy, cx = rng.uniform(-0.25, 0.25, size=2)
    strength = severity * rng.uniform(0.45, 0.75)
    power = rng.uniform(1.5, 2.5)
    r = np.sqrt((yy - cy) ** 2 + (xx - cx) ** 2) / np.sqrt(2.0)
    return _gain(img, np.clip(1.0 - strength * r**power, 0.05, 1.0))


def illumination(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Uneven lighting: a tilted plane plus a broad bright or dark blob, multiplicative."""
    yy, xx = _grid(img.shape)
    angle = rng.uniform(0, 2 * np.pi)
    plane = np.cos(angle) * xx + np.sin(angle) * yy
    cy, cx = rng.uniform(-0.8, 0.8, size=2)
    width = rng.uniform(0.4, 0.9)
    blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * width**2)) * rng.choice([-1.0, 1.0])
    field = rng.uniform(0.2, 0.35) * plane + rng.uniform(0.2, 0.4) * blob
    return _gain(img, np.clip(1.0 + severity * field, 0.1, 2.0))


def haze(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Scattering veil I = J t + A (1 - t) with a smoothly varying transmission (cataract, fog)."""
    yy, xx = _grid(img.shape)
    t0 = rng.uniform(0.45, 0.7)
    angle = rng.uniform(0, 2 * np.pi)
    t = np.clip(t0 + 0.12 * (np.cos(angle) * xx + np.sin(angle) * yy), 0.2, 0.95)
    t = 1.0 - severity * (1.0 - t)
    air = rng.uniform(0.7, 0.95)
    if img.ndim == 3:  # a slightly warm, whitish veil, as in hazy fundus photographs
        air = np.clip(air * np.array([1.0, rng.uniform(0.85, 1.0), rng.uniform(0.7, 0.95)]), 0, 1)
        return img * t[..., None] + air * (1.0 - t[..., None])
    return img * t + air * (1.0 - t)


def low_contrast(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Compressed dynamic range around a shifted mean, with a mild gamma (under/over exposure)."""
    factor = 1.0 - severity * (1.0 - rng.uniform(0.35, 0.6))
    level = float(img.mean()) + severity * rng.uniform(-0.1, 0.1)
    gamma = np.exp(severity * rng.uniform(-0.3, 0.3))
    out = level + factor * (img - float(img.mean()))
    return np.clip(out, 0, 1) ** gamma


def _disk_kernel(radius: float) -> np.ndarray:
    r = int(np.ceil(radius))
    yy, xx = np.mgrid[-r : r + 1, -r : r + 1]
    # Anti-aliased disk: the pixel weight falls off over one pixel at the rim.
    k = np.clip(radius + 0.5 - np.sqrt(yy**2 + xx**2), 0.0, 1.0)
    return k / k.sum()


def blur(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Defocus: convolution with a disk whose radius is 0.4-1% of the shorter side (>= 1 px)."""
    radius = severity * max(1.0, rng.uniform(0.004, 0.01) * min(img.shape[:2]))
    if radius < 0.5:
        return img
    k = _disk_kernel(radius)
    if img.ndim == 3:
        return np.stack([convolve(img[..., c], k, mode="reflect") for c in range(3)], axis=-1)
    return convolve(img, k, mode="reflect")


def noise(img: np.ndarray, rng: Rng, severity: float = 1.0) -> np.ndarray:
    """Sensor noise: signal-dependent (shot) plus constant (read) Gaussian noise, slightly smoothed."""
    read = severity * rng.uniform(0.015, 0.04)
    shot = severity * rng.uniform(0.0005, 0.003)
    std = np.sqrt(read**2 + shot * np.clip(img, 0, 1))
    n = rng.standard_normal(img.shape)
    if rng.random() < 0.5:  # some scanners correlate neighbouring pixels (interpolation, JPEG)
        n = gaussian_filter(n, sigma=(0.6, 0.6, 0)[: img.ndim]) * 1.6
    return img + std * n


DEGRADATIONS: dict[str, Callable[[np.ndarray, Rng, float], np.ndarray]] = {
    "vignetting": vignetting,
    "illumination": illumination,
    "haze": haze,
    "low_contrast": low_contrast,
    "blur": blur,
    "noise": noise,
}


def plan(kind: str, seed: int, pool: Sequence[str] | str | None = None) -> list[str]:
    """The degradation steps ``degrade`` applies for ``kind`` and ``seed`` (for logs and reports).

    ``mixed`` picks two or three distinct kinds from ``pool`` (a PRESETS name or a list of kinds;
    default all kinds) and applies them in the physical order of KINDS.
    """
    if kind in DEGRADATIONS:
        return [kind]
    if kind != "mixed":
        raise ValueError(f"unknown degradation {kind!r}; choose from: {', '.join((*KINDS, 'mixed'))}")
    if pool is None:
        kinds: Sequence[str] = KINDS
    elif isinstance(pool, str):
        if pool not in PRESETS:
            raise ValueError(f"unknown degradation preset {pool!r}; choose from: {', '.join(PRESETS)}")
        kinds = PRESETS[pool]
    else:
        kinds = list(pool)
        unknown = [k for k in kinds if k not in DEGRADATIONS]
        if unknown or not kinds:
            raise ValueError(f"bad degradation pool {kinds!r}; kinds are: {', '.join(KINDS)}")
    rng = np.random.default_rng([seed, 1])  # separate stream from the strength draws
    n = min(len(kinds), int(rng.integers(2, 4)))
    chosen = set(rng.choice(len(kinds), size=n, replace=False).tolist())
    picked = {kinds[i] for i in chosen}
    return [k for k in KINDS if k in picked]


def degrade(
    image: np.ndarray,
    kind: str = "mixed",
    seed: int = 0,
    *,
    severity: float = 1.0,
    pool: Sequence[str] | str | None = None,
    field: np.ndarray | None = None,
) -> np.ndarray:
    """A degraded copy of ``image`` as float32 in [0, 1], same shape; same seed = same damage.

    ``field`` (a boolean field-of-view mask, :func:`models.fov.fov_mask`) limits the damage to the
    imaged field: a fundus camera's or endoscope's black surround receives no light, so haze or
    noise in the eye or the bowel does not lift it.
    """
    if severity < 0:
        raise ValueError(f"severity must be >= 0, got {severity}")
    clean = to_float(image)
    img = clean
    rng = np.random.default_rng(seed)
    for step in plan(kind, seed, pool):
        img = DEGRADATIONS[step](img, rng, severity)
    if field is not None:
        m = np.asarray(field, dtype=bool)
        if m.shape != clean.shape[:2]:
            raise ValueError(f"field mask shape {m.shape} does not match the image {clean.shape[:2]}")
        img = np.where(m[..., None] if img.ndim == 3 else m, img, clean)
    return np.clip(img, 0.0, 1.0).astype(np.float32)


def degrade_many(
    images: Iterable[np.ndarray],
    kind: str = "mixed",
    seed: int = 0,
    *,
    severity: float = 1.0,
    pool: Sequence[str] | str | None = None,
) -> Iterator[np.ndarray]:
    """Degrade a stream of images, image ``i`` with seed ``seed + i`` (reproducible datasets)."""
    for i, image in enumerate(images):
        yield degrade(image, kind, seed + i, severity=severity, pool=pool)
