"""Spool folders and the ledger: states, duplicate handling, follow-up jobs, one patient per series,
delivery retries and restart recovery (all through the ledger's API)."""

from __future__ import annotations

import shutil
import stat
import threading
import time
from pathlib import Path

import pytest

from dicomnode.durable import write_bytes
from dicomnode.ledger import DeliveryState, JobState, SeriesKey
from dicomnode.spool import Spool


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    sp = Spool(tmp_path / "var")
    yield sp
    sp.close()


def land(spool: Spool, sop: str, series: str = "1.2.3.4", payload: bytes = b"x", now: float = 100.0,
         patient: str = "p1", study: str = "1.2.3") -> tuple[int, Path]:
    landed = spool.write_incoming(payload)
    return spool.accept(landed, SeriesKey(patient, study, series), sop_uid=sop,
                        sop_class_uid="1.2.840.10008.5.1.4.1.1.7", calling_aet="SCANNER", now=now)


def test_folders_and_files_are_private(spool: Spool) -> None:
    for folder in (spool.root, spool.incoming, spool.series_dir, spool.outgoing, spool.quarantine_dir):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    _, path = land(spool, "1.2.3.4.1")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((spool.root / "ledger.sqlite3").stat().st_mode) == 0o600
    assert list(spool.incoming.iterdir()) == []


def test_duplicate_sop_replaces_and_late_instance_opens_follow_up(spool: Spool) -> None:
    job, first = land(spool, "1.2.3.4.1", payload=b"old")
    job2, again = land(spool, "1.2.3.4.1", payload=b"new")
    land(spool, "1.2.3.4.2")
    assert job == job2 and first == again
    rows = spool.ledger.instances(job)
    assert [r.sop_uid for r in rows] == ["1.2.3.4.1", "1.2.3.4.2"]
    assert again.read_bytes() == b"new"

    assert spool.ledger.complete_quiet_jobs(5.0, now=104.0) == []  # not quiet yet
    assert spool.ledger.complete_quiet_jobs(5.0, now=105.0) == [job]
    follow, _ = land(spool, "1.2.3.4.1", now=106.0)
    assert follow != job
    assert spool.ledger.job(follow).follow_up_of == job
    assert spool.ledger.job(job).state == JobState.COMPLETE
    assert len(spool.ledger.instances(job)) == 2  # the earlier job keeps its own copy


def test_one_series_uid_from_two_patients_or_studies_never_shares_a_job(spool: Spool) -> None:
    """A faulty UID generator reuses a SeriesInstanceUID: each (patient, study, series) is its own job."""
    a, _ = land(spool, "1.2.3.4.1", patient="alice")
    b, _ = land(spool, "1.2.3.4.2", patient="bob")
    c, _ = land(spool, "1.2.3.4.3", patient="alice", study="9.9.9")
    d, _ = land(spool, "1.2.3.4.4", patient="alice")
    assert len({a, b, c}) == 3 and d == a
    assert [i.sop_uid for i in spool.ledger.instances(a)] == ["1.2.3.4.1", "1.2.3.4.4"]
    assert spool.ledger.series_conflicts(SeriesKey("alice", "1.2.3", "1.2.3.4")) == [b, c]


