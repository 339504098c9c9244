"""Durable spool (files in stage folders) and the SQLite ledger that records every state change.

The ledger is the single source of truth for a restart: whatever it says is unfinished (a job not
processed, an output not delivered) is picked up again by the next ``serve``. Files only move
forward through stage folders under ``storage.root``::

    incoming/             received bytes land here as temp files (fsync, then rename away)
    series/<job>/         instances of one job, named <SOPInstanceUID>.dcm
    outgoing/<job>/       derived objects of one job, awaiting delivery
    quarantine/           bytes that could not be understood, with <name>.reason.txt

Job states: ``collecting`` (instances still arriving) -> ``complete`` (series quiet) ->
``processing`` -> ``derived`` (outputs recorded, deliveries pending) -> ``done`` | ``failed``.
Delivery states: ``pending`` -> ``sent`` | ``dead_letter`` (``resend`` puts them back to pending).

SQLite runs in WAL mode with one connection per thread, so the SCP threads, the workers and the
dispatcher never share a connection; write transactions are short and ``BEGIN IMMEDIATE`` so two
writers queue instead of failing half-way.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

FILE_MODE = 0o600
DIR_MODE = 0o700

JOB_STATES = ("collecting", "complete", "processing", "derived", "done", "failed")
DELIVERY_STATES = ("pending", "sent", "dead_letter")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL DEFAULT '',
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    last_received_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    action TEXT,
    rule TEXT,
    model TEXT,
    error TEXT,
    follow_up_of INTEGER,
    purged INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state);
CREATE INDEX IF NOT EXISTS jobs_series ON jobs(series_uid, state);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    series_uid TEXT NOT NULL,
    sop_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    path TEXT NOT NULL,
    size INTEGER NOT NULL,
    received_at REAL NOT NULL,
    routed TEXT,
    UNIQUE(job_id, sop_uid)
);
CREATE TABLE IF NOT EXISTS outputs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    path TEXT NOT NULL,
    kind TEXT NOT NULL,
    UNIQUE(job_id, path)
);
CREATE TABLE IF NOT EXISTS deliveries (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    output_id INTEGER NOT NULL REFERENCES outputs(id),
    job_id INTEGER NOT NULL REFERENCES jobs(id),
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL,
    last_error TEXT,
    updated_at REAL NOT NULL,
    UNIQUE(output_id, destination)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries(state, next_attempt_at);
CREATE TABLE IF NOT EXISTS unmatched (
    job_id INTEGER PRIMARY KEY REFERENCES jobs(id),
    series_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    calling_aet TEXT NOT NULL,
    action TEXT NOT NULL,
    recorded_at REAL NOT NULL
);
"""


class SpoolError(RuntimeError):
    """The spool cannot be used (folder not writable, ledger corrupt)."""


@dataclass(frozen=True)
class InstanceRecord:
    id: int
    job_id: int
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    path: Path
    size: int
    received_at: float
    routed: str | None


@dataclass(frozen=True)
class JobRecord:
    id: int
    series_uid: str
    study_uid: str
    calling_aet: str
    state: str
    created_at: float
    last_received_at: float
    updated_at: float
    action: str | None
    rule: str | None
    model: str | None
    error: str | None
    follow_up_of: int | None
    purged: int = 0


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    output_id: int
    job_id: int
    destination: str
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    path: Path


def _mkdir(path: Path) -> Path:
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    return path


