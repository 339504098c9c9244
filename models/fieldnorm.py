"""Field normalisation: even out lighting, haze and contrast by matching local statistics to HQ images.

Haze, uneven illumination and low contrast are, to first order, smooth affine fields over the image:
``I = J * g(x) + o(x)``. Within a wide window the local mean and standard deviation of a clean photograph
of one modality are fairly stable, so estimating ``g`` and ``o`` from the input's local statistics and
mapping them onto those of real HQ images of the same modality inverts the fields without touching the
fine structure (vessels, exudates): per channel the output keeps the input's deviation from its local
mean, rescaled to the HQ images' local contrast, around the HQ images' mean (:func:`field_normalise`).

The HQ statistics are per-modality targets computed from a folder of HQ images (the node's guidance idea
without a network: the modality's HQ reference sets the goal). The field of view is found first (fundus
disc, endoscope frame) so the black surround neither enters the statistics nor changes. Colour: the
correction is computed per RGB channel (haze is a coloured veil), and the chroma it moves is limited to
``chroma_limit`` CIELAB units from the input, so a real image's own colour is kept and only a cast of
about that size is corrected.

With the shipped windows (0.6 of the field's side for fundus, 0.35 for endoscopy) the statistics are close
to global: it mostly sets each channel's level and contrast. Figures, and why endoscopy is not routed to it
(it lifts a dark lumen to grey), are in ``docs/models.md``.
"""

from __future__ import annotations

import json
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from functools import cache
from pathlib import Path

import cv2
import numpy as np
import torch

from models.classical import _builder
from models.color import limit_chroma, unit_range
from models.fov import feather, fov_mask
from models.hqgnet import gaussian_blur
from models.io import balanced_weights, source_of

TARGETS_FILE = Path(__file__).parent / "weights" / "fieldnorm.targets.json"
WORK_SIDE = 512  # statistics are computed on a copy at most this large; the fields are smooth


@dataclass(frozen=True)
class Targets:
    """Local statistics of HQ images of one modality, averaged inside their fields of view.

    ``sigma`` is the window (a Gaussian, as a fraction of the square root of the field's area, so it is the
    same at any resolution); the targets are only valid with the sigma they were measured at.
    """

    modality: str
    sigma: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    n_images: int
    sources: dict[str, int]
    dark_ratio: float | None = None  # dark channel / local mean of the same images (models.dehaze's clear ratio r0)
    dark_ratio_grey: float | None = None  # the same for their luminance (r0 for grey frames)


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
    t = t.permute(2, 0, 1)[None] if t.ndim == 3 else t[None, None]
    with torch.inference_mode():
        r = gaussian_blur(t, float(sigma))[0]
    return (r.permute(1, 2, 0) if a.ndim == 3 else r[0]).numpy()


def local_stats(img: np.ndarray, field: np.ndarray, sigma: float) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) fields of ``img`` (H, W[, C]) over a Gaussian window of ``sigma`` x sqrt(field area) px,
    normalised by the window's weight inside ``field``, so the surround pulls neither towards black."""
    m = field.astype(np.float32)
    px = max(1.0, sigma * math.sqrt(max(1.0, float(m.sum()))))
    den = _blur(m, px) + 1e-6
    x = img if img.ndim == 3 else img[..., None]
    den = den[..., None]
    mean = _blur(x * m[..., None], px) / den
    sq = _blur(x * x * m[..., None], px) / den
    std = np.sqrt(np.maximum(sq - mean * mean, 1e-8))
    return (mean, std) if img.ndim == 3 else (mean[..., 0], std[..., 0])


def measure_targets(images: Iterable[tuple[str, np.ndarray]], modality: str, sigma: float) -> Targets:
    """Targets from ``(source, RGB image in [0, 1])`` pairs; each source weighs sqrt(its count) in total, so
    one camera that gave most of the images does not set the goal alone."""
    from models.dehaze import dark_ratio  # noqa: PLC0415 - dehaze reads these targets

    sources: list[str] = []
    means: list[np.ndarray] = []
    stds: list[np.ndarray] = []
    darks: list[tuple[float, float]] = []
    for source, img in images:
        img = np.asarray(img, dtype=np.float32)
        if img.ndim != 3 or img.shape[2] != 3:
            raise ValueError(f"targets need RGB images, got shape {img.shape}")
        small = _working_copy(img)
        field = fov_mask(small)
        mean, std = local_stats(small, field, sigma)
        sources.append(source)
        means.append(mean[field].mean(0))
        stds.append(std[field].mean(0))
        darks.append((dark_ratio(img), dark_ratio(img @ np.float32([0.2126, 0.7152, 0.0722]))))
    if not sources:
        raise ValueError("no images to measure targets from")
    w = np.asarray(balanced_weights(sources))
    w /= w.sum()
    mean, std, dark = w @ np.asarray(means), w @ np.asarray(stds), w @ np.asarray(darks)
    return Targets(
        modality=modality, sigma=float(sigma),
        mean=tuple(round(float(v), 5) for v in mean), std=tuple(round(float(v), 5) for v in std),  # type: ignore[arg-type]
        n_images=len(sources), sources=dict(sorted(Counter(sources).items())), dark_ratio=round(float(dark[0]), 5),
        dark_ratio_grey=round(float(dark[1]), 5),
    )


