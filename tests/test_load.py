"""Resources and load: disk watermark against the real disk, bounded associations, parallel senders.

The watermark test configures the thresholds relative to the disk's real current usage, so it shows
the real ``statvfs`` path, not a fake. The slow test runs several dcmsend senders in parallel into
one ``dicomnode serve`` and accounts for every instance in the ledger and at the PACS.
"""

from __future__ import annotations

import shutil
import threading
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from conftest import require_tools
from dicomnode.receive import ReceiveSettings, Receiver
from dicomnode.spool import Spool
from reliability import ct_dataset, free_port, raw_object, send_raw


def _receiver(tmp_path: Path, **settings) -> tuple[Receiver, Spool]:
    spool = Spool(tmp_path / "var")
    receiver = Receiver(spool, ReceiveSettings(host="127.0.0.1", port=free_port(), **settings))
    receiver.start()
    return receiver, spool


def test_disk_watermark_on_the_real_disk(tmp_path: Path) -> None:
    total, used, _free = shutil.disk_usage(tmp_path)
    percent = 100.0 * used / total
    if percent < 2.0 or percent > 97.0:
        pytest.skip(f"disk at {percent:.1f}%: no room for thresholds on both sides of it")
    ds = ct_dataset("disk", "s1", 0)

    # high watermark below the current usage: full, every store refused with A700, nothing kept
    receiver, spool = _receiver(tmp_path / "full", disk_high_watermark_percent=percent - 1.5,
                                disk_low_watermark_percent=percent - 2.0)
    try:
        statuses = send_raw(receiver.port, [raw_object(ds)] * 2, tmp_path / "raw1")
        assert statuses == [0xA700, 0xA700]
        assert not spool.ledger.query("SELECT id FROM instances")
        assert not list(spool.incoming.iterdir())  # refused before writing anything
    finally:
        receiver.stop()
        spool.close()

    # high watermark above it: accepted
    receiver, spool = _receiver(tmp_path / "room", disk_high_watermark_percent=min(percent + 1.5, 100.0),
                                disk_low_watermark_percent=percent + 1.0)
    try:
        assert send_raw(receiver.port, [raw_object(ds)], tmp_path / "raw2") == [0]
        assert len(spool.ledger.query("SELECT id FROM instances")) == 1
    finally:
        receiver.stop()
        spool.close()


def test_bounded_associations(tmp_path: Path) -> None:
    receiver, spool = _receiver(tmp_path, max_associations=2)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    held = []
    try:
        for _ in range(2):
            assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
            assert assoc.is_established
            held.append(assoc)
        third = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
        assert not third.is_established and third.is_rejected  # A-ASSOCIATE-RJ, not a hang
        held.pop().release()
        deadline = time.monotonic() + 10
        while len(receiver.ae.active_associations) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        again = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
        assert again.is_established and again.send_c_echo().Status == 0
        again.release()
    finally:
        for assoc in held:
            assoc.release()
        receiver.stop()
        spool.close()


def test_parallel_senders_into_the_receiver(tmp_path: Path) -> None:
    """4 pynetdicom senders at once into the Receiver: every acknowledged instance is in the ledger."""
    receiver, spool = _receiver(tmp_path)
    statuses: dict[int, list[int | None]] = {}
    expected = set()

    def sender(k: int) -> None:
        objs = [raw_object(ct_dataset("load", f"sender{k}", i)) for i in range(10)]
        statuses[k] = send_raw(receiver.port, objs, tmp_path / f"raw{k}", aet=f"MOD{k}")

    for k in range(4):
        expected |= {ct_dataset("load", f"sender{k}", i).SOPInstanceUID for i in range(10)}
    threads = [threading.Thread(target=sender, args=(k,)) for k in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert all(s == [0] * 10 for s in statuses.values()), statuses
        assert {r["sop_uid"] for r in spool.ledger.query("SELECT sop_uid FROM instances")} == expected
        assert len(spool.ledger.query("SELECT DISTINCT job_id FROM instances")) == 4
    finally:
        receiver.stop()
        spool.close()