def write_atomic(path: Path, data: bytes | memoryview) -> None:
    """Write ``data`` so that ``path`` is either absent or complete, even across a power cut."""
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class Spool:
    """Stage folders under one root plus the ledger database ``ledger.sqlite3`` beside them."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root).resolve()
        try:
            _mkdir(self.root)
            for name in ("incoming", "series", "outgoing", "quarantine"):
                _mkdir(self.root / name)
        except OSError as exc:
            raise SpoolError(f"cannot create spool folders under {self.root}: {exc}") from exc
        self.incoming = self.root / "incoming"
        self.series_dir = self.root / "series"
        self.outgoing = self.root / "outgoing"
        self.quarantine_dir = self.root / "quarantine"
        self.ledger = Ledger(self.root / "ledger.sqlite3")

    # -- paths -------------------------------------------------------------------------------
    def temp_path(self) -> Path:
        """A fresh name in incoming/ for bytes being received."""
        return self.incoming / f"{uuid.uuid4().hex}.part"

    def job_dir(self, job_id: int) -> Path:
        return _mkdir(self.series_dir / f"job-{job_id}")

    def outgoing_dir(self, job_id: int) -> Path:
        return _mkdir(self.outgoing / f"job-{job_id}")

    # -- receive -----------------------------------------------------------------------------
    def write_incoming(self, data: bytes | memoryview) -> Path:
        """Land received bytes durably in incoming/ (temp file, fsync, rename)."""
        path = self.incoming / f"{uuid.uuid4().hex}.dcm"
        write_atomic(path, data)
        return path

    def accept(
        self,
        landed: Path,
        *,
        study_uid: str,
        series_uid: str,
        sop_uid: str,
        sop_class_uid: str,
        calling_aet: str,
        now: float | None = None,
    ) -> tuple[int, Path]:
        """Move a landed file into its job folder and record it; returns (job id, final path).

        A SOPInstanceUID already in the open job replaces the earlier copy (file and row), so a
        re-sent series never doubles. Instances arriving once the series' job has moved on start
        (or join) a follow-up job for that series.
        """
        now = time.time() if now is None else now
        size = landed.stat().st_size
        with self.ledger.transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE series_uid=? AND state='collecting' ORDER BY id DESC LIMIT 1",
                (series_uid,),
            ).fetchone()
            if row is None:
                prev = db.execute(
                    "SELECT MAX(id) FROM jobs WHERE series_uid=?", (series_uid,)
                ).fetchone()[0]
                job_id = db.execute(
                    "INSERT INTO jobs(series_uid, study_uid, calling_aet, state, created_at, last_received_at,"
                    " updated_at, follow_up_of) VALUES (?,?,?,'collecting',?,?,?,?)",
                    (series_uid, study_uid, calling_aet, now, now, now, prev),
                ).lastrowid
                if prev is not None:
                    log.info("series %s: instance after job %s was formed -> follow-up job %s", series_uid, prev, job_id)
            else:
                job_id = row[0]
                db.execute("UPDATE jobs SET last_received_at=?, updated_at=? WHERE id=?", (now, now, job_id))
            final = self.job_dir(job_id) / f"{_safe_name(sop_uid)}.dcm"
            os.replace(landed, final)
            db.execute(
                "INSERT INTO instances(job_id, series_uid, sop_uid, sop_class_uid, path, size, received_at)"
                " VALUES (?,?,?,?,?,?,?) ON CONFLICT(job_id, sop_uid) DO UPDATE SET"
                " sop_class_uid=excluded.sop_class_uid, path=excluded.path, size=excluded.size,"
                " received_at=excluded.received_at",
                (job_id, series_uid, sop_uid, sop_class_uid, str(final), size, now),
            )
        return int(job_id), final

    def quarantine(self, data: bytes | memoryview | Path, reason: str, *, keep_source: bool = False) -> Path:
        """Keep bytes we could not understand, with the reason beside them, for a human to look at.

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
        elif isinstance(data, Path):
            os.replace(data, target)
            os.chmod(target, FILE_MODE)
        else:
            write_atomic(target, data)
        write_atomic(target.with_name(name[:-4] + ".reason.txt"), (reason.rstrip() + "\n").encode())
        return target

    def clean_incoming(self) -> int:
        """Remove temp files a crash left in incoming/ (never acknowledged, so the sender resends)."""
        removed = 0
        for path in self.incoming.rglob("*"):  # including chunks/ (see Receiver)
            if path.is_file():
                path.unlink(missing_ok=True)
                removed += 1
        return removed

    def purge_job_files(self, job_id: int) -> None:
        """Delete a finished job's instance and output folders (retention)."""
        for base in (self.series_dir, self.outgoing):
            shutil.rmtree(base / f"job-{job_id}", ignore_errors=True)

    def close(self) -> None:
        self.ledger.close()


