"""Resident models: every configured model loaded once at start-up, shared by all workers.

Loading a network per request would cost seconds each time (mercure reloads a container per case);
here each model is built once on its device (``device: auto`` = CUDA when present, else CPU) with its
guidance vectors resolved from the cache (:mod:`dicomnode.guidance`). A model whose weights are
missing or corrupt, or whose guidance cannot be resolved, is recorded as failed with the reason:
its rules fail clearly while the node keeps serving the others.

Inference on one device is serialised by a :class:`DeviceQueue` per device: two models running at
once on the same CPU cores or GPU only slow each other down and double peak memory. When several
series wait for the device (``node.workers`` > 1), their calls to the same model with the same
guidance are merged into one call of up to the model's ``batch_size`` frames (and
:data:`MAX_MERGED_BYTES`): a series' last partial batch fills up with another series' frames instead
of being padded, and each series gets back exactly its own frames. Where the model's own passes hold
one frame (the CPU default) merging changes no output bit; with larger passes a frame's neighbours can
change its output in the last float bit (``models.X.merge_series: false`` turns merging off). A merged call that fails is run again one series at a time, so one series'
bad frame fails only that series.
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
MAX_MERGED_BYTES = 512 * 1024**2  # input frames of one merged call, all series together


@dataclass(eq=False)
class _Request:
    key: Any  # requests with equal keys (same model and guidance) may share a call; None: never merged
    images: Sequence[np.ndarray]
    run: Callable[[Sequence[np.ndarray]], list[np.ndarray]]
    limit: int  # frames per call for this model
    queued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    result: list[np.ndarray] | None = None
    error: BaseException | None = None
    done: bool = False


class DeviceQueue:
    """One device's inference queue: one call at a time, FIFO, merging waiting calls that may share a pass.

    Whoever finds the device free runs the next group (the oldest request and later ones with its key,
    up to its frame limit and :data:`MAX_MERGED_BYTES`), possibly for other threads, then checks
    whether its own request is done. ``merged_calls`` counts calls that served more than one request.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._queue: list[_Request] = []
        self._busy = False
        self.calls = 0
        self.merged_calls = 0

    def run(self, key: Any, images: Sequence[np.ndarray], run: Callable[[Sequence[np.ndarray]], list[np.ndarray]],
            limit: int) -> tuple[list[np.ndarray], float]:
        """Enhance ``images`` with ``run`` (maybe merged with others); returns (outputs, seconds waited)."""
        req = _Request(key, images, run, max(1, limit))
        with self._cond:
            self._queue.append(req)
        while True:
            with self._cond:
                while not req.done and self._busy:
                    self._cond.wait()
                if req.done:
                    break
                self._busy = True
                group = self._take()
            try:
                self._execute(group)
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()
        if req.error is not None:
            raise req.error
        assert req.result is not None and req.started_at is not None
        return req.result, req.started_at - req.queued_at

    @contextmanager
    def exclusive(self) -> Iterator[float]:
        """The device alone (guidance extraction); yields the seconds waited."""
        start = time.perf_counter()
        with self._cond:
            while self._busy:
                self._cond.wait()
            self._busy = True
        try:
            yield time.perf_counter() - start
        finally:
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _take(self) -> list[_Request]:
        head = self._queue.pop(0)
        group, frames, nbytes = [head], len(head.images), sum(int(i.nbytes) for i in head.images)
        if head.key is not None:
            for other in list(self._queue):
                size = sum(int(i.nbytes) for i in other.images)
                if other.key == head.key and frames + len(other.images) <= head.limit and nbytes + size <= MAX_MERGED_BYTES:
                    self._queue.remove(other)
                    group.append(other)
                    frames, nbytes = frames + len(other.images), nbytes + size
        return group

    def _execute(self, group: list[_Request]) -> None:
        started = time.perf_counter()
        for req in group:
            req.started_at = started
        self.calls += 1
        if len(group) > 1:
            self.merged_calls += 1
            try:
                out = group[0].run([img for req in group for img in req.images])
            except Exception:
                log.warning("a merged call of %d series failed; running them one at a time", len(group))
            else:
                for req in group:
                    req.result, out = list(out[: len(req.images)]), out[len(req.images):]
                    req.done = True
                return
        for req in group:
            try:
                req.result = req.run(req.images)
            except BaseException as exc:  # delivered to the caller's thread, raised there
                req.error = exc
            req.done = True


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
    """The shared enhancer seen through its device's queue, bound to one guidance record.

    ``enhance(images)`` uses the bound guidance; for a record whose method is ``nearest`` each image
    gets its own nearest exemplar (one G forward per image, measured cost) and such calls are never
    merged with other series'.
    """

    def __init__(self, inner: Enhancer, queue: DeviceQueue, guidance: gd.Guidance | None = None, *, batch_size: int = 1,
                 merge: bool = True):
        self.inner = inner
        self.info = inner.info
        self.uses_guidance = inner.uses_guidance
        self.device = inner.device
        self.queue = queue
        self.guidance = guidance
        self.batch_size = batch_size
        self.merge = merge
        self.waited_seconds = 0.0
        self.on_frames: Callable[[int], None] | None = None  # told how many frames each call enhanced (progress)

    def _merge_key(self, guidance: np.ndarray | None) -> Any:
        if guidance is not None or not self.merge:  # an explicit vector, or merging off: alone
            return None
        if self.guidance is None:
            return (id(self.inner), None)
        if self.guidance.method == "nearest" and self.guidance.exemplars is not None:
            return None
        return (id(self.inner), self.guidance.id)

    def _call(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        if guidance is None and self.guidance is not None:
            if self.guidance.method == "nearest" and self.guidance.exemplars is not None:
                queries = np.asarray(self.inner.extract_guidance(list(images)), dtype=np.float32)
                return [self.inner.enhance([img], guidance=self.guidance.vector_for(q))[0]
                        for img, q in zip(images, queries, strict=True)]
            return self.inner.enhance(images, guidance=self.guidance.vector)
        return self.inner.enhance(images, guidance=guidance)

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        out, waited = self.queue.run(self._merge_key(guidance), images, lambda frames: self._call(frames, guidance),
                                     self.batch_size)
        self.waited_seconds += waited
        if self.on_frames is not None:
            self.on_frames(len(images))
        return out

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        with self.queue.exclusive() as waited:
            self.waited_seconds += waited
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
    merge_series: bool = True  # calls of several series may share one call (models.X.merge_series)

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
        self._queues: dict[str, DeviceQueue] = {}
        for m in self.models.values():
            self._queues.setdefault(m.device, DeviceQueue())

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
                        merge_series=bool(getattr(mc, "merge_series", True)),
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
        return BoundModel(name, GatedEnhancer(m.enhancer, self._queues[m.device], record, batch_size=m.batch_size,
                                             merge=m.merge_series),
                          record.id if record else None, m.batch_size)

    def queues(self) -> dict[str, DeviceQueue]:
        return dict(self._queues)

    def queue(self, device: str) -> DeviceQueue:
        """The inference queue of ``device`` (its counters show how often series shared a call)."""
        return self._queues[device]

    def summary(self) -> dict[str, Any]:
        return {
            "loaded": {n: {"kind": m.enhancer.info.kind, "device": m.device,
                           "guidance": {k: g.id for k, g in m.guidance.items()}} for n, m in self.models.items()},
            "failed": dict(self.failures),
        }
