"""Where enhancement runs: in the node (``executor: {kind: local}``, the default) or on Ray actors (``kind: ray``).

With Ray, the node keeps receive, ledger, routing, derive and dispatch; only the model's forward passes move.
Each configured model gets ``executor.actors`` Ray actors (:class:`ModelActor`), each holding the model
resident on its own device (``num_gpus: 1``: one actor per GPU), placed by Ray across the cluster's machines
(SPREAD). The node sees each model as an ordinary :class:`~models.registry.Enhancer` (:class:`RayEnhancer`),
so :class:`~dicomnode.resident.ResidentModels` binds guidance and gates it, and the pipeline runs unchanged. The
same model card, weights and guidance give the same provenance and UIDs as the local executor; pixel values agree
to float rounding (a batch is split differently and each actor has its own threads: max |difference| 2.4e-7 on
the shipped colour model, before the output is stored as integers).

A batch is split across the model's actors and the parts run at once. An actor that dies (its worker process
killed, its machine gone) is restarted by Ray (``max_restarts=-1``, the model loaded again); the part it was
running is sent again, to it once restarted or to another actor, up to ``executor.retries`` times. Enhancement is
a pure function of the frames, so a part run twice gives the same pixels and nothing downstream sees it. When no
actor answers, :class:`~models.registry.EnhancerUnavailable` is raised: the node puts the job back to wait
``executor.retry_seconds`` instead of failing any image (docs/scaling.md).

Weights shipped in the package travel as ``builtin:NAME`` (each worker resolves its own installed copy; the
actors report the weights' sha256 and a worker with other weights fails the model at start-up). Other weights
paths must exist on every worker (shared storage). Ray is imported only in this mode (the ``ray`` extra).
"""

from __future__ import annotations

import logging
import os
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode import guidance as gd
from dicomnode.configtypes import BUILTIN_PREFIX, builtin_dir
from dicomnode.resident import ResidentModel, ResidentModels
from models.registry import Enhancer, EnhancerUnavailable, ModelInfo, ModelLoadError

log = logging.getLogger(__name__)

__all__ = ["ModelActor", "RayEnhancer", "load_models", "load_ray_models", "portable_weights"]


def load_models(config: Any, *, only: Sequence[str] | None = None) -> ResidentModels:
    """Every configured model (or those in ``only``) on the configured executor."""
    executor = getattr(config, "executor", None)
    if executor is None or executor.kind == "local":
        return ResidentModels.load(config, only=only)
    return load_ray_models(config, only=only)


# --------------------------------------------------------------------------- the actor (runs on Ray workers)


def portable_weights(path: Path | None) -> str | None:
    """``builtin:NAME`` for a shipped file (each worker has its own installed copy), else the path as it is."""
    if path is None:
        return None
    path = Path(path)
    return f"{BUILTIN_PREFIX}{path.name}" if path.parent == builtin_dir() else str(path)


def _local_weights(weights: str | None) -> Path | None:
    if weights is None:
        return None
    if weights.startswith(BUILTIN_PREFIX):
        return builtin_dir() / weights[len(BUILTIN_PREFIX):]
    return Path(weights)


class ModelActor:
    """One model resident in a Ray worker process (made a Ray actor by :func:`load_ray_models`)."""

    def __init__(self, kind: str, weights: str | None, device: str, options: dict[str, Any]) -> None:
        from models.registry import build_model, read_card, resolve_device  # noqa: PLC0415 - in the worker

        path = _local_weights(weights)
        if path is not None:
            read_card(path, verify=True)  # a missing or corrupt file on this worker is named here
        self.enhancer = build_model(kind, weights=path, device=resolve_device(device), options=dict(options))

    def describe(self) -> dict[str, Any]:
        return {"info": self.enhancer.info, "uses_guidance": bool(self.enhancer.uses_guidance),
                "device": str(self.enhancer.device), "pid": os.getpid(), "host": socket.gethostname()}

    def pid(self) -> int:
        return os.getpid()

    def enhance(self, images: list[np.ndarray], guidance: np.ndarray | None) -> list[np.ndarray]:
        return [np.asarray(o, dtype=np.float32) for o in self.enhancer.enhance(images, guidance=guidance)]

    def extract_guidance(self, images: list[np.ndarray]) -> np.ndarray:
        return np.asarray(self.enhancer.extract_guidance(images), dtype=np.float32)


