"""Dispatch: send pending deliveries to their destinations in batches, retry with backoff, dead-letter.

The dispatch policy lives here and nowhere else. Each destination is served by its own worker
(:meth:`Dispatcher.run_destination`), so a stalled PACS delays only its own deliveries. A batch is
one call to the destination's ``send`` (one association for a PACS); each file's outcome goes into
the ledger as soon as the destination reports it: sent, or failed and due again after an
exponential backoff, or dead-lettered after ``dispatch.max_attempts``. So a crash in the middle of
a batch re-sends only the file that was on the wire, not the files already stored. A file the
destination did not try because the node was stopping is not a failed attempt. ``dicomnode resend``
puts dead letters back to pending.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from dicomnode.config import DispatchPolicy
from dicomnode.destinations import Destination, Progress, SendOutcome
from dicomnode.ledger import DeliveryRecord, DeliveryState, Ledger
from dicomnode.redact import exception_text

log = logging.getLogger(__name__)

__all__ = ["Dispatcher", "backoff_seconds"]


def backoff_seconds(attempt: int, policy: DispatchPolicy) -> float:
    """Delay before retry number ``attempt`` (1 = first retry): initial * 2**(attempt-1), capped."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    exponent = min(attempt - 1, 64)  # 2**64 * any sane initial is far above any cap
    return float(min(policy.backoff_initial_seconds * 2.0**exponent, policy.backoff_max_seconds))


class Dispatcher:
    """Sends the ledger's pending deliveries through the configured destinations."""

    def __init__(self, ledger: Ledger, destinations: Mapping[str, Destination], policy: DispatchPolicy) -> None:
        self.ledger = ledger
        self.destinations = dict(destinations)
        self.policy = policy

    def run_once(self, destination: str | None = None) -> bool:
        """Send one batch of due deliveries per destination (or for ``destination``); False when none was due.

        Deliveries to a destination no longer configured fail for good (dead letter) with the reason.
        """
        limit = self.policy.batch_size * (1 if destination else max(1, len(self.destinations) + 1))
        due = self.ledger.due_deliveries(limit=limit, destination=destination)
        if not due:
            return False
        batches: dict[str, list[DeliveryRecord]] = {}
        for d in due:
            batch = batches.setdefault(d.destination, [])
            if len(batch) < self.policy.batch_size:
                batch.append(d)
        for name, batch in batches.items():
            self._send_batch(name, batch)
        return True

    def stop(self, *, abort: bool = False) -> None:
        """The node is stopping: destinations start no new file; with ``abort`` they cut transfers in flight."""
        for name, dest in self.destinations.items():
            try:
                dest.stop(abort=abort)
            except Exception:  # noqa: BLE001 - one destination must not keep the others from stopping
                log.exception("destination %s could not be stopped", name)

    def _send_batch(self, name: str, batch: Sequence[DeliveryRecord]) -> None:
        dest = self.destinations.get(name)
        if dest is None:
            for d in batch:
                self.ledger.mark_failed(d.id, f"destination {name!r} is not configured", max_attempts=1, retry_in=0)
            return
        self.ledger.mark_sending([d.id for d in batch])
        waiting: dict[str, list[DeliveryRecord]] = {}
        for d in batch:
            waiting.setdefault(str(d.path), []).append(d)
        tally: Counter[str] = Counter()

        def record(outcome: SendOutcome) -> None:
            pending = waiting.get(str(outcome.path))
            if pending:
                self._record(name, pending.pop(0), outcome, tally)

        outcomes = self._send(dest, [d.path for d in batch], record)
        for path, left in waiting.items():  # outcomes the destination returned without reporting them
            for d in left:
                self._record(name, d, outcomes.get(path) or SendOutcome(d.path, False, None, "no outcome returned for this file"), tally)
        log.info("sent %d/%d to %s%s%s%s", tally["sent"], len(batch), name,
                 f"; {tally['retry']} retry later" if tally["retry"] else "",
                 f"; {tally['dead']} dead-lettered" if tally["dead"] else "",
                 f"; {tally['untried']} not tried (stopping)" if tally["untried"] else "")

    def _record(self, name: str, d: DeliveryRecord, outcome: SendOutcome, tally: Counter[str]) -> None:
        """One file's outcome into the ledger, as one transaction."""
        if outcome.ok:
            self.ledger.mark_sent([d.id])
            tally["sent"] += 1
            return
        if not outcome.attempted:
            self.ledger.mark_not_sent([d.id])
            tally["untried"] += 1
            return
        detail = (f"status 0x{outcome.status:04X}: " if outcome.status is not None else "") + outcome.detail
        retry_in = backoff_seconds(d.attempts + 1, self.policy)
        state = self.ledger.mark_failed(d.id, detail, max_attempts=self.policy.max_attempts, retry_in=retry_in)
        if state == DeliveryState.DEAD_LETTER:
            tally["dead"] += 1
            log.error("delivery %d (job %d) to %s dead-lettered after %d attempts: %s", d.id, d.job_id, name, d.attempts + 1, detail)
        else:
            tally["retry"] += 1

    @staticmethod
    def _send(destination: Destination, paths: Sequence[Path], progress: Progress) -> dict[str, SendOutcome]:
        try:
            outcomes = destination.send(list(paths), progress)
        except Exception as exc:  # the contract says send never raises; a bug there must not lose state
            reason = exception_text(exc)  # the message may quote the object being sent
            log.error("destination %s raised %s", getattr(destination, "name", "?"), reason,
                      exc_info=log.isEnabledFor(logging.DEBUG))
            return {str(p): SendOutcome(Path(p), False, None, reason) for p in paths}
        return {str(o.path): o for o in outcomes}

    def run_destination(self, name: str | None, stop: threading.Event, wake: threading.Event, poll_seconds: float = 1.0) -> None:
        """Worker loop for one destination (``None``: deliveries whose destination is not configured)."""
        while not stop.is_set():
            if name is None:
                orphans = [d for d in self.ledger.due_deliveries(limit=self.policy.batch_size) if d.destination not in self.destinations]
                for d in orphans:
                    self._send_batch(d.destination, [d])
                sent = bool(orphans)
            else:
                sent = self.run_once(name)
            for job_id, state in self.ledger.settle_jobs():
                log.info("job %d %s", job_id, state)
            if sent:
                continue
            due = self.ledger.next_due_at(name) if name is not None else None
            wait = poll_seconds if due is None else min(poll_seconds, max(0.0, due - time.time()))
            wake.wait(wait)
            wake.clear()
