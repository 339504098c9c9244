"""The SQLite ledger: every state change of instances, jobs and deliveries; the only module with SQL.

The ledger is the single source of truth for a restart: whatever it says is unfinished (a job not
processed, an output not delivered) is picked up again by the next ``serve``.

Job states (:class:`JobState`): ``collecting`` (instances still arriving) -> ``complete`` (series
quiet) -> ``processing`` -> ``derived`` (outputs recorded, deliveries pending) -> ``done`` | ``failed``
| ``gated`` (outputs held back by the quality gate). Delivery states (:class:`DeliveryState`):
``pending`` -> ``sent`` | ``dead_letter`` (``resend`` puts them back to pending).

A job ends ``failed`` rather than ``done`` when some of its instances were not enhanced (``not_enhanced``),
even once the others are delivered. A storage fault sends a ``processing`` job back to ``complete`` with
``retry_at`` and the reason in ``error`` (:meth:`Ledger.defer_job`). ``attempts`` counts the claims of a
job that ended without a recorded outcome, the current one included: a claim cut short by a crash stays
counted, so :meth:`Ledger.fail_poisoned` can fail a job that keeps killing the node.

A job is one series of one patient in one study: (patient key, StudyInstanceUID, SeriesInstanceUID).
The patient key is a hash of the PatientID, so the ledger holds no patient identifier; a faulty
modality that reuses a series UID for two patients gets two jobs, never one merged series.

SQLite runs in WAL mode with one connection per thread, so the SCP threads, the workers and the
dispatcher never share a connection; write transactions are short and ``BEGIN IMMEDIATE`` so two
writers queue instead of failing half-way. Writers in one process queue on a lock of the
:class:`Ledger` before SQLite's: SQLite's busy handler polls with sleeps of 1, 2, 5, 10, 25... ms,
which with four receiving associations cost more than the transactions themselves. ``synchronous=FULL``:
every commit is fsynced (about 0.25 ms on this project's test disk), because a C-STORE is answered
Success only once its row is committed, and with ``NORMAL`` a power cut could take back the last
committed rows while their files, already fsynced, stayed: instances acknowledged and then forgotten.
Received instances' rows share commits (:meth:`Ledger.record_instance`, flat combining): the WAL sync is
paid once per batch of rows that queued while the previous commit ran.
"""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from dicomnode.durable import FILE_MODE

__all__ = [
    "DeliveryRecord",
    "DeliveryState",
    "InstanceRecord",
    "JobRecord",
    "JobState",
    "Ledger",
    "LedgerError",
    "SeriesKey",
    "UnmatchedRecord",
]


class JobState(StrEnum):
    COLLECTING = "collecting"
    COMPLETE = "complete"
    PROCESSING = "processing"
    DERIVED = "derived"
    DONE = "done"
    FAILED = "failed"
    GATED = "gated"


class DeliveryState(StrEnum):
    PENDING = "pending"
    SENT = "sent"
    DEAD_LETTER = "dead_letter"


class LedgerError(RuntimeError):
    """The ledger cannot be used (not writable, corrupt)."""


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
# Columns added after the first release: (table, column, declaration). Added on open when missing.
_MIGRATIONS: tuple[tuple[str, str, str], ...] = (
    ("jobs", "patient_key", "TEXT NOT NULL DEFAULT ''"),
    ("jobs", "attempts", "INTEGER NOT NULL DEFAULT 0"),
    ("jobs", "details", "TEXT"),
    ("deliveries", "sending_since", "REAL"),
    ("jobs", "retry_at", "REAL"),
    ("jobs", "not_enhanced", "INTEGER NOT NULL DEFAULT 0"),
)


@dataclass(frozen=True)
class SeriesKey:
    """What makes a series one job: the patient (a hash of PatientID), the study and the series UID."""

    patient_key: str
    study_uid: str
    series_uid: str


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
    state: JobState
    created_at: float
    last_received_at: float
    updated_at: float
    action: str | None
    rule: str | None
    model: str | None
    error: str | None
    follow_up_of: int | None
    purged: int = 0
    patient_key: str = ""
    attempts: int = 0
    details: dict[str, Any] | None = None
    retry_at: float | None = None  # a deferred ``complete`` job is not claimed before this (storage fault)
    not_enhanced: int = 0  # matched instances that produced nothing: the job ends failed, not done