# --------------------------------------------------------------------------- the node's side


def _ray() -> Any:
    try:
        import ray  # noqa: PLC0415 - only in Ray mode
    except ImportError as exc:
        raise ModelLoadError(f"executor.kind is ray but Ray is not installed ({exc}); pip install 'dicomnode[ray]'") from None
    return ray


def _actor_failures(ray: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the actor (or its machine) is gone or not answering", not "the model failed"."""
    ex = ray.exceptions
    names = ("RayActorError", "ActorDiedError", "ActorUnavailableError", "GetTimeoutError", "NodeDiedError",
             "WorkerCrashedError", "ObjectLostError", "OwnerDiedError", "RaySystemError")
    return tuple(getattr(ex, n) for n in names if isinstance(getattr(ex, n, None), type))


class RayEnhancer(Enhancer):
    """A model whose forward passes run on Ray actors; to the node, one Enhancer like any other.

    ``enhance`` splits a batch into one contiguous part per actor (at most one per frame), runs the parts at
    once and joins them in order. A part whose actor died is sent again (``retries`` times, to the next
    actor in turn, each waiting up to ``call_timeout`` while Ray restarts it); then EnhancerUnavailable.
    """

    def __init__(self, name: str, actors: Sequence[Any], info: ModelInfo, *, uses_guidance: bool, retries: int = 3,
                 call_timeout: float = 600.0, retry_pause: float = 0.5) -> None:
        self.name = name
        self.actors = list(actors)
        self.info = info
        self.uses_guidance = uses_guidance
        self.device = f"ray:{name}"
        self.retries = retries
        self.call_timeout = call_timeout
        self.retry_pause = retry_pause
        self.resent = 0  # parts sent again after their actor died (status, tests)
        self._next = 0
        self._lock = threading.Lock()
        self._ray = _ray()
        self._gone = _actor_failures(self._ray)

    def _start(self) -> int:
        with self._lock:
            first = self._next
            self._next = (self._next + 1) % len(self.actors)
            return first

    def _run(self, method: str, parts: list[Any], extra: tuple[Any, ...]) -> list[Any]:
        first = self._start()
        slots = [(first + i) % len(self.actors) for i in range(len(parts))]
        refs = [getattr(self.actors[s], method).remote(part, *extra) for s, part in zip(slots, parts)]
        results: list[Any] = [None] * len(parts)
        for i, ref in enumerate(refs):
            attempt = 0
            while True:
                try:
                    results[i] = self._ray.get(ref, timeout=self.call_timeout)
                    break
                except self._gone as exc:
                    attempt += 1
                    if attempt > self.retries:
                        raise EnhancerUnavailable(
                            f"model {self.name!r}: no Ray actor answered after {self.retries} retries: "
                            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}") from exc
                    slots[i] = (slots[i] + 1) % len(self.actors)
                    with self._lock:
                        self.resent += 1
                    log.warning("model %s: Ray actor %d lost a part of %d frames (%s); sending it again to actor %d "
                                "(retry %d of %d)", self.name, (slots[i] - 1) % len(self.actors), len(parts[i]),
                                type(exc).__name__, slots[i], attempt, self.retries)
                    time.sleep(self.retry_pause)
                    ref = getattr(self.actors[slots[i]], method).remote(parts[i], *extra)
        return results

    def _split(self, images: Sequence[np.ndarray]) -> list[list[np.ndarray]]:
        k = max(1, min(len(self.actors), len(images)))
        bounds = np.linspace(0, len(images), k + 1).round().astype(int)
        return [list(images[a:b]) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        if not images:
            return []
        parts = self._split(images)
        return [frame for part in self._run("enhance", parts, (guidance,)) for frame in part]

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, 0), dtype=np.float32)
        return np.concatenate(self._run("extract_guidance", self._split(images), ()), axis=0)

    def pids(self) -> list[int]:
        """The process id of each actor now (tests kill one; a restarted actor has a new one)."""
        return [int(p) for p in self._ray.get([a.pid.remote() for a in self.actors], timeout=self.call_timeout)]


