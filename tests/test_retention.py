"""Retention sweep over a real spool + ledger: what goes, what stays, and that nothing in flight is touched."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from dicomnode.config import StorageConfig
from dicomnode.ledger import JobState, SeriesKey
from dicomnode.retention import DAY, sweep
from dicomnode.spool import Spool

from reliability import ct_dataset, uid


def _config(delivered: float | None = 7.0, failed: float | None = 30.0) -> StorageConfig:
    return StorageConfig(root=Path("/unused"), retention_days_delivered=delivered, retention_days_failed=failed)


def _job(spool: Spool, series: str, state: str, count: int = 2) -> int:
    """A job with ``count`` received instances, one output and one delivery per output, in ``state``."""
    job_id = 0
    for i in range(count):
        ds = ct_dataset("retention", series, i)
        landed = spool.write_incoming(b"DICM-test-bytes-" + str(i).encode())
        job_id, _ = spool.accept(landed, SeriesKey("p", ds.StudyInstanceUID, ds.SeriesInstanceUID),
                                 sop_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID, calling_aet="MOD")
    if state == "collecting":
        return job_id
    out = spool.outgoing_dir(job_id) / f"{uid(series + '/out')}.dcm"
    out.write_bytes(b"derived")
    spool.ledger.finish_job(job_id, JobState.DERIVED, action="enhance", rule="r", model="m", outputs=[out], destinations=["pacs"])
    if state in ("done", "failed"):
        delivery = spool.ledger.deliveries(job_id)[0]
        if state == "done":
            spool.ledger.mark_sent([delivery.id])
        else:
            spool.ledger.mark_failed(delivery.id, "peer down", max_attempts=1, retry_in=0)
        assert spool.ledger.settle_jobs() == [(job_id, state)]
    elif state != "derived":
        spool.ledger.set_job_state(job_id, JobState(state))
    return job_id


def _files(spool: Spool, job_id: int) -> list[Path]:
    return [p for base in (spool.series_dir, spool.outgoing) for p in (base / f"job-{job_id}").rglob("*")]


@pytest.fixture
def spool(tmp_path: Path) -> Spool:
    s = Spool(tmp_path / "var")
    yield s
    s.close()


def test_sweep_by_age_and_state(spool: Spool) -> None:
    jobs = {state: _job(spool, f"s-{state}", state)
            for state in ("done", "failed", "gated", "collecting", "processing", "derived")}
    assert all(_files(spool, j) for j in jobs.values())
    now = time.time()

    early = sweep(_config(), spool, now + 6 * DAY)  # nothing is old enough yet
    assert early.total_jobs == 0 and early.files_removed == 0

    week = sweep(_config(), spool, now + 8 * DAY)
    assert week.jobs_purged == {"done": 1, "failed": 0, "gated": 0}
    assert not _files(spool, jobs["done"]) and not (spool.series_dir / f"job-{jobs['done']}").exists()
    assert week.files_removed == 3 and week.bytes_freed > 0  # 2 instances + 1 output
    assert _files(spool, jobs["failed"]) and _files(spool, jobs["gated"])  # kept longer, for resend (--force)

    month = sweep(_config(), spool, now + 31 * DAY)
    assert month.jobs_purged == {"done": 0, "failed": 1, "gated": 1}  # the done job is not purged twice
    assert not _files(spool, jobs["failed"]) and not _files(spool, jobs["gated"])

    years = sweep(_config(), spool, now + 1000 * DAY)  # work in flight is never touched, however old
    assert years.total_jobs == 0
    for state in ("collecting", "processing", "derived"):
        assert len(_files(spool, jobs[state])) >= 2, state
    # the ledger keeps the history, marked purged
    rows = {j.id: j.purged for j in spool.ledger.jobs()}
    assert rows[jobs["done"]] == 1 and rows[jobs["failed"]] == 1 and rows[jobs["derived"]] == 0
    assert spool.ledger.job(jobs["done"]).state == "done"


def test_keep_forever_when_unset(spool: Spool) -> None:
    done, failed = _job(spool, "a", "done"), _job(spool, "b", "failed")
    summary = sweep(_config(delivered=None, failed=None), spool, time.time() + 10_000 * DAY)
    assert summary.total_jobs == 0 and _files(spool, done) and _files(spool, failed)


def test_zero_days_purges_finished_jobs_at_once(spool: Spool) -> None:
    done = _job(spool, "a", "done")
    summary = sweep(_config(delivered=0), spool, time.time() + 1)
    assert summary.jobs_purged["done"] == 1 and not _files(spool, done)


def test_quarantine_and_stale_incoming(spool: Spool) -> None:
    now = time.time()
    old_q = spool.quarantine(b"garbage", "cannot parse")
    new_q = spool.quarantine(b"garbage2", "cannot parse")
    reason = old_q.with_name(old_q.name[:-4] + ".reason.txt")
    assert reason.exists()
    for path in (old_q, reason):
        os.utime(path, (now - 40 * DAY, now - 40 * DAY))
    stale = spool.incoming / "crashed.part"
    stale.write_bytes(b"half")
    os.utime(stale, (now - 2 * DAY, now - 2 * DAY))
    fresh = spool.incoming / "in-flight.part"
    fresh.write_bytes(b"arriving")

    summary = sweep(_config(), spool, now)
    assert summary.quarantine_removed == 2 and summary.incoming_removed == 1
    assert not old_q.exists() and not reason.exists() and new_q.exists()
    assert not stale.exists() and fresh.exists()
    assert "2 quarantined and 1 stale incoming files removed" in str(summary)


def test_undeletable_files_are_reported_and_retried(spool: Spool, monkeypatch: pytest.MonkeyPatch) -> None:
    done = _job(spool, "a", "done")
    folder = spool.series_dir / f"job-{done}"
    real_unlink = Path.unlink

    def refuse(self: Path, missing_ok: bool = False) -> None:  # a file held by another process (or EPERM)
        if self.parent == folder:
            raise PermissionError(1, "Operation not permitted", str(self))
        real_unlink(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", refuse)
    summary = sweep(_config(delivered=0), spool, time.time() + 1)
    assert summary.jobs_purged["done"] == 0 and summary.errors
    assert any("Operation not permitted" in e for e in summary.errors)
    assert spool.ledger.job(done).purged == 0  # not marked: the next sweep tries again
    monkeypatch.setattr(Path, "unlink", real_unlink)
    assert sweep(_config(delivered=0), spool, time.time() + 1).jobs_purged["done"] == 1
    assert not folder.exists()


def test_running_server_applies_retention(tmp_path: Path) -> None:
    """The node's housekeeping thread sweeps: with retention 0 days, a delivered job's files go."""
    from dicomnode.config import parse_config
    from dicomnode.server import Server, ServerOptions

    from reliability import free_port, node_config, raw_object, send_raw, wait_until

    cfg = parse_config(node_config(tmp_path / "var", free_port(), {"out": {"folder": str(tmp_path / "out")}},
                                   node={"series_quiet_seconds": 0.3},
                                   storage={"retention_days_delivered": 0, "retention_days_failed": 30}), tmp_path)
    server = Server(cfg, options=ServerOptions(retention_interval_seconds=0.2, dispatch_poll_seconds=0.2))
    server.start()
    try:
        datasets = [ct_dataset("retention", "live", i) for i in range(2)]
        assert send_raw(server.port, [raw_object(ds) for ds in datasets], tmp_path / "raw") == [0, 0]
        ledger = server.spool.ledger
        wait_until(lambda: [j.purged for j in ledger.jobs("done")] == [1], 30, 0.1, "job delivered and purged")
        job = ledger.jobs("done")[0]
        assert not (server.spool.series_dir / f"job-{job.id}").exists()
        assert not (server.spool.outgoing / f"job-{job.id}").exists()
        assert len(list((tmp_path / "out").glob("*.dcm"))) == 2  # what was delivered stays delivered
    finally:
        server.stop(timeout=10)


def test_folder_destination_files_are_private_and_swept_when_inside_the_root(tmp_path: Path, spool: Spool) -> None:
    """A folder destination writes 0600 by default; retention sweeps it only inside storage.root or when told to."""
    import stat

    from dicomnode.config import parse_config
    from dicomnode.destinations.folder import FolderDestination
    from dicomnode.retention import outbox_folders

    from reliability import node_config

    source = tmp_path / "src.dcm"
    ct_dataset("retention", "outbox", 0).save_as(source, enforce_file_format=True)
    inside, share, opted = spool.root / "outbox", tmp_path / "share", tmp_path / "opted"
    config = parse_config(node_config(spool.root, 11112, {
        "inside": {"folder": str(inside)}, "share": {"folder": str(share)},
        "opted": {"folder": str(opted), "swept_by_retention": True, "file_mode": "0640"},
        "kept": {"folder": str(spool.root / "kept"), "swept_by_retention": False}}), tmp_path)
    assert outbox_folders(config) == [inside.resolve(), opted.resolve()]
    destinations = {name: FolderDestination.from_settings(name, settings, "NODE") for name, settings in config.destinations.items()}
    written = {}
    for name, dest in destinations.items():
        (outcome,) = dest.send([source])
        assert outcome.ok, outcome
        (written[name],) = dest.folder.glob("*.dcm")
    assert {n: stat.S_IMODE(p.stat().st_mode) for n, p in written.items()} == {
        "inside": 0o600, "share": 0o600, "opted": 0o640, "kept": 0o600}
    partial = inside / ".1.2.3.dcm.0123abcd.part"
    partial.write_bytes(b"half")
    unrelated = inside / "notes.txt"
    unrelated.write_text("not ours")
    now = time.time()
    for path in (*written.values(), partial, unrelated):
        os.utime(path, (now - 8 * DAY, now - 8 * DAY))

    summary = sweep(_config(), spool, now, outboxes=outbox_folders(config))
    assert summary.outbox_removed == 3 and "3 delivered files removed from folder destinations" in str(summary)
    assert not written["inside"].exists() and not written["opted"].exists() and not partial.exists()
    assert written["share"].exists() and written["kept"].exists() and unrelated.exists()
    assert sweep(_config(delivered=None), spool, now + 1000 * DAY, outboxes=[share]).outbox_removed == 0
