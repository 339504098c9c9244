"""Retention: delete spooled and delivered patient data once it has served its purpose.

A node that keeps every received study forever is both a disk-full outage waiting to happen and a
growing store of PHI nobody audits. ``sweep`` removes, by age of the job's last state change:

* the instance and output folders of ``done`` jobs after ``storage.retention_days_delivered``;
* those of ``failed`` and ``gated`` jobs after ``storage.retention_days_failed`` (longer by default, so
  a human can still look at them and ``dicomnode resend`` them);
* quarantined bytes (and their reason files) after ``storage.retention_days_failed``;
* leftovers in ``incoming/`` older than a day (a crash mid-transfer: never acknowledged, so the
  sender has them and will resend);
* files written by a ``folder`` destination (``*.dcm`` and leftover partial files) after
  ``storage.retention_days_delivered``, when the folder is inside ``storage.root`` or its
  destination says ``swept_by_retention: true`` (:func:`outbox_folders`); by file age, since the
  node cannot know whether the reader of the folder has taken them.

``None`` means keep forever. Jobs that are still collecting, processing or delivering are never
touched whatever their age. The ledger rows stay (marked ``purged``) so ``status`` and audits still
show what passed through; only the pixel-bearing files go. The server calls ``sweep`` periodically.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from dicomnode.config import NodeConfig, StorageConfig
from dicomnode.destinations.folder import FolderSettings
from dicomnode.ledger import JobState
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

DAY = 86400.0
INCOMING_STALE_SECONDS = DAY  # no C-STORE stays in flight for a day
SWEEP_INTERVAL_SECONDS = 3600.0  # how often the server calls sweep()


@dataclass
class RetentionSummary:
    """What one sweep removed; ``errors`` names paths that could not be deleted (and stay for next time)."""

    jobs_purged: dict[str, int] = field(default_factory=lambda: {"done": 0, "failed": 0, "gated": 0})
    files_removed: int = 0
    bytes_freed: int = 0
    quarantine_removed: int = 0
    incoming_removed: int = 0
    outbox_removed: int = 0
    errors: list[str] = field(default_factory=list)

    @property
    def total_jobs(self) -> int:
        return sum(self.jobs_purged.values())

    def __str__(self) -> str:
        return (f"retention: {self.jobs_purged['done']} delivered, {self.jobs_purged['failed']} failed and "
                f"{self.jobs_purged['gated']} gated jobs purged, "
                f"{self.quarantine_removed} quarantined and {self.incoming_removed} stale incoming files removed, "
                + (f"{self.outbox_removed} delivered files removed from folder destinations, " if self.outbox_removed else "")
                + f"{self.files_removed} files / {self.bytes_freed / 1e6:.1f} MB freed"
                + (f", {len(self.errors)} errors" if self.errors else ""))


def _remove_tree(folder: Path, summary: RetentionSummary) -> bool:
    """Delete ``folder`` bottom-up, counting files; False when anything could not be removed."""
    if not folder.exists():
        return True
    ok = True
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        try:
            if path.is_dir() and not path.is_symlink():
                path.rmdir()
            else:
                size = path.lstat().st_size
                path.unlink()
                summary.files_removed += 1
                summary.bytes_freed += size
        except OSError as exc:
            ok = False
            summary.errors.append(f"{path}: {exc.strerror or exc}")
    try:
        folder.rmdir()
    except OSError as exc:
        ok = False
        summary.errors.append(f"{folder}: {exc.strerror or exc}")
    return ok


def outbox_folders(config: NodeConfig) -> list[Path]:
    """The folder destinations retention sweeps: inside ``storage.root``, or ``swept_by_retention: true``."""
    root = Path(config.storage.root).resolve()
    folders = []
    for settings in config.destinations.values():
        if not isinstance(settings, FolderSettings) or settings.swept_by_retention is False:
            continue
        folder = Path(settings.folder).resolve()
        if settings.swept_by_retention or folder.is_relative_to(root):
            folders.append(folder)
    return folders


def _is_outbox_file(path: Path) -> bool:
    """What a folder destination writes: ``UID.dcm``, or ``.UID.dcm.<hex>.part`` left by a crash."""
    return path.suffix == ".dcm" or (path.name.startswith(".") and path.name.endswith(".part"))


def _remove_old_files(folder: Path, older_than: float, summary: RetentionSummary,
                      only: Callable[[Path], bool] | None = None) -> int:
    removed = 0
    if not folder.is_dir():
        return 0
    for path in folder.iterdir():
        if only is not None and not only(path):
            continue
        try:
            st = path.lstat()
            if not path.is_file() or st.st_mtime >= older_than:
                continue
            path.unlink()
        except FileNotFoundError:
            continue  # moved away meanwhile (e.g. an incoming file just accepted)
        except OSError as exc:
            summary.errors.append(f"{path}: {exc.strerror or exc}")
            continue
        removed += 1
        summary.files_removed += 1
        summary.bytes_freed += st.st_size
    return removed


def sweep(storage: StorageConfig, spool: Spool, now: float | None = None, outboxes: Sequence[Path] = ()) -> RetentionSummary:
    """Apply ``storage.retention_days_*`` to the spool and to ``outboxes`` (:func:`outbox_folders`); safe while serving.

    ``now`` (epoch seconds) is injectable so tests and audits can ask "what would go at time T".
    A job is marked purged only when all its files are gone, so a failed deletion is retried.
    """
    now = time.time() if now is None else now
    summary = RetentionSummary()
    for state, days in ((JobState.DONE, storage.retention_days_delivered), (JobState.FAILED, storage.retention_days_failed),
                        (JobState.GATED, storage.retention_days_failed)):
        if days is None:
            continue
        for job_id in spool.ledger.expired_jobs(state, now - days * DAY):
            gone = [_remove_tree(base / f"job-{job_id}", summary) for base in (spool.series_dir, spool.outgoing)]
            if all(gone):
                spool.ledger.mark_purged(job_id)
                summary.jobs_purged[str(state)] += 1
    if storage.retention_days_failed is not None:
        summary.quarantine_removed = _remove_old_files(
            spool.quarantine_dir, now - storage.retention_days_failed * DAY, summary)
    summary.incoming_removed = _remove_old_files(spool.incoming, now - INCOMING_STALE_SECONDS, summary)
    if storage.retention_days_delivered is not None:
        for folder in outboxes:
            summary.outbox_removed += _remove_old_files(folder, now - storage.retention_days_delivered * DAY, summary,
                                                        only=_is_outbox_file)
    if summary.total_jobs or summary.quarantine_removed or summary.incoming_removed or summary.outbox_removed or summary.errors:
        log.info("%s", summary)
    for error in summary.errors[:10]:
        log.warning("retention could not remove %s", error)
    return summary