@dataclass(frozen=True)
class DeliveryRecord:
    id: int
    output_id: int
    job_id: int
    destination: str
    state: DeliveryState
    attempts: int
    next_attempt_at: float
    last_error: str | None
    path: Path
    sending_since: float | None = None


@dataclass(frozen=True)
class UnmatchedRecord:
    job_id: int
    series_uid: str
    study_uid: str
    calling_aet: str
    action: str
    recorded_at: float


def _job(row: sqlite3.Row) -> JobRecord:
    d = dict(row)
    d["state"] = JobState(d["state"])
    d["details"] = json.loads(d["details"]) if d.get("details") else None
    return JobRecord(**d)


def _delivery(row: sqlite3.Row) -> DeliveryRecord:
    return DeliveryRecord(
        id=row["id"], output_id=row["output_id"], job_id=row["job_id"], destination=row["destination"],
        state=DeliveryState(row["state"]), attempts=row["attempts"], next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"], path=Path(row["path"]), sending_since=row["sending_since"],
    )


def _instance(row: sqlite3.Row) -> InstanceRecord:
    return InstanceRecord(**{**dict(row), "path": Path(row["path"])})


class Ledger:
    """SQLite ledger, one connection per thread (sqlite3 connections are not shareable).

    ``readonly`` opens an existing ledger for inspection (status, tests) without taking write locks.
    """

    def __init__(self, path: Path, *, readonly: bool = False) -> None:
        self.path = Path(path)
        self.readonly = readonly
        self._local = threading.local()
        self._lock = threading.Lock()
        self._write = threading.RLock()  # this process's writers wait here, woken at once (see the module doc)
        self._pending: list[_Record] = []  # record_instance's requests waiting for a combined commit
        self._all: list[sqlite3.Connection] = []
        if readonly:
            if not self.path.is_file():
                raise LedgerError(f"no ledger at {self.path}")
            self._conn()
            return
        new = not self.path.exists()
        db = self._conn()
        if new:
            os.chmod(self.path, FILE_MODE)
        try:
            db.executescript(_SCHEMA)
            self._migrate(db)
        except sqlite3.DatabaseError as exc:
            raise LedgerError(f"ledger {self.path} cannot be used: {exc}") from exc

    @staticmethod
    def _migrate(db: sqlite3.Connection) -> None:
        for table, column, declaration in _MIGRATIONS:
            have = {r[1] for r in db.execute(f"PRAGMA table_info({table})")}
            if column not in have:
                db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {declaration}")

    def _conn(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            try:
                if self.readonly:
                    db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=30.0,
                                         isolation_level=None, check_same_thread=False)
                else:
                    db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
                    db.execute("PRAGMA journal_mode=WAL")
                    db.execute("PRAGMA synchronous=FULL")  # a commit is on disk: Success promises the row survives a power cut
                    db.execute("PRAGMA foreign_keys=ON")
            except sqlite3.DatabaseError as exc:
                raise LedgerError(f"ledger {self.path} cannot be opened: {exc}") from exc
            db.row_factory = sqlite3.Row
            self._local.db = db
            with self._lock:
                self._all.append(db)
        return db

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """A write transaction taken up front (BEGIN IMMEDIATE): commit on success, roll back on error."""
        db = self._conn()
        with self._write:
            db.execute("BEGIN IMMEDIATE")
            try:
                yield db
            except BaseException:
                db.execute("ROLLBACK")
                raise
            else:
                db.execute("COMMIT")

    def _query(self, sql: str, params: Sequence[object] = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if self.readonly and "no such table" in str(exc):
                return []  # a node that has not created its schema yet: nothing to show
            raise

    def close(self) -> None:
        with self._lock:
            for db in self._all:
                try:
                    db.close()
                except sqlite3.ProgrammingError:
                    pass  # created in another thread that already ended
            self._all.clear()
        self._local = threading.local()

    # -- receive -----------------------------------------------------------------------------
    def add_instance(
        self, key: SeriesKey, *, sop_uid: str, sop_class_uid: str, calling_aet: str, size: int,
        place: Callable[[int], Path], now: float | None = None,
    ) -> tuple[int, Path]:
        """Record one received instance in its series' collecting job; returns (job id, final path).

        ``place(job_id)`` moves the landed file into the job's folder and returns its path; it runs
        inside the transaction, so the row and the file agree. A SOPInstanceUID already in the open
        job replaces the earlier copy. Instances arriving once the series' job has moved on start (or
        join) a follow-up job for that series.
        """
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE series_uid=? AND study_uid=? AND patient_key=? AND state=?"
                " ORDER BY id DESC LIMIT 1",
                (key.series_uid, key.study_uid, key.patient_key, JobState.COLLECTING),
            ).fetchone()
            if row is None:
                prev = db.execute(
                    "SELECT MAX(id) FROM jobs WHERE series_uid=? AND study_uid=? AND patient_key=?",
                    (key.series_uid, key.study_uid, key.patient_key),
                ).fetchone()[0]
                job_id = db.execute(
                    "INSERT INTO jobs(series_uid, study_uid, patient_key, calling_aet, state, created_at,"
                    " last_received_at, updated_at, follow_up_of) VALUES (?,?,?,?,?,?,?,?,?)",
                    (key.series_uid, key.study_uid, key.patient_key, calling_aet, JobState.COLLECTING, now, now, now, prev),
                ).lastrowid
            else:
                job_id = row[0]
                db.execute("UPDATE jobs SET last_received_at=?, updated_at=? WHERE id=?", (now, now, job_id))
            final = place(int(job_id))
            _insert_instance(db, int(job_id), key, sop_uid, sop_class_uid, final, size, now)
        return int(job_id), final

    def collecting_job(self, key: SeriesKey) -> int | None:
        """The series' job that is still collecting, if any (a read: no write lock taken)."""
        rows = self._query(
            "SELECT id FROM jobs WHERE series_uid=? AND study_uid=? AND patient_key=? AND state=? ORDER BY id DESC LIMIT 1",
            (key.series_uid, key.study_uid, key.patient_key, JobState.COLLECTING))
        return int(rows[0][0]) if rows else None

    def record_instance(self, job_id: int, key: SeriesKey, *, sop_uid: str, sop_class_uid: str, path: Path, size: int,
                        now: float | None = None) -> bool:
        """Record an instance already made durable in ``job_id``'s folder, if that job still collects.

        The receive fast path (:meth:`~dicomnode.spool.Spool.accept`): the file's and the folder's syncs
        happen before, outside the write lock, so concurrent associations hold the lock only for the commit.
        Their rows share commits (flat combining): whoever gets the write lock commits every row queued by
        then in one transaction, one WAL sync for them all; the others find theirs done. A row that fails
        fails alone (a savepoint each). False (nothing written) when the job has moved on meanwhile; the
        caller then uses :meth:`add_instance`.
        """
        request = _Record(job_id, key, sop_uid, sop_class_uid, path, size, time.time() if now is None else now)
        with self._lock:
            self._pending.append(request)
        with self._write:
            if not request.done:
                with self._lock:
                    batch, self._pending = self._pending, []
                try:
                    with self._transaction() as db:
                        for r in batch:
                            r.apply(db)
                except BaseException as exc:  # the commit itself failed: nothing of the batch is recorded
                    for r in batch:
                        r.error, r.recorded = r.error or exc, False
                    raise
                finally:
                    for r in batch:
                        r.done = True
        if request.error is not None:
            raise request.error
        return request.recorded

    def series_conflicts(self, key: SeriesKey) -> list[int]:
        """Jobs with this series UID but another patient or study (a faulty UID generator)."""
        return [r[0] for r in self._query(
            "SELECT id FROM jobs WHERE series_uid=? AND (study_uid!=? OR patient_key!=?) ORDER BY id",
            (key.series_uid, key.study_uid, key.patient_key))]

    # -- jobs --------------------------------------------------------------------------------
    def job(self, job_id: int) -> JobRecord | None:
        rows = self._query("SELECT * FROM jobs WHERE id=?", (job_id,))
        return _job(rows[0]) if rows else None

    def jobs(self, state: JobState | str | None = None, *, limit: int | None = None, newest_first: bool = False,
             offset: int = 0) -> list[JobRecord]:
        sql = "SELECT * FROM jobs" + (" WHERE state=?" if state is not None else "")
        sql += " ORDER BY id DESC" if newest_first else " ORDER BY id"
        if limit is not None or offset:
            sql += f" LIMIT {int(limit) if limit is not None else -1} OFFSET {max(0, int(offset))}"
        rows = self._query(sql, (str(state),) if state is not None else ())
        return [_job(r) for r in rows]

    def instances(self, job_id: int) -> list[InstanceRecord]:
        return [_instance(r) for r in self._query("SELECT * FROM instances WHERE job_id=? ORDER BY id", (job_id,))]

    def all_instances(self) -> list[InstanceRecord]:
        return [_instance(r) for r in self._query("SELECT * FROM instances ORDER BY id")]

    def complete_quiet_jobs(self, quiet_seconds: float, now: float | None = None) -> list[int]:
        """collecting -> complete for every series without a new instance for ``quiet_seconds``."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            ids = [r[0] for r in db.execute(
                "SELECT id FROM jobs WHERE state=? AND last_received_at <= ? ORDER BY id",
                (JobState.COLLECTING, now - quiet_seconds))]
            for job_id in ids:
                db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (JobState.COMPLETE, now, job_id))
        return ids

    def claim_job(self) -> JobRecord | None:
        """complete -> processing for the oldest complete job that is due (attempts + 1); None when there is none.

        The state check inside the write transaction means two workers never claim one job. A deferred
        job (``retry_at`` in the future) waits; the jobs behind it are claimed meanwhile.
        """
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT * FROM jobs WHERE state=? AND (retry_at IS NULL OR retry_at <= ?) ORDER BY id LIMIT 1",
                             (JobState.COMPLETE, now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state=?, attempts=attempts+1, retry_at=NULL, updated_at=? WHERE id=?",
                       (JobState.PROCESSING, now, row["id"]))
        job = _job(row)
        return JobRecord(**{**job.__dict__, "state": JobState.PROCESSING, "updated_at": now, "attempts": job.attempts + 1,
                            "retry_at": None})

    def defer_job(self, job_id: int, reason: str, retry_in: float) -> float:
        """processing -> complete, not claimed again for ``retry_in`` s, ``reason`` shown by status (a storage fault:
        not the series' fault, so the claim is not counted as an attempt). Returns when it is due."""
        now = time.time()
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state=?, attempts=0, retry_at=?, error=?, updated_at=? WHERE id=? AND state=?",
                       (JobState.COMPLETE, now + retry_in, reason[:2000], now, job_id, JobState.PROCESSING))
        return now + retry_in

    def release_job(self, job_id: int) -> bool:
        """processing -> complete for a job a drain interrupted (not a crash: its claim is not counted)."""
        with self._transaction() as db:
            return db.execute("UPDATE jobs SET state=?, attempts=MAX(attempts-1, 0), updated_at=? WHERE id=? AND state=?",
                              (JobState.COMPLETE, time.time(), job_id, JobState.PROCESSING)).rowcount == 1

    def fail_poisoned(self, max_attempts: int) -> list[JobRecord]:
        """Before :meth:`recover`: jobs found ``processing`` whose ``max_attempts``-th claim did not finish (the node
        died during each) become ``failed`` with the reason; returns them as they are now."""
        now = time.time()
        with self._transaction() as db:
            rows = db.execute("SELECT id, attempts FROM jobs WHERE state=? AND attempts >= ? ORDER BY id",
                              (JobState.PROCESSING, max_attempts)).fetchall()
            for job_id, attempts in rows:
                db.execute("UPDATE jobs SET state=?, error=?, updated_at=? WHERE id=?",
                           (JobState.FAILED, f"processing crashed {attempts} times (node.max_job_attempts {max_attempts}): "
                            "the node died while processing this job each time; its sources are quarantined", now, job_id))
        return [job for job_id, _ in rows if (job := self.job(job_id)) is not None]

    def finish_job(self, job_id: int, state: JobState, *, action: str | None = None, rule: str | None = None,
                   model: str | None = None, error: str | None = None, details: dict[str, Any] | None = None,
                   outputs: Sequence[Path] = (), output_kind: str = "derived", destinations: Sequence[str] = (),
                   routed: tuple[Iterable[int], Iterable[int]] | None = None, not_enhanced: int = 0) -> int:
        """One transition for a processed job: routing marks, outputs with their pending deliveries, new state.

        ``not_enhanced`` (matched instances that produced nothing) makes a job that would settle ``done`` settle
        ``failed`` instead, its ``error`` naming them.

        Re-recording the same outputs (a job redone after a crash) keeps the rows that exist, so a
        delivery already sent is not sent again. Returns the number of deliveries created.
        """
        now = time.time()
        created = 0
        with self._transaction() as db:
            if routed is not None:
                matched, unmatched = routed
                db.executemany("UPDATE instances SET routed='matched' WHERE id=?", [(i,) for i in matched])
                db.executemany("UPDATE instances SET routed='not_matched' WHERE id=?", [(i,) for i in unmatched])
            for path in outputs:
                db.execute("INSERT OR IGNORE INTO outputs(job_id, path, kind) VALUES (?,?,?)", (job_id, str(path), output_kind))
                output_id = db.execute("SELECT id FROM outputs WHERE job_id=? AND path=?", (job_id, str(path))).fetchone()[0]
                for dest in destinations:
                    cur = db.execute(
                        "INSERT OR IGNORE INTO deliveries(output_id, job_id, destination, state, attempts,"
                        " next_attempt_at, updated_at) VALUES (?,?,?,?,0,?,?)",
                        (output_id, job_id, dest, DeliveryState.PENDING, now, now),
                    )
                    created += cur.rowcount
            db.execute(
                "UPDATE jobs SET state=?, action=?, rule=?, model=?, error=?, details=?, not_enhanced=?, retry_at=NULL,"
                " updated_at=? WHERE id=?",
                (JobState(state), action, rule, model, error, json.dumps(details) if details else None, not_enhanced, now,
                 job_id),
            )
        return created

    def set_job_state(self, job_id: int, state: JobState, *, error: str | None = None) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET state=?, error=?, updated_at=? WHERE id=?", (JobState(state), error, time.time(), job_id))

    def record_unmatched(self, job: JobRecord, action: str) -> None:
        with self._transaction() as db:
            db.execute(
                "INSERT OR REPLACE INTO unmatched(job_id, series_uid, study_uid, calling_aet, action, recorded_at)"
                " VALUES (?,?,?,?,?,?)",
                (job.id, job.series_uid, job.study_uid, job.calling_aet, action, time.time()),
            )

    def outputs(self, job_id: int) -> list[Path]:
        return [Path(r[0]) for r in self._query("SELECT path FROM outputs WHERE job_id=? ORDER BY id", (job_id,))]

    def reprocess(self, job_id: int) -> bool:
        """A finished job (done, failed, gated) back to ``complete`` with its attempts reset, or a deferred one made
        due now; False for a job in any other state. Outputs already recorded keep their deliveries (a sent
        one is not sent again)."""
        with self._transaction() as db:
            cur = db.execute(
                "UPDATE jobs SET state=?, attempts=0, error=NULL, retry_at=NULL, not_enhanced=0, updated_at=?"
                " WHERE id=? AND (state IN (?,?,?) OR (state=? AND retry_at IS NOT NULL))",
                (JobState.COMPLETE, time.time(), job_id, JobState.DONE, JobState.FAILED, JobState.GATED, JobState.COMPLETE))
            return cur.rowcount == 1

    # -- deliveries --------------------------------------------------------------------------
    def due_deliveries(self, now: float | None = None, limit: int = 50, destination: str | None = None) -> list[DeliveryRecord]:
        """Pending deliveries whose next attempt is due (one destination's, or all grouped by destination)."""
        now = time.time() if now is None else now
        sql = ("SELECT d.*, o.path AS path FROM deliveries d JOIN outputs o ON o.id = d.output_id"
               " WHERE d.state=? AND d.next_attempt_at <= ?")
        params: list[object] = [DeliveryState.PENDING, now]
        if destination is not None:
            sql += " AND d.destination=?"
            params.append(destination)
        rows = self._query(sql + " ORDER BY d.destination, d.id LIMIT ?", (*params, limit))
        return [_delivery(r) for r in rows]

    def deliveries(self, job_id: int | None = None, state: DeliveryState | str | None = None) -> list[DeliveryRecord]:
        sql = "SELECT d.*, o.path AS path FROM deliveries d JOIN outputs o ON o.id = d.output_id WHERE 1=1"
        params: list[object] = []
        if job_id is not None:
            sql += " AND d.job_id=?"
            params.append(job_id)
        if state is not None:
            sql += " AND d.state=?"
            params.append(str(state))
        return [_delivery(r) for r in self._query(sql + " ORDER BY d.id", params)]

    def sending(self) -> list[DeliveryRecord]:
        """Pending deliveries of a batch on its way (``sending_since`` set), oldest first."""
        rows = self._query("SELECT d.*, o.path AS path FROM deliveries d JOIN outputs o ON o.id = d.output_id"
                           " WHERE d.state=? AND d.sending_since IS NOT NULL ORDER BY d.sending_since, d.id",
                           (DeliveryState.PENDING,))
        return [_delivery(r) for r in rows]

    def next_due_at(self, destination: str | None = None) -> float | None:
        sql = "SELECT MIN(next_attempt_at) FROM deliveries WHERE state=?"
        params: list[object] = [DeliveryState.PENDING]
        if destination is not None:
            sql += " AND destination=?"
            params.append(destination)
        row = self._query(sql, params)
        return row[0][0] if row else None

    def mark_sending(self, delivery_ids: Sequence[int], since: float | None = None) -> None:
        """Note that a batch is on its way (shown by status; cleared by mark_sent/mark_failed)."""
        since = time.time() if since is None else since
        with self._transaction() as db:
            db.executemany("UPDATE deliveries SET sending_since=? WHERE id=?", [(since, d) for d in delivery_ids])

    def mark_not_sent(self, delivery_ids: Sequence[int]) -> None:
        """A batch member that was never tried (the node was stopping): no longer sending, no attempt counted."""
        with self._transaction() as db:
            db.executemany("UPDATE deliveries SET sending_since=NULL WHERE id=?", [(d,) for d in delivery_ids])

    def mark_sent(self, delivery_ids: Sequence[int]) -> None:
        now = time.time()
        with self._transaction() as db:
            db.executemany(
                "UPDATE deliveries SET state=?, attempts=attempts+1, last_error=NULL, sending_since=NULL, updated_at=?"
                " WHERE id=?", [(DeliveryState.SENT, now, d) for d in delivery_ids])

    def mark_failed(self, delivery_id: int, error: str, *, max_attempts: int, retry_in: float) -> DeliveryState:
        """One failed attempt: back to pending after ``retry_in`` s, or dead_letter at ``max_attempts``."""
        now = time.time()
        with self._transaction() as db:
            attempts = db.execute("SELECT attempts FROM deliveries WHERE id=?", (delivery_id,)).fetchone()[0] + 1
            state = DeliveryState.DEAD_LETTER if attempts >= max_attempts else DeliveryState.PENDING
            db.execute(
                "UPDATE deliveries SET state=?, attempts=?, next_attempt_at=?, last_error=?, sending_since=NULL,"
                " updated_at=? WHERE id=?", (state, attempts, now + retry_in, error[:2000], now, delivery_id))
        return state

    def settle_jobs(self) -> list[tuple[int, JobState]]:
        """derived -> done when every delivery is sent, -> failed when none is pending but some are dead.

        Returns the jobs that changed, as (id, new state).
        """
        now = time.time()
        changed: list[tuple[int, JobState]] = []
        with self._transaction() as db:
            rows = db.execute(
                "SELECT j.id, j.not_enhanced, j.error, SUM(d.state=?) AS pending, SUM(d.state=?) AS dead"
                " FROM jobs j LEFT JOIN deliveries d ON d.job_id=j.id WHERE j.state=? GROUP BY j.id",
                (DeliveryState.PENDING, DeliveryState.DEAD_LETTER, JobState.DERIVED)).fetchall()
            for r in rows:
                pending, dead = r["pending"] or 0, r["dead"] or 0
                if pending:
                    continue
                if dead:
                    error = f"{dead} deliveries dead-lettered" + (f"; {r['error']}" if r["not_enhanced"] and r["error"] else "")
                    db.execute("UPDATE jobs SET state=?, error=?, updated_at=? WHERE id=?",
                               (JobState.FAILED, error[:2000], now, r["id"]))
                    changed.append((r["id"], JobState.FAILED))
                elif r["not_enhanced"]:  # the others are delivered; the job stays visible as failed with its reasons
                    db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (JobState.FAILED, now, r["id"]))
                    changed.append((r["id"], JobState.FAILED))
                else:
                    db.execute("UPDATE jobs SET state=?, updated_at=? WHERE id=?", (JobState.DONE, now, r["id"]))
                    changed.append((r["id"], JobState.DONE))
        return changed

    def resend(self, job_id: int | None = None) -> int:
        """dead_letter -> pending (attempts reset) for one job or all; their jobs go back to derived."""
        now = time.time()
        with self._transaction() as db:
            where = "state=?" + (" AND job_id=?" if job_id is not None else "")
            params: tuple[object, ...] = (DeliveryState.DEAD_LETTER, *((job_id,) if job_id is not None else ()))
            jobs = [r[0] for r in db.execute(f"SELECT DISTINCT job_id FROM deliveries WHERE {where}", params)]
            count = db.execute(
                f"UPDATE deliveries SET state=?, attempts=0, next_attempt_at=?, updated_at=? WHERE {where}",
                (DeliveryState.PENDING, now, now, *params)).rowcount
            db.executemany(  # a job with instances not enhanced keeps saying so
                "UPDATE jobs SET state=?, error=CASE WHEN not_enhanced > 0 THEN error END, updated_at=? WHERE id=? AND state IN (?,?)",
                [(JobState.DERIVED, now, j, JobState.FAILED, JobState.DONE) for j in jobs])
        return count

    def release_gated(self, job_id: int, destinations: Sequence[str]) -> int:
        """A ``gated`` job's outputs queued for ``destinations`` anyway (``resend --force``): the job becomes
        ``derived`` and its error says it was forced. Returns the deliveries created (0: not a gated job)."""
        now = time.time()
        created = 0
        with self._transaction() as db:
            row = db.execute("SELECT state, error FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row[0] != JobState.GATED:
                return 0
            for (output_id,) in db.execute("SELECT id FROM outputs WHERE job_id=? ORDER BY id", (job_id,)).fetchall():
                for dest in destinations:
                    created += db.execute(
                        "INSERT OR IGNORE INTO deliveries(output_id, job_id, destination, state, attempts,"
                        " next_attempt_at, updated_at) VALUES (?,?,?,?,0,?,?)",
                        (output_id, job_id, dest, DeliveryState.PENDING, now, now)).rowcount
            db.execute("UPDATE jobs SET state=?, error=?, updated_at=? WHERE id=?",
                       (JobState.DERIVED, f"sent despite the quality gate (resend --force): {row[1] or ''}"[:2000], now, job_id))
        return created

    # -- restart and status ------------------------------------------------------------------
    def recover(self) -> list[int]:
        """After a crash or drain: jobs caught in ``processing`` go back to ``complete`` to be redone.

        Redoing is safe: derived UIDs are deterministic and outputs are written atomically, so a
        redo overwrites with identical objects instead of adding new ones. Their ``attempts`` stay as they
        are (the claim that never finished counts); call :meth:`fail_poisoned` first.
        """
        with self._transaction() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM jobs WHERE state=?", (JobState.PROCESSING,))]
            db.execute("UPDATE jobs SET state=?, updated_at=? WHERE state=?", (JobState.COMPLETE, time.time(), JobState.PROCESSING))
            db.execute("UPDATE deliveries SET sending_since=NULL WHERE sending_since IS NOT NULL")
        return ids

    def retry_pending_now(self) -> int:
        """Make every pending delivery due now: a restart is usually what follows fixing a peer."""
        now = time.time()
        with self._transaction() as db:
            return db.execute("UPDATE deliveries SET next_attempt_at=? WHERE state=? AND next_attempt_at > ?",
                              (now, DeliveryState.PENDING, now)).rowcount

    def counts(self) -> dict[str, dict[str, int]]:
        jobs = {r[0]: r[1] for r in self._query("SELECT state, COUNT(*) FROM jobs GROUP BY state")}
        deliveries = {r[0]: r[1] for r in self._query("SELECT state, COUNT(*) FROM deliveries GROUP BY state")}
        return {"jobs": jobs, "deliveries": deliveries}

    def job_counts(self, job_ids: Sequence[int]) -> dict[int, dict[str, Any]]:
        """Per job: instances, outputs and deliveries by state (the admin views' counts), in three queries."""
        ids = [int(i) for i in job_ids]
        out: dict[int, dict[str, Any]] = {i: {"instances": 0, "bytes": 0, "outputs": 0, "deliveries": {}} for i in ids}
        if not ids:
            return out
        marks = ",".join("?" * len(ids))
        for r in self._query(f"SELECT job_id, COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE job_id IN ({marks})"
                             " GROUP BY job_id", ids):
            out[r[0]].update(instances=r[1], bytes=r[2])
        for r in self._query(f"SELECT job_id, COUNT(*) FROM outputs WHERE job_id IN ({marks}) GROUP BY job_id", ids):
            out[r[0]]["outputs"] = r[1]
        for r in self._query(f"SELECT job_id, state, COUNT(*) FROM deliveries WHERE job_id IN ({marks})"
                             " GROUP BY job_id, state", ids):
            out[r[0]]["deliveries"][r[1]] = r[2]
        return out

    def delivery_counts(self) -> dict[tuple[str, str], int]:
        """(destination, state) -> deliveries."""
        return {(r[0], r[1]): r[2] for r in self._query("SELECT destination, state, COUNT(*) FROM deliveries GROUP BY 1, 2")}

    def activity(self, since: float) -> dict[str, Any]:
        """What happened since ``since`` (epoch s): instances received and their bytes, jobs finished by state."""
        row = self._query("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM instances WHERE received_at >= ?", (since,))
        finished = {r[0]: r[1] for r in self._query("SELECT state, COUNT(*) FROM jobs WHERE updated_at >= ? AND state IN (?,?,?)"
                                                     " GROUP BY state", (since, JobState.DONE, JobState.FAILED, JobState.GATED))}
        return {"instances": row[0][0] if row else 0, "bytes": row[0][1] if row else 0, "jobs_finished": finished}

    def cancel_job(self, job_id: int, reason: str) -> JobState | None:
        """Stop a job that is not being processed: a collecting, complete (waiting) or gated job becomes ``failed``
        with ``reason``; a derived job's pending deliveries are dead-lettered with ``reason`` and the job fails.
        Returns the state it was in, or None when it cannot be cancelled (processing, done, failed, unknown)."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT state FROM jobs WHERE id=?", (job_id,)).fetchone()
            if row is None or row[0] not in (JobState.COLLECTING, JobState.COMPLETE, JobState.GATED, JobState.DERIVED):
                return None
            if row[0] == JobState.DERIVED:
                db.execute("UPDATE deliveries SET state=?, last_error=?, sending_since=NULL, updated_at=? WHERE job_id=? AND state=?",
                           (DeliveryState.DEAD_LETTER, reason[:2000], now, job_id, DeliveryState.PENDING))
            db.execute("UPDATE jobs SET state=?, error=?, retry_at=NULL, updated_at=? WHERE id=?",
                       (JobState.FAILED, reason[:2000], now, job_id))
            return JobState(row[0])

    def unmatched_series(self) -> list[UnmatchedRecord]:
        return [UnmatchedRecord(**dict(r)) for r in self._query("SELECT * FROM unmatched ORDER BY recorded_at")]

    def expired_jobs(self, state: JobState, older_than: float) -> list[int]:
        """Finished jobs whose files are past retention and not purged yet."""
        return [r[0] for r in self._query("SELECT id FROM jobs WHERE state=? AND updated_at < ? AND purged=0",
                                          (JobState(state), older_than))]

    def mark_purged(self, job_id: int) -> None:
        with self._transaction() as db:
            db.execute("UPDATE jobs SET purged=1 WHERE id=?", (job_id,))


def _insert_instance(db: sqlite3.Connection, job_id: int, key: SeriesKey, sop_uid: str, sop_class_uid: str, path: Path,
                     size: int, now: float) -> None:
    """The instance's row; a SOPInstanceUID already in the job is replaced by the later copy."""
    db.execute(
        "INSERT INTO instances(job_id, series_uid, sop_uid, sop_class_uid, path, size, received_at)"
        " VALUES (?,?,?,?,?,?,?) ON CONFLICT(job_id, sop_uid) DO UPDATE SET"
        " sop_class_uid=excluded.sop_class_uid, path=excluded.path, size=excluded.size,"
        " received_at=excluded.received_at",
        (job_id, key.series_uid, sop_uid, sop_class_uid, str(path), size, now),
    )


@dataclass(eq=False)
class _Record:
    """One :meth:`Ledger.record_instance` request, applied by whichever thread commits it."""

    job_id: int
    key: SeriesKey
    sop_uid: str
    sop_class_uid: str
    path: Path
    size: int
    now: float
    done: bool = False
    recorded: bool = False
    error: BaseException | None = None

    def apply(self, db: sqlite3.Connection) -> None:
        db.execute("SAVEPOINT record")
        try:
            updated = db.execute("UPDATE jobs SET last_received_at=MAX(last_received_at, ?), updated_at=? WHERE id=? AND state=?",
                                 (self.now, self.now, self.job_id, JobState.COLLECTING)).rowcount
            if updated:
                _insert_instance(db, self.job_id, self.key, self.sop_uid, self.sop_class_uid, self.path, self.size, self.now)
            db.execute("RELEASE record")
            self.recorded = bool(updated)
        except sqlite3.Error as exc:
            db.execute("ROLLBACK TO record")
            db.execute("RELEASE record")
            self.error = exc
