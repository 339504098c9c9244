"""Series assembly: a series is complete once no instance of it arrived for ``series_quiet_seconds``.

DICOM has no "end of series" message, so quiet time is the only signal (mercure waits 60 s,
MONAI Deploy 5 s). The receive side already groups instances into one ``collecting`` job per
series (see :meth:`dicomnode.spool.Spool.accept`); here the quiet clock turns those jobs
``complete``. An instance that arrives after its series' job was formed opens a follow-up job,
so late arrivals are processed too instead of being lost or re-running the whole series.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from dicomnode.spool import Ledger

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