def _safe_name(uid: str) -> str:
    """UIDs are digits and dots; anything else (a malformed sender) is replaced, never a path."""
    cleaned = "".join(c if (c.isdigit() or c == ".") else "_" for c in uid.strip())
    return cleaned[:64] or "unnamed"


class Ledger:
    """SQLite ledger, one connection per thread (sqlite3 connections are not shareable)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []
        new = not self.path.exists()
        db = self._conn()
        if new:
            os.chmod(self.path, FILE_MODE)
        db.executescript(_SCHEMA)

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=NORMAL")
                db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as exc:
                raise SpoolError(f"ledger {self.path} cannot be opened: {exc}") from exc
            db.row_factory = sqlite3.Row
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE): commit on success, roll back on error."""
        db = self._conn()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        else:
            db.execute("COMMIT")

    def query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        return self._conn().execute(sql, params).fetchall()

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.ProgrammingError:
                    pass  # created in another thread that already ended
            self._all.clear()
        self._local = threading.local()

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: int) -> JobRecord | None:
        rows = self.query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return JobRecord(**dict(rows[0])) if rows else None

    def jobs(self, state: str | None = None) -> list[JobRecord]:
        if state is None:
            rows = self.query("SELECT * FROM jobs ORDER BY id")
        else:
            rows = self.query("SELECT * FROM jobs WHERE state=? ORDER BY id", (state,))
        return [JobRecord(**dict(r)) for r in rows]

    def instances(self, job_id: int) -> list[InstanceRecord]:
        rows = self.query("SELECT * FROM instances WHERE job_id=? ORDER BY id", (job_id,))
        return [
            InstanceRecord(**{**dict(r), "path": Path(r["path"])}) for r in rows  # type: ignore[arg-type]
        ]

    def complete_quiet_jobs(self, quiet_seconds: float, now: float | None = None) -> list[int]:
        """collecting -> complete for every series without a new instance for ``quiet_seconds``."""
        now = time.time() if now is None else now
        with self.transaction() as db:
            ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM jobs WHERE state='collecting' AND last_received_at <= ? ORDER BY id",
                    (now - quiet_seconds,),
                )
            ]
            for job_id in ids:
                db.execute("UPDATE jobs SET state='complete', updated_at=? WHERE id=?", (now, job_id))
        return ids

    def claim_job(self) -> JobRecord | None:
        """complete -> processing for the oldest complete job; None when there is none.

        The state check inside the write transaction means two workers never claim one job.
        """
        now = time.time()
        with self.transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state='complete' ORDER BY id LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state='processing', updated_at=? WHERE id=?", (now, row["id"]))
        return JobRecord(**{**dict(row), "state": "processing", "updated_at": now})

    def set_job(self, job_id: int, state: str, **fields: object) -> None:
        if state not in JOB_STATES:
            raise ValueError(f"unknown job state {state!r}")
        allowed = {"action", "rule", "model", "error"}
        unknown = set(fields) - allowed
        if unknown:
            raise ValueError(f"unknown job fields {sorted(unknown)}")
        sets = ", ".join(f"{k}=?" for k in fields)
        with self.transaction() as db:
            db.execute(
                f"UPDATE jobs SET state=?, updated_at=?{', ' + sets if sets else ''} WHERE id=?",
                (state, time.time(), *fields.values(), job_id),
            )

    def mark_routed(self, job_id: int, matched: Iterable[int], unmatched: Iterable[int]) -> None:
        """Record per instance whether the chosen rule matched it (unmatched ones are left alone)."""
        with self.transaction() as db:
            db.executemany("UPDATE instances SET routed='matched' WHERE id=?", [(i,) for i in matched])
            db.executemany("UPDATE instances SET routed='not_matched' WHERE id=?", [(i,) for i in unmatched])

    def record_unmatched(self, job: JobRecord, action: str) -> None:
        with self.transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO unmatched(job_id, series_uid, study_uid, calling_aet, action, recorded_at)"
                " VALUES (?,?,?,?,?,?)",
                (job.id, job.series_uid, job.study_uid, job.calling_aet, action, time.time()),
            )

    def record_outputs(
        self, job_id: int, paths: Sequence[Path], kind: str, destinations: Sequence[str], *, action: str,
        rule: str | None, model: str | None, error: str | None = None,
    ) -> int:
        """Outputs + one pending delivery per (output, destination), and the job -> derived, atomically.

        Re-recording the same outputs (a job redone after a crash) keeps the rows that exist, so
        a delivery already sent is not sent again.
        """
        now = time.time()
        created = 0
        with self.transaction() as db:
            for path in paths:
                db.execute(
                    "INSERT OR IGNORE INTO outputs(job_id, path, kind) VALUES (?,?,?)", (job_id, str(path), kind)
                )
                output_id = db.execute(
                    "SELECT id FROM outputs WHERE job_id=? AND path=?", (job_id, str(path))
                ).fetchone()[0]
                for dest in destinations:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO deliveries(output_id, job_id, destination, state, attempts,"
                        " next_attempt_at, updated_at) VALUES (?,?,?,'pending',0,?,?)",
                        (output_id, job_id, dest, now, now),
                    )
                    created += cur.rowcount
            db.execute(
                "UPDATE jobs SET state='derived', action=?, rule=?, model=?, error=?, updated_at=? WHERE id=?",
                (action, rule, model, error, now, job_id),
            )
        return created

    def outputs(self, job_id: int) -> list[Path]:
        return [Path(r[0]) for r in self.query("SELECT path FROM outputs WHERE job_id=? ORDER BY id", (job_id,))]

    # -- deliveries --------------------------------------------------------------------------
    def due_deliveries(self, now: float | None = None, limit: int = 50) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due, grouped so one destination comes first."""
        now = time.time() if now is None else now
        rows = self.query(
            "SELECT d.*, o.path AS path FROM deliveries d JOIN outputs o ON o.id = d.output_id"
            " WHERE d.state='pending' AND d.next_attempt_at <= ? ORDER BY d.destination, d.id LIMIT ?",
            (now, limit),
        )
        return [_delivery(r) for r in rows]

    def deliveries(self, job_id: int | None = None, state: str | None = None) -> list[DeliveryRecord]:
        sql = (
            "SELECT d.*, o.path AS path FROM deliveries d JOIN outputs o ON o.id = d.output_id WHERE 1=1"
        )
        params: list[object] = []
        if job_id is not None:
            sql += " AND d.job_id=?"
            params.append(job_id)
        if state is not None:
            sql += " AND d.state=?"
            params.append(state)
        return [_delivery(r) for r in self.query(sql + " ORDER BY d.id", params)]

    def next_due_at(self) -> float | None:
        row = self.query("SELECT MIN(next_attempt_at) FROM deliveries WHERE state='pending'")
        return row[0][0] if row else None

    def mark_sent(self, delivery_ids: Sequence[int]) -> None:
        now = time.time()
        with self.transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state='sent', attempts=attempts+1, last_error=NULL, updated_at=? WHERE id=?",
                [(now, d) for d in delivery_ids],
            )

    def mark_failed(self, delivery_id: int, error: str, *, max_attempts: int, retry_in: float) -> str:
        """One failed attempt: back to pending after ``retry_in`` s, or dead_letter at ``max_attempts``."""
        now = time.time()
        with self.transaction() as db:
            attempts = db.execute("SELECT attempts FROM deliveries WHERE id=?", (delivery_id,)).fetchone()[0] + 1
            state = "dead_letter" if attempts >= max_attempts else "pending"
            db.execute(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=?, updated_at=? WHERE id=?",
                (state, attempts, now + retry_in, error[:2000], now, delivery_id),
            )
        return state

    def settle_jobs(self) -> list[tuple[int, str]]:
        """derived -> done when every delivery is sent, -> failed when none is pending but some are dead.

        Returns the jobs that changed, as (id, new state).
        """
        now = time.time()
        changed: list[tuple[int, str]] = []
        with self.transaction() as db:
            rows = db.execute(
                "SELECT j.id,"
                " SUM(d.state='pending') AS pending, SUM(d.state='dead_letter') AS dead"
                " FROM jobs j LEFT JOIN deliveries d ON d.job_id=j.id WHERE j.state='derived' GROUP BY j.id"
            ).fetchall()
            for r in rows:
                pending, dead = r["pending"] or 0, r["dead"] or 0
                if pending:
                    continue
                if dead:
                    db.execute(
                        "UPDATE jobs SET state='failed', error=?, updated_at=? WHERE id=?",
                        (f"{dead} deliveries dead-lettered", now, r["id"]),
                    )
                    changed.append((r["id"], "failed"))
                else:
                    db.execute("UPDATE jobs SET state='done', updated_at=? WHERE id=?", (now, r["id"]))
                    changed.append((r["id"], "done"))
        return changed

    def resend(self, job_id: int | None = None) -> int:
        """dead_letter -> pending (attempts reset) for one job or all; their jobs go back to derived."""
        now = time.time()
        with self.transaction() as db:
            where = "state='dead_letter'" + (" AND job_id=?" if job_id is not None else "")
            params: tuple[object, ...] = (job_id,) if job_id is not None else ()
            jobs = [r[0] for r in db.execute(f"SELECT DISTINCT job_id FROM deliveries WHERE {where}", params)]
            count = db.execute(
                f"UPDATE deliveries SET state='pending', attempts=0, next_attempt_at=?, updated_at=? WHERE {where}",
                (now, now, *params),
            ).rowcount
            db.executemany(
                "UPDATE jobs SET state='derived', error=NULL, updated_at=? WHERE id=? AND state IN ('failed','done')",
                [(now, j) for j in jobs],
            )
        return count

    # -- restart and status ------------------------------------------------------------------
    def recover(self) -> list[int]:
        """After a crash or drain: jobs caught in ``processing`` go back to ``complete`` to be redone.

        Redoing is safe: derived UIDs are deterministic and outputs are written atomically, so a
        redo overwrites with identical objects instead of adding new ones.
        """
        with self.transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state='processing'")]
            db.execute("UPDATE jobs SET state='complete', updated_at=? WHERE state='processing'", (time.time(),))
        return ids

    def retry_pending_now(self) -> int:
        """Make every pending delivery due now: a restart is usually what follows fixing a peer."""
        now = time.time()
        with self.transaction() as db:
            return db.execute(
                "UPDATE deliveries SET next_attempt_at=? WHERE state='pending' AND next_attempt_at > ?", (now, now)
            ).rowcount

    def counts(self) -> dict[str, dict[str, int]]:
        jobs = {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        deliveries = {r[0]: r[1] for r in self.query("SELECT state, COUNT(*) FROM deliveries GROUP BY state")}
        return {"jobs": jobs, "deliveries": deliveries}

    def unmatched_series(self) -> list[sqlite3.Row]:
        return self.query("SELECT * FROM unmatched ORDER BY recorded_at")

    def expired_jobs(self, state: str, older_than: float) -> list[int]:
        """Finished jobs whose files are past retention and not purged yet."""
        return [
            r[0]
            for r in self.query(
                "SELECT id FROM jobs WHERE state=? AND updated_at < ? AND purged=0", (state, older_than)
            )
        ]

    def mark_purged(self, job_id: int) -> None:
        with self.transaction() as db:
            db.execute("UPDATE jobs SET purged=1 WHERE id=?", (job_id,))


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        id=row["id"],
        output_id=row["output_id"],
        job_id=row["job_id"],
        destination=row["destination"],
        state=row["state"],
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        path=Path(row["path"]),
    )
