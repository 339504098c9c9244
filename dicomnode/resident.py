"""Resident models: every configured model loaded once at start-up, shared by all workers.

Loading a network per request would cost seconds each time (mercure reloads a container per case);
here each model is built once on its device (``device: auto`` = CUDA when present, else CPU) with its
guidance vectors resolved from the cache (:mod:`dicomnode.guidance`). A model whose weights are
missing or corrupt, or whose guidance cannot be resolved, is recorded as failed with the reason:
its rules fail clearly while the node keeps serving the others.

Inference on one device is serialised by a bounded semaphore per device: two models running at
once on the same CPU cores or GPU only slow each other down and double peak memory.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import guidance as gd
from models.registry import Enhancer, ModelLoadError, build_model, read_card, resolve_device

log = logging.getLogger(__name__)

SHIPPED_GUIDANCE_GLOB = "{stem}.guidance-*.json"


class ModelUnavailable(RuntimeError):
    """A rule names a model that failed at start-up; the message says why."""


def shipped_guidance(weights: Path | None) -> dict[str, Path]:
    """Guidance files shipped beside a weights file: ``X.guidance-MODALITY.json`` -> {MODALITY: path}."""
    if weights is None:
        return {}
    weights = Path(weights)
    found = {}
    for p in sorted(weights.parent.glob(SHIPPED_GUIDANCE_GLOB.format(stem=weights.stem))):
        modality = p.stem.split(".guidance-", 1)[1]
        found[modality] = p
    return found


class GatedEnhancer(Enhancer):
    """The shared enhancer seen through its device's semaphore, bound to one guidance record.

    ``enhance(images)`` uses the bound guidance; for a record whose method is ``nearest`` each image
    gets its own nearest exemplar (one G forward per image, measured cost).
    """

    def __init__(self, inner: Enhancer, gate: threading.BoundedSemaphore, guidance: gd.Guidance | None = None):
        self.inner = inner
        self.info = inner.info
        self.uses_guidance = inner.uses_guidance
        self.device = inner.device
        self.gate = gate
        self.guidance = guidance
        self.waited_seconds = 0.0
        self.on_frames: Callable[[int], None] | None = None  # told how many frames each call enhanced (progress)

    @contextmanager
    def _slot(self) -> Iterator[None]:
        start = time.perf_counter()
        with self.gate:
            self.waited_seconds += time.perf_counter() - start
            yield

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        with self._slot():
            if guidance is None and self.guidance is not None:
                if self.guidance.method == "nearest" and self.guidance.exemplars is not None:
                    queries = np.asarray(self.inner.extract_guidance(list(images)), dtype=np.float32)
                    out = [self.inner.enhance([img], guidance=self.guidance.vector_for(q))[0]
                           for img, q in zip(images, queries, strict=True)]
                else:
                    out = self.inner.enhance(images, guidance=self.guidance.vector)
            else:
                out = self.inner.enhance(images, guidance=guidance)
        if self.on_frames is not None:
            self.on_frames(len(images))
        return out

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        with self._slot():
            return self.inner.extract_guidance(images)


@dataclass
class ResidentModel:
    """One loaded model and its guidance per modality (``"default"`` for any other modality)."""

    name: str
    enhancer: Enhancer
    device: str
    batch_size: int
    guidance: dict[str, gd.Guidance] = field(default_factory=dict)
    load_seconds: float = 0.0

    def guidance_record(self, modality: str | None) -> gd.Guidance | None:
        if not self.enhancer.uses_guidance:
            return None
        if modality and modality in self.guidance:
            return self.guidance[modality]
        return self.guidance.get(gd.DEFAULT_MODALITY)


@dataclass(frozen=True)
class BoundModel:
    """A model ready for one series: the gated enhancer with its modality's guidance bound, and what
    provenance names (the guidance id)."""

    name: str
    enhancer: GatedEnhancer
    guidance_id: str | None
    batch_size: int


class ResidentModels:
    """All configured models, loaded once; what the server's workers share."""

    def __init__(self, models: Mapping[str, ResidentModel], failures: Mapping[str, str]):
        self.models = dict(models)
        self.failures = dict(failures)
        self._gates: dict[str, threading.BoundedSemaphore] = {}
        for m in self.models.values():
            self._gates.setdefault(m.device, threading.BoundedSemaphore(1))

    @classmethod
    def single(cls, name: str, enhancer: Enhancer, *, batch_size: int = 4, guidance: gd.Guidance | None = None) -> ResidentModels:
        """One already built enhancer as the only model (benchmarks, tests, tools), with an optional default guidance."""
        record = {gd.DEFAULT_MODALITY: guidance} if guidance is not None else {}
        return cls({name: ResidentModel(name, enhancer, enhancer.device, batch_size, guidance=record)}, {})

    @classmethod
    def load(cls, config: Any, *, only: Sequence[str] | None = None) -> ResidentModels:
        """Build every model in ``config.models`` (or those named in ``only``).

        Never raises for one model's failure: the reason goes to ``failures`` and to the log.
        """
        storage_root = Path(config.storage.root)
        loaded: dict[str, ResidentModel] = {}
        failures: dict[str, str] = {}
        for name, mc in config.models.items():
            if only is not None and name not in only:
                continue
            start = time.perf_counter()
            device = resolve_device(getattr(mc, "device", "auto") or "auto")
            try:
                if mc.weights is not None:
                    read_card(Path(mc.weights), verify=True)  # missing/corrupt weights: named here, whatever the builder does
                enhancer = build_model(mc.kind, weights=mc.weights, device=device, options=dict(mc.options or {}))
            except ModelLoadError as exc:
                failures[name] = f"model {name!r} ({mc.kind}) failed to load: {exc}"
            except Exception as exc:  # e.g. a state dict that does not fit the network: still one model's failure
                failures[name] = f"model {name!r} ({mc.kind}) failed to load: {exc.__class__.__name__}: {exc}"
            else:
                try:
                    records = cls._guidance(name, mc, enhancer, storage_root)
                except gd.GuidanceError as exc:
                    failures[name] = f"model {name!r}: guidance unusable: {exc}"
                else:
                    loaded[name] = ResidentModel(
                        name=name, enhancer=enhancer, device=device, batch_size=int(getattr(mc, "batch_size", 4) or 4),
                        guidance=records, load_seconds=time.perf_counter() - start,
                    )
                    log.info("model %s (%s) loaded on %s in %.2f s%s", name, mc.kind, device, loaded[name].load_seconds,
                             "; guidance " + ", ".join(f"{k}={g.id}/{g.method}" for k, g in records.items()) if records else "")
            if name in failures:
                log.error("%s; rules using it will fail until this is fixed", failures[name])
        return cls(loaded, failures)

    @staticmethod
    def _guidance(name: str, mc: Any, enhancer: Enhancer, storage_root: Path) -> dict[str, gd.Guidance]:
        if not enhancer.uses_guidance:
            if getattr(mc, "guidance", None):
                log.warning("model %s (%s) takes no guidance; its guidance settings are ignored", name, mc.kind)
            return {}
        sources = dict(getattr(mc, "guidance", None) or {}) or shipped_guidance(mc.weights)
        if not sources:
            raise gd.GuidanceError(
                f"model {name!r} needs HQ guidance: set models.{name}.guidance.default to a folder of high-quality "
                f"images (or a cache file from `dicomnode guidance build`)"
            )
        return {modality: gd.resolve(enhancer, name, modality, Path(src), storage_root) for modality, src in sources.items()}

    # ---- what the server and workers call

    def get(self, name: str) -> ResidentModel:
        if name in self.models:
            return self.models[name]
        if name in self.failures:
            raise ModelUnavailable(self.failures[name])
        raise ModelUnavailable(f"model {name!r} is not configured")

    def bind(self, name: str, modality: str | None = None) -> BoundModel:
        """The shared enhancer behind its device gate, bound to ``modality``'s guidance (or the default's).

        ModelUnavailable when the model failed at start-up or when a guided model has no guidance
        for this modality and no default.
        """
        m = self.get(name)
        record = m.guidance_record(modality)
        if m.enhancer.uses_guidance and record is None:
            have = ", ".join(sorted(m.guidance)) or "none"
            raise ModelUnavailable(f"model {name!r} has no HQ guidance for modality {modality or '?'!r} and no default "
                                   f"(caches: {have}); add models.{name}.guidance.{modality or 'default'}")
        return BoundModel(name, GatedEnhancer(m.enhancer, self._gates[m.device], record), record.id if record else None,
                          m.batch_size)

    def summary(self) -> dict[str, Any]:
        return {
            "loaded": {n: {"kind": m.enhancer.info.kind, "device": m.device,
                           "guidance": {k: g.id for k, g in m.guidance.items()}} for n, m in self.models.items()},
            "failed": dict(self.failures),
        }
