"""HQ guidance cache: one guidance vector per (model, modality), built once from reference images.

HQG-Net conditions its decoder on a vector that its cue extractor G computes from a high-quality
image of the same modality. The paper shows that one fixed reference image works about as well as
ten or all of them (Table Vc), so the node does not run G per request: ``dicomnode guidance build``
(or the node at start-up, when a model is configured with a reference folder) runs G once over a
reference set and stores the result under ``storage.root/guidance/``. Every output then names the
guidance id in its provenance, so two outputs made with different references can be told apart.

A cache entry is only valid for the exact weights it was built with (G's embedding changes with
them) and the exact reference set: both hashes are in the file and checked on load. An entry built
for other weights is refused with a clear message, never used silently.

How several references combine is measured, not assumed (:mod:`models.guidance` does the vector
math); the figures and the choice are recorded in the cache file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.durable import write_bytes
from models.guidance import (
    GUIDANCE_METHODS,
    GuidanceMathError,
    extract_vectors,
    measure_methods,
    measure_scales,
    nearest_index,
    vector_for_method,
)
from models.io import list_images, load_image
from models.registry import Enhancer, sha256_file

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
DEFAULT_MODALITY = "default"


class GuidanceError(RuntimeError):
    """A guidance cache cannot be built, read or used (wrong weights, bad file, no references)."""


@dataclass(frozen=True)
class Guidance:
    """The guidance of one model for one modality.

    ``vector`` is what every request of that modality gets. For ``method == "nearest"`` the
    per-image choice is made among ``exemplars`` (one row per reference) and ``vector`` is their
    mean, the fallback when a caller cannot choose per image.
    """

    id: str
    model: str
    modality: str
    vector: np.ndarray
    method: str
    weights_sha256: str
    refs_sha256: str
    n_refs: int
    exemplars: np.ndarray | None = None
    measurements: Mapping[str, Any] = field(default_factory=dict)
    created: str = ""
    refs: tuple[str, ...] = ()  # reference file names (not paths: they may hold patient folders)
    image_size: int | None = None
    scale: float = 1.0  # strength: vector and exemplars are G's vectors times this (measured, see build)

    def vector_for(self, query: np.ndarray | None) -> np.ndarray:
        """Guidance for one input image: its nearest exemplar (method nearest), else ``vector``.

        ``query`` is the input's own G embedding (``enhancer.extract_guidance([img])[0]``).
        """
        if self.method != "nearest" or self.exemplars is None or query is None:
            return self.vector
        return self.exemplars[nearest_index(self.exemplars, query)]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": FORMAT_VERSION,
            "id": self.id,
            "model": self.model,
            "modality": self.modality,
            "method": self.method,
            "weights_sha256": self.weights_sha256,
            "refs_sha256": self.refs_sha256,
            "n_refs": self.n_refs,
            "refs": list(self.refs),
            "image_size": self.image_size,
            "created": self.created,
            "measurements": dict(self.measurements),
            "scale": self.scale,
            "vector": [float(x) for x in self.vector],
            "exemplars": None if self.exemplars is None else [[float(x) for x in row] for row in self.exemplars],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any], source: str = "guidance file") -> Guidance:
        try:
            if int(data.get("format", 0)) != FORMAT_VERSION:
                raise GuidanceError(f"{source}: unsupported format {data.get('format')!r} (expected {FORMAT_VERSION})")
            method = str(data["method"])
            if method not in GUIDANCE_METHODS:
                raise GuidanceError(f"{source}: unknown method {method!r}")
            vector = np.asarray(data["vector"], dtype=np.float32)
            exemplars = None if data.get("exemplars") is None else np.asarray(data["exemplars"], dtype=np.float32)
            if vector.ndim != 1 or not np.all(np.isfinite(vector)):
                raise GuidanceError(f"{source}: vector must be a finite 1-D list")
            if exemplars is not None and (exemplars.ndim != 2 or exemplars.shape[1] != vector.shape[0]):
                raise GuidanceError(f"{source}: exemplars must be (N, {vector.shape[0]})")
            return cls(
                id=str(data["id"]),
                model=str(data["model"]),
                modality=str(data["modality"]),
                vector=vector,
                method=method,
                weights_sha256=str(data["weights_sha256"]),
                refs_sha256=str(data["refs_sha256"]),
                n_refs=int(data["n_refs"]),
                exemplars=exemplars,
                measurements=dict(data.get("measurements") or {}),
                created=str(data.get("created", "")),
                refs=tuple(data.get("refs") or ()),
                image_size=data.get("image_size"),
                scale=float(data.get("scale", 1.0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise GuidanceError(f"{source}: not a valid guidance record ({exc.__class__.__name__}: {exc})") from exc


# --------------------------------------------------------------------------------------------
# hashing and storage layout


def refs_sha256(paths: Sequence[Path]) -> str:
    """Hash of a reference set: sha256 over the sorted file hashes (order and names do not matter)."""
    digests = sorted(sha256_file(p) for p in paths)
    return hashlib.sha256("\n".join(digests).encode()).hexdigest()


def guidance_id(model: str, modality: str, weights_sha: str, refs_sha: str, method: str, scale: float = 1.0) -> str:
    """Short, deterministic id: the same weights, references, method and strength always give the same id."""
    text = "|".join((model, modality, weights_sha, refs_sha, method, *([f"{scale:g}"] if scale != 1.0 else [])))
    return "g-" + hashlib.sha256(text.encode()).hexdigest()[:16]


def cache_dir(storage_root: Path) -> Path:
    return Path(storage_root) / "guidance"


def cache_path(storage_root: Path, model: str, modality: str, weights_sha: str, refs_sha: str) -> Path:
    """Where the cache for (model, modality, weights, references) lives."""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in model)
    mod = "".join(c if c.isalnum() or c in "-_." else "_" for c in modality)
    return cache_dir(storage_root) / safe / f"{mod}-w{weights_sha[:12]}-r{refs_sha[:12]}.json"


def save(guidance: Guidance, path: Path) -> Path:
    """Atomic write (temp + rename) so a crash never leaves half a cache that start-up would read."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_bytes(path, (json.dumps(guidance.to_json(), indent=1) + "\n").encode(), mode=0o644)