def test_claim_is_exclusive_and_recover_redoes_processing(spool: Spool) -> None:
    job, _ = land(spool, "1.2.3.4.1")
    spool.ledger.complete_quiet_jobs(0.0, now=200.0)
    claimed: list[object] = []
    threads = [threading.Thread(target=lambda: claimed.append(spool.ledger.claim_job())) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [c.id for c in claimed if c is not None] == [job]
    assert spool.ledger.job(job).state == JobState.PROCESSING
    assert spool.ledger.job(job).attempts == 1
    assert spool.ledger.recover() == [job]
    assert spool.ledger.job(job).state == JobState.COMPLETE


def test_delivery_retry_dead_letter_and_resend(spool: Spool, tmp_path: Path) -> None:
    job, _ = land(spool, "1.2.3.4.1")
    spool.ledger.complete_quiet_jobs(0.0, now=200.0)
    spool.ledger.claim_job()
    out = spool.outgoing_dir(job) / "1.2.9.dcm"
    write_bytes(out, b"derived")
    finish = dict(action="enhance", rule="r", model="m", outputs=[out], destinations=["pacs", "archive"])
    created = spool.ledger.finish_job(job, JobState.DERIVED, **finish)
    assert created == 2 and spool.ledger.job(job).state == JobState.DERIVED
    # recording again (a redo after a crash) adds nothing
    assert spool.ledger.finish_job(job, JobState.DERIVED, **finish) == 0

    due = spool.ledger.due_deliveries()
    assert {d.destination for d in due} == {"pacs", "archive"}
    archive = next(d for d in due if d.destination == "archive")
    pacs = next(d for d in due if d.destination == "pacs")
    spool.ledger.mark_sent([archive.id])
    assert spool.ledger.mark_failed(pacs.id, "0xA700 refused", max_attempts=2, retry_in=60) == DeliveryState.PENDING
    assert [d.id for d in spool.ledger.due_deliveries()] == []  # backing off
    assert spool.ledger.settle_jobs() == []  # still pending
    assert spool.ledger.mark_failed(pacs.id, "association rejected", max_attempts=2, retry_in=60) == DeliveryState.DEAD_LETTER
    assert spool.ledger.settle_jobs() == [(job, JobState.FAILED)]
    dead = spool.ledger.deliveries(state=DeliveryState.DEAD_LETTER)
    assert [(d.destination, d.attempts, d.last_error) for d in dead] == [("pacs", 2, "association rejected")]

    assert spool.ledger.resend(job) == 1
    assert spool.ledger.job(job).state == JobState.DERIVED
    (again,) = spool.ledger.due_deliveries()
    assert again.attempts == 0 and again.destination == "pacs"
    spool.ledger.mark_sent([again.id])
    assert spool.ledger.settle_jobs() == [(job, JobState.DONE)]
    assert spool.ledger.counts()["deliveries"] == {"sent": 2}


def test_quarantine_keeps_bytes_and_reason(spool: Spool) -> None:
    kept = spool.quarantine(b"not dicom", "cannot parse")
    assert kept.read_bytes() == b"not dicom"
    assert kept.with_name(kept.name[:-4] + ".reason.txt").read_text() == "cannot parse\n"


def test_ledger_survives_reopen(tmp_path: Path) -> None:
    sp = Spool(tmp_path / "var")
    job, _ = land(sp, "1.2.3.4.1")
    sp.close()
    sp2 = Spool(tmp_path / "var")
    assert sp2.ledger.job(job).state == JobState.COLLECTING
    sp2.close()


def test_restart_makes_backed_off_deliveries_due_and_routing_is_recorded(spool: Spool) -> None:
    job, _ = land(spool, "1.2.3.4.1")
    land(spool, "1.2.3.4.2")
    spool.ledger.complete_quiet_jobs(0.0, now=200.0)
    claimed = spool.ledger.claim_job()
    first, second = spool.ledger.instances(job)
    spool.ledger.record_unmatched(claimed, "forward")
    (row,) = spool.ledger.unmatched_series()
    assert (row.series_uid, row.calling_aet, row.action) == ("1.2.3.4", "SCANNER", "forward")

    spool.ledger.finish_job(job, JobState.DERIVED, action="forward", outputs=[first.path], output_kind="forward",
                            destinations=["pacs"], routed=([first.id], [second.id]))
    assert [i.routed for i in spool.ledger.instances(job)] == ["matched", "not_matched"]
    (d,) = spool.ledger.due_deliveries()
    spool.ledger.mark_failed(d.id, "down", max_attempts=5, retry_in=3600)
    assert spool.ledger.due_deliveries() == []
    assert spool.ledger.retry_pending_now() == 1
    assert [x.id for x in spool.ledger.due_deliveries()] == [d.id]


def test_unknown_job_state_is_refused(spool: Spool) -> None:
    job, _ = land(spool, "1.2.3.4.1")
    with pytest.raises(ValueError, match="finished"):
        spool.ledger.set_job_state(job, "finished")  # type: ignore[arg-type]


def test_writers_of_one_process_queue_on_the_ledger_not_on_sqlites_busy_handler(spool: Spool) -> None:
    """With SQLite's busy wait off, a second writer fails with "database is locked" unless it waited on the
    ledger's own lock (woken at release instead of polling with sleeps)."""
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        with spool.ledger._transaction() as db:
            db.execute("PRAGMA busy_timeout=0")
            holding.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    result: list[object] = []

    def write() -> None:
        spool.ledger._conn().execute("PRAGMA busy_timeout=0")  # this thread's connection
        result.append(land(spool, "1.2.3.4.9"))

    writer = threading.Thread(target=write)
    writer.start()
    try:
        writer.join(0.3)
        assert writer.is_alive() and not result  # waiting for the holder, not failed
    finally:
        release.set()
        holder.join(10)
        writer.join(10)
    assert len(result) == 1


def test_a_new_job_folder_is_made_durable_in_series_once(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """series/ is fsynced when a job's folder is created (else a power cut could lose the folder with its
    acknowledged instances), and not again for the job's later instances."""
    import dicomnode.spool as spool_module

    synced: list[Path] = []
    real = spool_module.fsync_dir
    monkeypatch.setattr(spool_module, "fsync_dir", lambda folder: (synced.append(Path(folder)), real(folder))[1])
    job, _ = land(spool, "1.2.3.4.1")
    assert synced == [spool.series_dir]
    assert land(spool, "1.2.3.4.2")[0] == job
    assert synced == [spool.series_dir]
    land(spool, "1.2.3.5.1", series="1.2.3.5")
    assert synced == [spool.series_dir, spool.series_dir]
    shutil.rmtree(spool.series_dir)  # gone altogether: recreated, and its own entry synced too
    _, path = land(spool, "1.2.3.6.1", series="1.2.3.6")
    assert path.is_file()
    assert synced[2:] == [spool.root, spool.series_dir]


def test_accept_chmods_only_files_the_node_did_not_create(spool: Spool, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What lands in incoming/ was created 0600 by the node: no chmod (it would dirty the inode just synced).
    A file from elsewhere is still made private."""
    import os

    foreign = tmp_path / "foreign.dcm"
    foreign.write_bytes(b"y")
    foreign.chmod(0o644)
    key = SeriesKey("p1", "1.2.3", "1.2.3.4")
    _, path = spool.accept(foreign, key, sop_uid="1.2.3.4.9", sop_class_uid="1.2.840.10008.5.1.4.1.1.7",
                           calling_aet="SCANNER")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    chmods: list[str] = []
    real = os.chmod
    monkeypatch.setattr(os, "chmod", lambda p, *a, **k: (chmods.append(str(p)), real(p, *a, **k))[1])
    _, path = land(spool, "1.2.3.4.10")
    assert chmods == [] and stat.S_IMODE(path.stat().st_mode) == 0o600


def test_every_ledger_writer_commits_to_disk(spool: Spool) -> None:
    """Success is answered once the row is committed; with WAL and synchronous=NORMAL a power cut could take
    the last commits back while their files (fsynced) stay. Every writing connection, in every thread, runs
    synchronous=FULL (2) in WAL mode."""
    seen: list[tuple[int, str]] = []

    def probe() -> None:
        db = spool.ledger._conn()
        seen.append((db.execute("PRAGMA synchronous").fetchone()[0], db.execute("PRAGMA journal_mode").fetchone()[0]))

    probe()
    worker = threading.Thread(target=probe)
    worker.start()
    worker.join()
    assert seen == [(2, "wal"), (2, "wal")]


def test_later_instances_are_placed_before_the_write_lock(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """A series' first instance creates its job and folder under the ledger's write lock; every later one is
    renamed into the folder and the folder fsynced outside it, so parallel associations hold the lock only
    for their commits (issue 16)."""
    import dicomnode.durable as durable

    real_fsync_dir = durable.fsync_dir
    lock_held: list[bool] = []

    def watched(folder: Path) -> None:
        if folder.parent == spool.series_dir:
            free: list[bool] = []

            def probe() -> None:  # another thread: the RLock's owner could always take it again
                free.append(spool.ledger._write.acquire(blocking=False))
                if free[0]:
                    spool.ledger._write.release()

            thread = threading.Thread(target=probe)
            thread.start()
            thread.join()
            lock_held.append(not free[0])
        real_fsync_dir(folder)

    monkeypatch.setattr(durable, "fsync_dir", watched)
    job, first = land(spool, "1.2.3.4.1")
    assert lock_held == [True]  # the rename into the new job's folder, under the transaction
    lock_held.clear()
    again, second = land(spool, "1.2.3.4.2", now=101.0)
    assert again == job and lock_held == [False]
    assert sorted(i.path for i in spool.ledger.instances(job)) == sorted([first, second])
    assert second.parent == first.parent and second.is_file()


def test_a_job_that_moves_on_before_the_commit_gets_the_instance_in_its_follow_up(spool: Spool,
                                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path placed the file in a job that completed before the row was written: the row is not
    written there; the file moves on into the series' follow-up job, row and file together."""
    job, first = land(spool, "1.2.3.4.1")
    record = spool.ledger.record_instance

    def job_completes_first(*args: object, **kwargs: object) -> bool:
        assert spool.ledger.complete_quiet_jobs(0.0, now=200.0) == [job]
        return record(*args, **kwargs)

    monkeypatch.setattr(spool.ledger, "record_instance", job_completes_first)
    follow, path = land(spool, "1.2.3.4.2", now=101.0)
    assert follow != job and spool.ledger.job(follow).follow_up_of == job
    assert [i.path for i in spool.ledger.instances(job)] == [first]
    assert [i.path for i in spool.ledger.instances(follow)] == [path]
    assert path.parent == spool.job_dir(follow) and path.is_file()
    assert sorted(p.name for p in first.parent.iterdir()) == [first.name]  # nothing left in the completed job's folder
    assert list(spool.incoming.iterdir()) == []


def test_a_stale_job_never_loses_its_copy_to_a_resent_instance(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The fast path read a job as collecting just before it completed, and the sender resends an instance
    that job already holds: the completed job's file is never replaced; the resend goes to the follow-up."""
    job, first = land(spool, "1.2.3.4.1", payload=b"original")
    assert spool.ledger.complete_quiet_jobs(0.0, now=200.0) == [job]
    monkeypatch.setattr(spool.ledger, "collecting_job", lambda key: job)  # the stale read
    follow, path = land(spool, "1.2.3.4.1", payload=b"resent", now=201.0)
    assert follow != job and path != first
    assert first.read_bytes() == b"original" and path.read_bytes() == b"resent"
    assert [i.path for i in spool.ledger.instances(job)] == [first]


def test_rows_of_parallel_associations_share_commits(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    """record_instance combines the rows queued while another commit runs into one transaction (one WAL
    sync for all); each caller still learns its own outcome: a job that moved on refuses only its row."""
    ledger = spool.ledger
    open_key, done_key = SeriesKey("p", "1.2", "1.2.1"), SeriesKey("p", "1.2", "1.2.2")
    open_job, _ = land(spool, "1.2.1.0", series="1.2.1", study="1.2", patient="p")
    done_job, _ = land(spool, "1.2.2.0", series="1.2.2", study="1.2", patient="p")
    ledger.complete_quiet_jobs(0.0, now=100.0)
    open_job, _ = land(spool, "1.2.1.1", series="1.2.1", study="1.2", patient="p", now=150.0)  # its follow-up
    transactions: list[int] = []
    real = type(ledger)._transaction
    started = threading.Event()

    def slow(self: object):  # the first commit waits until the other threads have queued their rows
        transactions.append(1)
        if len(transactions) == 1:
            started.set()
            deadline = time.monotonic() + 5
            while len(ledger._pending) < 7 and time.monotonic() < deadline:
                time.sleep(0.01)
        return real(self)

    monkeypatch.setattr(type(ledger), "_transaction", slow)
    results: dict[int, bool] = {}

    def record(i: int) -> None:
        if i:
            started.wait(5)
        job, key = (done_job, done_key) if i == 3 else (open_job, open_key)
        results[i] = ledger.record_instance(job, key, sop_uid=f"1.2.1.9.{i}", sop_class_uid="1.2",
                                            path=Path(f"/spool/{i}.dcm"), size=i, now=160.0 + i)

    threads = [threading.Thread(target=record, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: i != 3 for i in range(8)}
    assert len(transactions) == 2  # the first row alone, then the seven queued meanwhile together
    uids = {r.sop_uid for r in ledger.instances(open_job)}
    assert uids == {"1.2.1.1"} | {f"1.2.1.9.{i}" for i in range(8) if i != 3}
    assert not any(r.sop_uid.startswith("1.2.1.9") for r in ledger.instances(done_job))
    assert ledger.job(open_job).last_received_at == 167.0
