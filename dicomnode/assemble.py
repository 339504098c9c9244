"""Series assembly: which instances form a series, and when a series is complete.

A series is one (patient, study, series UID); it is complete once no instance of it arrived for
``series_quiet_seconds``.

DICOM has no "end of series" message, so quiet time is the only signal (mercure waits 60 s,
MONAI Deploy 5 s). The receive side already groups instances into one ``collecting`` job per
series (see :meth:`dicomnode.spool.Spool.accept`); here the quiet clock turns those jobs
``complete``. An instance that arrives after its series' job was formed opens a follow-up job,
so late arrivals are processed too instead of being lost or re-running the whole series.

:func:`series_from_job` turns a complete job into the :class:`~dicomnode.domain.Series` the pipeline
takes; :func:`series_from_files` groups files on disk the same way the receiver files them (the same
Part 10 reader, the same identity), so ``dicomnode route``/``enhance`` and the live node agree.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

from dicomnode.domain import Instance, Series, patient_key
from dicomnode.headers import read_tags
from dicomnode.ledger import InstanceRecord, JobRecord, Ledger
from dicomnode.part10 import PATIENT_ID, read_uids

log = logging.getLogger(__name__)


class Assembler:
    """Turns quiet ``collecting`` jobs into ``complete`` ones; ``tick`` is one pass, ``run`` loops."""

    def __init__(
        self, ledger: Ledger, quiet_seconds: float, *, on_complete: Callable[[int], None] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if quiet_seconds < 0:
            raise ValueError(f"series_quiet_seconds must be >= 0, got {quiet_seconds}")
        self.ledger = ledger
        self.quiet_seconds = quiet_seconds
        self.on_complete = on_complete
        self.clock = clock

    def tick(self) -> list[int]:
        """Complete every series quiet for long enough; returns the job ids that became complete."""
        done = self.ledger.complete_quiet_jobs(self.quiet_seconds, now=self.clock())
        for job_id in done:
            job = self.ledger.job(job_id)
            count = len(self.ledger.instances(job_id))
            log.info(
                "job %d complete: series %s, %d instances%s", job_id, job.series_uid if job else "?", count,
                f" (follow-up of job {job.follow_up_of})" if job and job.follow_up_of else "",
            )
            if self.on_complete is not None:
                self.on_complete(job_id)
        return done

    def poll_interval(self) -> float:
        """Check a few times per quiet period, but not busily."""
        return min(1.0, max(0.05, self.quiet_seconds / 4))

    def run(self, stop: threading.Event) -> None:
        while not stop.is_set():
            try:
                self.tick()
            except Exception:  # a locked or busy ledger must not end assembly for good
                log.exception("assembly pass failed; retrying")
            stop.wait(self.poll_interval())


def _tags(path: Path, keywords: set[str]) -> dict[str, Any]:
    """Routing tags of a spooled file; an unreadable header routes as "no tags" and fails alone later."""
    try:
        return read_tags(path, keywords)
    except Exception as exc:  # the UIDs parsed on receive, yet the header is broken further on
        log.warning("cannot read routing tags of %s: %s", path.name, exc)
        return {}


def series_from_job(job: JobRecord, instances: Sequence[InstanceRecord], keywords: Iterable[str]) -> Series:
    """The series of a ledger job, with the tags its rules need (``keywords``) read from the spooled headers."""
    keywords = set(keywords)
    return Series(
        patient_key=job.patient_key, study_uid=job.study_uid, series_uid=job.series_uid, calling_aet=job.calling_aet,
        job_id=job.id, instances=tuple(Instance(inst.path, _tags(inst.path, keywords), inst.id) for inst in instances),
    )


def series_from_files(paths: Iterable[Path], keywords: Iterable[str], calling_aet: str = "", *,
                      as_received: bool = False) -> tuple[list[Series], list[tuple[Path, str]]]:
    """Group files into series the way the receiver does; files it would refuse are returned with the reason.

    ``as_received``: keep one instance per SOPInstanceUID in a series, as the receiver does
    (:meth:`~dicomnode.ledger.Ledger.add_instance`): a later file of the same SOPInstanceUID replaces the
    earlier one, in the earlier one's place (``dicomnode route`` shows what the node would hold).
    """
    keywords = set(keywords)
    groups: dict[tuple[str, str, str], dict[str | int, Instance]] = {}
    skipped: list[tuple[Path, str]] = []
    for n, path in enumerate(paths):
        try:
            uids = read_uids(path)
        except (ValueError, OSError) as exc:  # what the live node answers with 0xC210
            skipped.append((path, f"the node would refuse it: {exc}"))
            continue
        key = (patient_key(uids[PATIENT_ID]), uids["StudyInstanceUID"], uids["SeriesInstanceUID"])
        groups.setdefault(key, {})[uids["SOPInstanceUID"] if as_received else n] = Instance(Path(path), _tags(Path(path), keywords))
    series = [Series(patient_key=k[0], study_uid=k[1], series_uid=k[2], instances=tuple(v.values()), calling_aet=calling_aet)
              for k, v in groups.items()]
    return series, skipped