def load(path: Path) -> Guidance:
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise GuidanceError(f"guidance file not found: {path}") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise GuidanceError(f"guidance file {path} is not readable JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise GuidanceError(f"guidance file {path} is not a JSON object")
    return Guidance.from_json(data, source=str(path))


def check_weights(guidance: Guidance, weights_sha: str, source: str) -> None:
    """Refuse a cache built for other weights: its vectors live in another embedding space."""
    if guidance.weights_sha256 != weights_sha:
        raise GuidanceError(
            f"{source} was built for other weights (sha256 {guidance.weights_sha256[:12]}…) than model "
            f"{guidance.model!r} now loads ({weights_sha[:12]}…); rebuild it with "
            f"`dicomnode guidance build --model {guidance.model} --hq REFERENCE_FOLDER`"
        )


def list_cached(storage_root: Path) -> list[Path]:
    root = cache_dir(storage_root)
    return sorted(root.glob("*/*.json")) if root.is_dir() else []


# --------------------------------------------------------------------------------------------
# building


def model_weights_sha(enhancer: Enhancer) -> str:
    sha = enhancer.info.weights_sha256
    if not sha:
        raise GuidanceError(f"model {enhancer.info.name} has no weights hash: guidance needs trained weights")
    return sha


def load_references(paths: Sequence[Path], channels: int) -> list[np.ndarray]:
    """Reference images as float [0, 1] arrays; the model prepares them for G itself (scale, crops)."""
    images = []
    for p in paths:
        try:
            images.append(load_image(p, channels))
        except Exception as exc:  # a broken reference must name itself, not fail deep inside G
            raise GuidanceError(f"reference image {p} cannot be read: {exc}") from exc
    return images


def build(
    enhancer: Enhancer,
    model: str,
    refs: Sequence[Path],
    *,
    modality: str = DEFAULT_MODALITY,
    method: str = "auto",
    heldout: tuple[Sequence[np.ndarray], Sequence[np.ndarray]] | None = None,
    weights: Sequence[float] | None = None,
    scales: Sequence[float] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Guidance:
    """Run G over the reference images and make the guidance record.

    ``method="auto"`` measures every method on ``heldout`` (paired LQ/HQ arrays) and keeps the best;
    without a held-out set, auto falls back to ``mean`` and records that nothing was measured.
    ``weights`` (one per reference, e.g. to balance sources) weight the mean. ``scales`` (with
    ``heldout``) also measures the guidance strength, vector x scale, and keeps the best
    (:func:`models.guidance.measure_scales`); the record's vectors are then scaled.
    """
    refs = sorted({Path(p) for p in refs})
    if not refs:
        raise GuidanceError(f"no reference images for model {model!r} modality {modality!r}")
    if method != "auto" and method not in GUIDANCE_METHODS:
        raise GuidanceError(f"unknown guidance method {method!r}; one of auto, {', '.join(GUIDANCE_METHODS)}")
    weights_sha = model_weights_sha(enhancer)
    card = enhancer.info.card
    channels = int(card.channels) if card is not None and card.channels in (1, 3) else 3
    images = load_references(refs, channels)
    if progress:
        progress(f"G forward over {len(images)} reference image(s)")
    try:
        vectors = extract_vectors(enhancer, images)
    except GuidanceMathError as exc:
        raise GuidanceError(str(exc)) from exc
    measurements: dict[str, Any] = {}
    if heldout is not None:
        if progress:
            progress(f"measuring {', '.join(GUIDANCE_METHODS)} on {len(heldout[0])} held-out image(s)")
        measurements = measure_methods(enhancer, vectors, heldout[0], heldout[1])
    if method == "auto":
        method = measurements.get("chosen", "mean")
        if not measurements:
            measurements = {"chosen": "mean", "rule": "no held-out set given: default mean (paper Table Vc: 1 ≈ 10 ≈ all references)"}
    elif measurements:
        measurements["chosen_by_user"] = method
    scale = 1.0
    if heldout is not None and scales:
        if progress:
            progress(f"measuring guidance strengths {', '.join(f'{x:g}' for x in scales)} on {len(heldout[0])} held-out image(s)")
        strength = measure_scales(enhancer, vectors, heldout[0], heldout[1], method, scales=scales)
        measurements["strength"] = strength
        scale = float(strength["chosen_scale"])
    vector = vector_for_method(vectors, method, None if weights is None else np.asarray(weights, dtype=np.float64)) * scale
    vectors = vectors * np.float32(scale)
    rsha = refs_sha256(refs)
    return Guidance(
        id=guidance_id(model, modality, weights_sha, rsha, method, scale),
        model=model,
        modality=modality,
        vector=vector.astype(np.float32),
        method=method,
        weights_sha256=weights_sha,
        refs_sha256=rsha,
        n_refs=len(refs),
        exemplars=vectors.astype(np.float32) if method == "nearest" else None,
        measurements=measurements,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        refs=tuple(p.name for p in refs),
        image_size=card.size if card is not None else None,
        scale=scale,
    )


def reference_files(folder: Path) -> list[Path]:
    try:
        return list_images(folder)
    except ValueError as exc:
        raise GuidanceError(str(exc)) from exc


def resolve(
    enhancer: Enhancer,
    model: str,
    modality: str,
    source: Path,
    storage_root: Path,
    *,
    build_missing: bool = True,
) -> Guidance:
    """The guidance a configured model uses for one modality (called at start-up).

    ``source`` is a cache file (``.json``: loaded and checked against the loaded weights, refused on
    mismatch) or a reference folder (the cache under ``storage_root/guidance`` for these weights and
    these references is loaded; when there is none it is built and saved, ``build_missing``).
    """
    source = Path(source)
    weights_sha = model_weights_sha(enhancer)
    if source.is_file():
        g = load(source)
        check_weights(g, weights_sha, f"guidance file {source}")
        if g.model != model:
            log.info("guidance %s was built under model name %r, used for %r", g.id, g.model, model)
        return g
    if not source.is_dir():
        raise GuidanceError(f"guidance source for model {model!r} modality {modality!r} not found: {source}")
    refs = reference_files(source)
    rsha = refs_sha256(refs)
    path = cache_path(storage_root, model, modality, weights_sha, rsha)
    if path.is_file():
        try:
            g = load(path)
            check_weights(g, weights_sha, f"guidance cache {path}")
            if g.refs_sha256 == rsha:
                return g
        except GuidanceError as exc:
            log.warning("guidance cache %s unusable (%s); rebuilding", path, exc)
    if not build_missing:
        raise GuidanceError(f"no guidance cache for model {model!r} modality {modality!r} at {path}")
    stale = [p for p in path.parent.glob(f"{path.name.split('-w')[0]}-w*.json") if p != path] if path.parent.is_dir() else []
    if stale:
        log.info("guidance for model %s modality %s: %d cache(s) for other weights/references ignored; rebuilding", model, modality, len(stale))
    g = build(enhancer, model, refs, modality=modality)
    save(g, path)
    log.info("guidance %s built for model %s modality %s from %d reference(s)", g.id, model, modality, g.n_refs)
    return g


def describe(g: Guidance) -> str:
    """Human summary for `dicomnode guidance show`."""
    lines = [
        f"{g.id}  model={g.model} modality={g.modality} method={g.method} refs={g.n_refs} dim={g.vector.shape[0]}",
        f"  weights sha256 {g.weights_sha256[:16]}…  references sha256 {g.refs_sha256[:16]}…  built {g.created}",
    ]
    m = g.measurements or {}
    if m.get("methods"):
        inp = m.get("input", {})
        lines.append(f"  measured on {m.get('n_heldout')} held-out image(s); input PSNR {inp.get('psnr', math.nan):.2f} dB SSIM {inp.get('ssim', math.nan):.4f}")
        for name, r in m["methods"].items():
            mark = "*" if name == g.method else " "
            lines.append(f"   {mark} {name:8s} PSNR {r.get('psnr', math.nan):.2f} dB  SSIM {r.get('ssim', math.nan):.4f}  {r.get('seconds_per_image', math.nan):.3f} s/img")
        lines.append(f"  rule: {m.get('rule', '')}")
        strength = m.get("strength") or {}
        if strength.get("scales"):
            lines.append(f"  strength (vector x scale, {g.method}): " + ", ".join(
                f"{'*' if float(k) == g.scale else ''}x{k} {r.get('psnr', math.nan):.2f} dB" for k, r in strength["scales"].items()))
    elif m.get("rule"):
        lines.append(f"  {m['rule']}")
    return "\n".join(lines)


def split_refs(paths: Sequence[Path], heldout_fraction: float, seed: int = 0) -> tuple[list[Path], list[Path]]:
    """Split references into (guidance set, held-out set) deterministically."""
    paths = sorted(paths)
    if len(paths) < 2 or heldout_fraction <= 0:
        return list(paths), []
    k = max(1, min(len(paths) - 1, round(len(paths) * heldout_fraction)))
    order = list(paths)
    random.Random(seed).shuffle(order)
    held = sorted(order[:k])
    return [p for p in paths if p not in held], held
