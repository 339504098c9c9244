"""The spool: stage folders under ``storage.root`` through which files move forward, beside the ledger.

::

    incoming/             received bytes land here as temp files (fsync, then rename away)
    receiving/            where the DICOM library streams an object while it arrives
    series/job-<id>/      instances of one job, named <SOPInstanceUID>.dcm
    outgoing/job-<id>/    derived objects of one job, awaiting delivery
    quarantine/           bytes that could not be understood or used, with <name>.reason.txt
    ledger.sqlite3        the ledger (:mod:`dicomnode.ledger`)

Everything here holds patient data and is private to the service user (0600 files, 0700 folders).
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from pathlib import Path

from dicomnode.durable import DIR_MODE, FILE_MODE, fsync_dir, fsync_file, make_dir, move, move_new, write_bytes
from dicomnode.ledger import Ledger, LedgerError, SeriesKey
from dicomnode.uids import safe_file_name

__all__ = ["Spool", "SpoolError"]


class SpoolError(RuntimeError):
    """The spool cannot be used (folder not writable, ledger corrupt)."""


class Spool:
    """Stage folders under one root plus the ledger database ``ledger.sqlite3`` beside them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        try:
            make_dir(self.root)
            for name in ("incoming", "receiving", "series", "outgoing", "quarantine"):
                make_dir(self.root / name)
            self.ledger = Ledger(self.root / "ledger.sqlite3")
        except (OSError, LedgerError) as exc:
            raise SpoolError(f"cannot use the spool under {self.root}: {exc}") from exc
        self.incoming = self.root / "incoming"
        self.chunks = self.root / "receiving"
        self.series_dir = self.root / "series"
        self.outgoing = self.root / "outgoing"
        self.quarantine_dir = self.root / "quarantine"

    # -- paths -------------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh name in incoming/ for bytes being received."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def job_dir(self, job_id: int) -> Path:
        """series/job-<id>, created on first use. A new folder's entry in series/ is made durable (fsync of
        series/) before any instance is renamed into it, or a power cut could lose the folder with its
        acknowledged instances. A job's folder is created by its first instance, inside the ledger's write
        transaction, so it exists (and is durable) before the job's row can be seen by :meth:`accept`'s fast path."""
        path = self.series_dir / f"job-{job_id}"
        try:
            os.mkdir(path, DIR_MODE)
        except FileExistsError:
            return path
        except FileNotFoundError:  # series/ itself was removed: recreate the chain
            make_dir(path)
            fsync_dir(self.root)
        fsync_dir(self.series_dir)
        return path

    def outgoing_dir(self, job_id: int) -> Path:
        return make_dir(self.outgoing / f"job-{job_id}")

    @staticmethod
    def too_full(folder: Path, high_percent: float) -> str | None:
        """Why the file system holding ``folder`` is too full to write into (use at or above ``high_percent``,
        storage.disk_high_watermark_percent), or None. One statvfs: cheap enough before every output."""
        total, used, free = shutil.disk_usage(folder)
        percent = 100.0 * used / total if total else 100.0
        if percent >= high_percent:
            return (f"disk holding {folder} is {percent:.1f}% full ({free // 1024**2} MiB free), at or above "
                    f"storage.disk_high_watermark_percent {high_percent:g}%")
        return None

    # -- receive -----------------------------------------------------------------------------
    def write_incoming(self, data: bytes | memoryview) -> Path:
        """Land received bytes durably in incoming/ (temp file, fsync, rename)."""
        return write_bytes(self.incoming / f"{uuid.uuid4().hex}.dcm", data)

    def accept(self, landed: Path, key: SeriesKey, *, sop_uid: str, sop_class_uid: str, calling_aet: str,
               now: float | None = None, synced: bool = True, size: int | None = None) -> tuple[int, Path]:
        """Move a landed file into its job folder and record it; returns (job id, final path).

        When the series already has a collecting job (every instance but a series' first), the file is
        linked into that job's folder (never replacing a file there) and the folder fsynced *before* the
        ledger's write transaction, which then holds the write lock only for its commit: parallel
        associations no longer queue behind each other's syncs. Should the job move on in between, the file
        is moved again under the transaction, as a series' first instance always is. A crash before the
        commit leaves a file without a row, as it always could; the sender had no Success for it.

        ``synced=False``: the landed file is not fsynced yet (the native engine). On the fast path it is
        synced once linked into its job folder, one fsync where there were two (in incoming/, which wrote
        incoming/ for nothing, then the folder's); before a rename that may replace an acknowledged copy it
        is synced first. ``size``: the landed file's, when the caller has it already (one stat fewer).
        """
        size = landed.stat().st_size if size is None else size

        def place(job_id: int, source: Path) -> Path:
            # incoming/ is emptied at start-up (clean_incoming), so its entry need not be made durable; the node
            # created what lands there with FILE_MODE, so no chmod (which would also dirty the synced inode)
            return move(source, self.job_dir(job_id) / f"{safe_file_name(sop_uid)}.dcm",
                        mode=None if source.parent == self.incoming else FILE_MODE,
                        sync_source=source.parent not in (self.incoming, self.chunks))

        job_id = self.ledger.collecting_job(key) if landed.parent == self.incoming else None
        if job_id is not None:
            try:  # never replaces: a copy already in the folder may belong to a job that moved on meanwhile
                final = move_new(landed, self.job_dir(job_id) / f"{safe_file_name(sop_uid)}.dcm",
                                 sync_file=not synced)
            except FileExistsError:
                final = None  # a resent SOP Instance: replaced under the transaction below
            if final is not None:
                synced = True
                if self.ledger.record_instance(job_id, key, sop_uid=sop_uid, sop_class_uid=sop_class_uid,
                                               path=final, size=size, now=now):
                    return job_id, final
                landed = final  # the job moved on meanwhile: from its folder into the series' next job
        if not synced:
            fsync_file(landed)
        source = landed
        return self.ledger.add_instance(key, sop_uid=sop_uid, sop_class_uid=sop_class_uid, calling_aet=calling_aet,
                                        size=size, place=lambda job: place(job, source), now=now)

    def quarantine(self, data: bytes | memoryview | Path, reason: str, *, keep_source: bool = False) -> Path:
        """Keep bytes we could not understand or use, with the reason beside them, for a human to look at.

        ``keep_source`` leaves a spooled file where it is (the ledger still points at it) and puts a
        hard link, or a copy across file systems, in quarantine instead of moving it.
        """
        name = f"{time.strftime('%Y%m%dT%H%M%S')}-{uuid.uuid4().hex[:12]}.dcm"
        target = self.quarantine_dir / name
        if isinstance(data, Path) and keep_source:
            try:
                os.link(data, target)
            except OSError:
                shutil.copyfile(data, target)
                os.chmod(target, FILE_MODE)
            fsync_dir(self.quarantine_dir)
        elif isinstance(data, Path):
            move(data, target)
        else:
            write_bytes(target, data)
        write_bytes(target.with_name(name[:-4] + ".reason.txt"), (reason.rstrip() + "\n").encode())
        return target

    def clean_incoming(self) -> int:
        """Remove what a crash or an aborted transfer left in incoming/ and receiving/ (never acknowledged,
        so the sender resends)."""
        removed = 0
        for folder in (self.incoming, self.chunks):
            for path in folder.rglob("*"):
                if path.is_file():
                    path.unlink(missing_ok=True)
                    removed += 1
        return removed

    def close(self) -> None:
        self.ledger.close()