def load_ray_models(config: Any, *, only: Sequence[str] | None = None) -> ResidentModels:
    """Each configured model on ``executor.actors`` Ray actors; a model that cannot start is a failure with its reason.

    Guidance is resolved in the node as in local mode (cache files checked against the weights the actors
    loaded; reference folders built through the actors and cached under ``storage.root``).
    """
    ex = config.executor
    storage_root = Path(config.storage.root)
    wanted = {n: m for n, m in config.models.items() if only is None or n in only}
    try:
        ray = _ray()
        if not ray.is_initialized():
            private = {"include_dashboard": False} if ex.address is None else {}  # only for a cluster Ray starts itself
            ray.init(address=ex.address, namespace=ex.namespace, log_to_driver=False, configure_logging=False, **private)
    except Exception as exc:  # Ray missing, cluster unreachable: every model fails with the reason, the node still serves
        reason = str(exc) if isinstance(exc, ModelLoadError) else f"Ray cluster {ex.address or '(private)'}: {type(exc).__name__}: {exc}"
        failures = {name: f"model {name!r}: {reason}" for name in wanted}
        for message in failures.values():
            log.error("%s; rules using it will fail until this is fixed", message)
        return ResidentModels({}, failures)
    remote = ray.remote(ModelActor)
    loaded: dict[str, ResidentModel] = {}
    failures: dict[str, str] = {}
    for name, mc in wanted.items():
        started = time.perf_counter()
        actors = [remote.options(num_cpus=ex.num_cpus, num_gpus=ex.num_gpus, max_restarts=-1, max_task_retries=0,
                                 scheduling_strategy="SPREAD").remote(mc.kind, portable_weights(mc.weights), mc.device,
                                                                      dict(mc.options or {}))
                  for _ in range(ex.actors)]
        try:
            described = ray.get([a.describe.remote() for a in actors], timeout=ex.start_timeout_seconds)
        except Exception as exc:  # the model failed to build on a worker, or no worker had room in time
            for actor in actors:
                ray.kill(actor)
            first = str(exc).strip().splitlines()
            failures[name] = f"model {name!r} ({mc.kind}) failed to start on Ray: {type(exc).__name__}: {first[-1] if first else ''}"
            log.error("%s; rules using it will fail until this is fixed", failures[name])
            continue
        shas = {d["info"].weights_sha256 for d in described}
        if len(shas) > 1:
            for actor in actors:
                ray.kill(actor)
            failures[name] = f"model {name!r}: Ray workers loaded different weights ({', '.join(sorted(map(str, shas)))}): install the same wheel everywhere"
            log.error("%s", failures[name])
            continue
        proxy = RayEnhancer(name, actors, described[0]["info"], uses_guidance=described[0]["uses_guidance"],
                            retries=ex.retries, call_timeout=ex.call_timeout_seconds)
        try:
            records = ResidentModels._guidance(name, mc, proxy, storage_root)
        except gd.GuidanceError as exc:
            failures[name] = f"model {name!r}: guidance unusable: {exc}"
            log.error("%s", failures[name])
            continue
        loaded[name] = ResidentModel(name=name, enhancer=proxy, device=proxy.device,
                                     batch_size=int(getattr(mc, "batch_size", 4) or 4), guidance=records,
                                     load_seconds=time.perf_counter() - started)
        log.info("model %s (%s) on %d Ray actor(s) in %.2f s: %s%s", name, mc.kind, len(actors), loaded[name].load_seconds,
                 ", ".join(f"pid {d['pid']} on {d['host']} ({d['device']})" for d in described),
                 "; guidance " + ", ".join(f"{k}={g.id}/{g.method}" for k, g in records.items()) if records else "")
    return ResidentModels(loaded, failures)