def targets_from_folder(folder: Path, modality: str, sigma: float) -> Targets:
    """Targets from every image in ``folder`` (PNG/JPEG/TIFF or DICOM); the source is the file name up to '_'."""
    from models.io import list_images, load_image  # noqa: PLC0415 - only the CLI path reads folders

    paths = list_images(folder)
    return measure_targets(((source_of(p), load_image(p, 3)) for p in paths), modality, sigma)


@cache
def _shipped() -> Mapping[str, Targets]:
    data = json.loads(TARGETS_FILE.read_text())
    return {name: Targets(**{**t, "mean": tuple(t["mean"]), "std": tuple(t["std"])}) for name, t in data["targets"].items()}


def shipped_targets(name: str) -> Targets:
    """The targets shipped for ``name`` (fundus, endoscopy), measured on the training HQ images."""
    table = _shipped()
    if name not in table:
        raise ValueError(f"unknown fieldnorm targets {name!r}; shipped: {', '.join(sorted(table))}")
    return table[name]


def targets_record(targets: Iterable[Targets], note: str) -> dict:
    return {"note": note, "targets": {t.modality: asdict(t) for t in targets}}


def _working_copy(img: np.ndarray) -> np.ndarray:
    h, w = img.shape[:2]
    if max(h, w) <= WORK_SIDE:
        return img
    s = WORK_SIDE / max(h, w)
    return cv2.resize(img, (max(8, round(w * s)), max(8, round(h * s))), interpolation=cv2.INTER_AREA)


def _to_full(field: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    if field.shape[:2] == shape:
        return field
    return cv2.resize(field, (shape[1], shape[0]), interpolation=cv2.INTER_LINEAR)


def field_normalise(
    image: np.ndarray,
    targets: str | Targets = "fundus",
    strength: float = 1.0,
    chroma_limit: float = 3.0,
    max_gain: float = 3.0,
    min_gain: float = 1.0,
) -> np.ndarray:
    """Map the image's local mean and contrast onto the modality's HQ targets.

    Per channel, with local mean ``mu`` and std ``sd`` of the input and targets ``T_mu``, ``T_sd``:
    ``out = mu + strength * (T_mu - mu) + (img - mu) * clip(T_sd / sd, min_gain, max_gain) ** strength``.
    ``strength`` 0 is the identity, 1 the full match. ``min_gain`` 1 never lowers local contrast: a frame
    already more contrasted than the targets keeps its detail and only has its level moved (lowering it
    flattened vessels and the quality gate stopped 10 of 68 real low-quality training fundus frames for lost
    detail; with 1 none is, and 2 are stopped for newly clipped pixels). Statistics come from a copy at most
    512 px wide and the (smooth) fields are interpolated back, so an 8-megapixel photograph costs about what a 512 px one does
    plus a few full-size array operations. Grey frames keep their own average level and contrast and
    only lose their unevenness.
    """
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    if not chroma_limit >= 0.0:
        raise ValueError(f"chroma_limit must be >= 0, got {chroma_limit}")
    if not max_gain >= 1.0:
        raise ValueError(f"max_gain must be >= 1, got {max_gain}")
    if not 0.0 < min_gain <= max_gain:
        raise ValueError(f"min_gain must be in (0, max_gain], got {min_gain}")
    t = targets if isinstance(targets, Targets) else shipped_targets(targets)
    img = unit_range(image)
    if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
        raise ValueError(f"expected (H, W) or (H, W, 3) image, got shape {img.shape}")
    small = _working_copy(img)
    field = fov_mask(small)
    mu, sd = local_stats(small, field, t.sigma)
    if img.ndim == 3:
        goal_mu, goal_sd = np.asarray(t.mean, dtype=np.float32), np.asarray(t.std, dtype=np.float32)
    else:  # a grey frame (red-free fundus, a grey endoscope) has no colour targets: only its unevenness is removed
        goal_mu, goal_sd = np.float32(mu[field].mean()), np.float32(sd[field].mean())
    gain = np.clip(goal_sd / sd, min_gain, max_gain) ** strength
    # out = img * gain + offset: both smooth, so they are carried to full resolution instead of mu and sd
    offset = mu + strength * (goal_mu - mu) - mu * gain
    shape = img.shape[:2]
    out = img * _to_full(gain.astype(np.float32), shape) + _to_full(offset.astype(np.float32), shape)
    np.clip(out, 0.0, 1.0, out=out)
    if img.ndim == 3:
        out = limit_chroma(img, out, chroma_limit)
    if field.all():
        return out.astype(np.float32, copy=False)
    # the surround untouched, the edge feathered over 2 px of the working copy (as keep_surround does). Where the
    # field-of-view detection cuts through dim content (1 under-exposed DRIMDB frame of 68 seen) this draws a
    # line between the lifted field and the content outside it; fading in wider everywhere cost 0.2 dB and 0.05
    # LaSSIM on validation (a ring at every disc's rim), and telling dim content from a camera's surround by
    # its level failed (both ~0.03), so the line is left, documented (docs/models.md).
    weight = _to_full(feather(field) * field, shape)
    if weight.shape != field.shape:  # nothing outside the field at full resolution either (as fov_mask scales it)
        weight *= _to_full(field.astype(np.float32), shape) > 0.5
    if img.ndim == 3:
        weight = weight[..., None]
    return (img + weight * (out - img)).astype(np.float32, copy=False)


# registry kind ``fieldnorm`` (models.registry), with the classical enhancers' option checking and provenance
build = _builder("fieldnorm", "Field normalisation", field_normalise,
                 {"targets", "strength", "chroma_limit", "max_gain", "min_gain"})
