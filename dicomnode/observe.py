"""What the running node tells an observer (the admin surface's metrics), and the progress of long jobs.

The stages know nothing of Prometheus or HTTP: the server hands them an :class:`Observer` (whose methods
do nothing here) and :mod:`dicomnode.admin.metrics` implements it. :class:`ProgressBoard` follows the
frames of the jobs being processed, logs them every few seconds and answers the admin API.
Nothing here sees patient data: jobs are ids, series are UIDs, destinations are names.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dicomnode.destinations import Destination, SendOutcome
from dicomnode.domain import SeriesOutcome

log = logging.getLogger(__name__)

__all__ = ["JobProgress", "ObservedDestination", "Observer", "ProgressBoard"]

PROGRESS_LOG_SECONDS = 5.0  # a long job logs its progress this often


class Observer:
    """Events of the running node; every method is a no-op (subclass what you need). Called from the
    node's threads: an implementation must be thread-safe and quick, and must not raise."""

    def stored(self, status: int, seconds: float) -> None:
        """One C-STORE answered with ``status`` after ``seconds`` in the handler (0 = Success)."""

    def received_bytes(self, count: int) -> None:
        """``count`` bytes of PDUs read from a sender."""

    def processed(self, job_id: int, outcome: SeriesOutcome) -> None:
        """A job went through the pipeline (``outcome.timings``: seconds per stage)."""

    def sent(self, destination: str, ok: int, failed: int, seconds: float) -> None:
        """One batch sent to ``destination``: files stored, files not stored, seconds it took."""


class ObservedDestination(Destination):
    """A destination seen through an observer: each batch is timed and its outcomes counted."""

    def __init__(self, inner: Destination, observer: Observer) -> None:
        self.inner = inner
        self.observer = observer
        self.name = getattr(inner, "name", "?")

    def send(self, paths: Sequence[Path], progress: Callable[[SendOutcome], None] | None = None) -> list[SendOutcome]:
        started = time.perf_counter()
        outcomes = self.inner.send(paths, progress) if progress is not None else self.inner.send(paths)
        tried = [o for o in outcomes if getattr(o, "attempted", True)]
        try:
            self.observer.sent(self.name, sum(1 for o in tried if o.ok), sum(1 for o in tried if not o.ok),
                               time.perf_counter() - started)
        except Exception:  # an observer must never cost a delivery
            log.exception("observer failed")
        return outcomes

    def stop(self, *, abort: bool = False) -> None:
        self.inner.stop(abort=abort)

    def resume(self) -> None:
        self.inner.resume()

    def echo(self) -> tuple[bool, str]:
        return self.inner.echo()

    def __getattr__(self, item: str) -> Any:  # anything else a destination type offers
        return getattr(self.inner, item)


@dataclass
class JobProgress:
    """How far one job being processed is: frames through the model of the frames of its instances."""

    job_id: int
    series_uid: str
    frames_total: int
    instances_total: int
    started: float
    frames_done: int = 0
    instances_done: int = 0
    logged: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        elapsed = time.time() - self.started
        return {"frames_done": self.frames_done, "frames_total": self.frames_total,
                "instances_done": self.instances_done, "instances_total": self.instances_total,
                "seconds": round(elapsed, 1),
                "percent": round(100.0 * self.frames_done / self.frames_total, 1) if self.frames_total else None}


class ProgressBoard:
    """The jobs being processed now and how far each is; logs each every :data:`PROGRESS_LOG_SECONDS`."""

    def __init__(self, log_every: float = PROGRESS_LOG_SECONDS) -> None:
        self.log_every = log_every
        self._jobs: dict[int, JobProgress] = {}
        self._lock = threading.Lock()

    def start(self, job_id: int, series_uid: str, frames_total: int, instances_total: int) -> JobProgress:
        now = time.time()
        entry = JobProgress(job_id, series_uid, frames_total, instances_total, now, logged=now)
        with self._lock:
            self._jobs[job_id] = entry
        return entry

    def frames(self, job_id: int, count: int) -> None:
        self._advance(job_id, frames=count)

    def instances(self, job_id: int, count: int = 1) -> None:
        self._advance(job_id, instances=count)

    def _advance(self, job_id: int, frames: int = 0, instances: int = 0) -> None:
        with self._lock:
            entry = self._jobs.get(job_id)
            if entry is None:
                return
            entry.frames_done += frames
            entry.instances_done += instances
            now = time.time()
            due = now - entry.logged >= self.log_every
            if due:
                entry.logged = now
        if due:
            log.info("job %d series %s: %d of %d frames enhanced, %d of %d instances done, %.0f s so far", job_id,
                     entry.series_uid, entry.frames_done, entry.frames_total, entry.instances_done, entry.instances_total,
                     now - entry.started)

    def finish(self, job_id: int) -> None:
        with self._lock:
            self._jobs.pop(job_id, None)

    def get(self, job_id: int) -> dict[str, Any] | None:
        with self._lock:
            entry = self._jobs.get(job_id)
            return entry.as_dict() if entry is not None else None

    def snapshot(self) -> dict[int, dict[str, Any]]:
        with self._lock:
            return {job_id: entry.as_dict() for job_id, entry in self._jobs.items()}
