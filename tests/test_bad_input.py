"""Bad input at the node's door: each kind gets the right DIMSE status or fails later as a job with a
clear reason; the bytes are kept in quarantine; nothing derived is sent from them; the node keeps serving.

The first part drives the node's real Receiver in-process (fast); the last test runs ``dicomnode serve``
with a storescp PACS and checks that objects that pass the door but cannot be decoded end as failed
jobs with a reason, while the good series beside them is delivered (slow).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from pydicom.uid import JPEGBaseline8Bit, MRImageStorage

from dicomnode.spool import Spool

from conftest import require_tools
from factories import ct_dataset, free_port, start_receiver
from reliability import encoded_body, raw_object, send_raw

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MAX_OBJECT = 64 * 1024


@pytest.fixture
def scp(tmp_path: Path):
    receiver, spool = start_receiver(tmp_path / "var", max_object_bytes=MAX_OBJECT)
    yield receiver, spool
    receiver.stop()
    spool.close()


def _quarantined(spool: Spool) -> dict[str, str]:
    """reason file name -> reason text."""
    return {p.name: p.read_text() for p in spool.quarantine_dir.glob("*.reason.txt")}


def _instances(spool: Spool) -> set[str]:
    return {i.sop_uid for i in spool.ledger.all_instances()}


def test_each_bad_input_gets_its_status(scp, tmp_path: Path) -> None:
    receiver, spool = scp
    good = ct_dataset("bad", "good", 0)
    body = encoded_body(good)

    mismatched = ct_dataset("bad", "mismatch", 0)
    mismatched.SOPClassUID = MRImageStorage  # the dataset says MR, the C-STORE command says CT
    big = ct_dataset("bad", "big", 0, rows=200, cols=200)  # 78 KiB of pixels > MAX_OBJECT
    huge = ct_dataset("bad", "huge", 0, rows=512, cols=512)  # 512 KiB: far beyond, cut off while it arrives

    cases = {
        # name: (object, accepted status range, kept in quarantine)
        "zero bytes": (raw_object(good, b""), range(0xC000, 0xD000), True),
        "truncated header": (raw_object(good, body[:50]), range(0xC000, 0xD000), True),
        "garbage": (raw_object(good, b"\x08\x00\x16\x00" + b"\xa5" * 300), range(0xC000, 0xD000), True),
        "SOP class mismatch": (raw_object(mismatched), range(0xA900, 0xAA00), True),
        "too large": (raw_object(big), range(0xA700, 0xA800), False),
        "far too large": (raw_object(huge), [None], False),  # A-ABORT, no status
    }
    seen = {}
    for name, (obj, expected, kept) in cases.items():
        before = set(_quarantined(spool))
        [status] = send_raw(receiver.port, [obj], tmp_path / name.replace(" ", "_"))
        seen[name] = status
        assert status in expected, f"{name}: status {status if status is None else hex(status)}"
        new = set(_quarantined(spool)) - before
        assert len(new) == (1 if kept else 0), name
    assert not _instances(spool)  # none of them reached a job
    reasons = "\n".join(_quarantined(spool).values())
    assert "differ from the C-STORE command" in reasons
    assert "lacks" in reasons or "cannot parse" in reasons
    # and the node still takes a good object afterwards, on the next association
    assert send_raw(receiver.port, [raw_object(good)], tmp_path / "after") == [0]
    assert _instances(spool) == {good.SOPInstanceUID}


def test_unsupported_transfer_syntax_is_refused_at_negotiation(scp, tmp_path: Path) -> None:
    receiver, spool = scp
    ds = ct_dataset("bad", "ts", 0)
    private_ts = raw_object(ds)
    private_ts = dataclasses.replace(private_ts, transfer_syntax="1.2.826.0.1.3680043.10.1234.99")
    statuses = send_raw(receiver.port, [private_ts, raw_object(ds)], tmp_path)
    # no presentation context for the unknown syntax, so nothing could be sent with it; the
    # association stays usable for the object in a syntax the node accepts
    assert statuses == [None, 0]
    assert _instances(spool) == {ds.SOPInstanceUID}


def test_many_bad_associations_then_good(scp, tmp_path: Path) -> None:
    receiver, spool = scp
    good = ct_dataset("bad", "good2", 0)
    body = encoded_body(good)
    for i in range(10):
        [status] = send_raw(receiver.port, [raw_object(good, body[: 10 + 7 * i])], tmp_path / f"b{i}")
        assert status is not None and status >= 0xA000
    assert len(_quarantined(spool)) == 10
    assert send_raw(receiver.port, [raw_object(good)], tmp_path / "good") == [0]


def test_undecodable_pixels_pass_the_door(scp, tmp_path: Path) -> None:
    """The SCP never decodes pixels (receive speed: bytes are filed as sent): broken JPEG data is accepted and filed.

    What happens to it next (a failed job with a reason, nothing sent) is shown end to end in
    test_node_fails_bad_objects_as_jobs.
    """
    receiver, spool = scp
    ds = jpeg_with_garbage("bad", "jpeg", 0)
    assert send_raw(receiver.port, [raw_object(ds)], tmp_path) == [0]
    assert _instances(spool) == {ds.SOPInstanceUID}


def jpeg_with_garbage(study: str, series: str, index: int):
    """A CT whose JPEG Baseline fragments hold bytes no decoder can read."""
    from pydicom.encaps import encapsulate

    ds = ct_dataset(study, series, index)
    ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 8, 8, 7
    ds.PixelData = encapsulate([b"\xff\xd8\xff\xe0" + b"\x13\x37" * 50 + b"\xff\xd9"])
    ds["PixelData"].VR = "OB"
    ds.LossyImageCompression = "01"
    return ds


@pytest.mark.slow
def test_node_fails_bad_objects_as_jobs(tmp_path: Path) -> None:
    """Objects that pass the door but cannot be enhanced: failed alone or as a job, with the reason,
    never sent; the good instances beside them are delivered and the node keeps serving."""
    require_tools("storescp")
    from reliability import LedgerView, NodeProcess, StoreSCP, node_config, pacs_sources, wait_until

    pacs = StoreSCP(tmp_path / "pacs").start()
    cfg = node_config(tmp_path / "var", free_port(), {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                               "port": pacs.port}},
                      node={"series_quiet_seconds": 1.0})
    ledger = LedgerView(tmp_path / "var")
    try:
        with NodeProcess(tmp_path, cfg) as node:
            # series "mixed": 3 good instances and 3 bad ones the header check cannot see
            good = [ct_dataset("badjob", "mixed", i) for i in range(3)]
            truncated = ct_dataset("badjob", "mixed", 3)
            no_pixels = ct_dataset("badjob", "mixed", 4)
            del no_pixels.PixelData  # a CT image without its image: does not match its SOP class
            jpeg = jpeg_with_garbage("badjob", "mixed", 5)
            jpeg.SeriesInstanceUID = good[0].SeriesInstanceUID
            mixed = [raw_object(ds) for ds in good] + [
                raw_object(truncated, encoded_body(truncated)[:-100]),  # pixel data cut short
                raw_object(no_pixels), raw_object(jpeg)]
            # series "allbad": nothing in it can be decoded
            allbad = [jpeg_with_garbage("badjob", "allbad", i) for i in range(2)]
            assert send_raw(node.port, mixed, tmp_path / "mixed") == [0] * 6
            assert send_raw(node.port, [raw_object(ds) for ds in allbad], tmp_path / "allbad") == [0, 0]
            wait_until(lambda: ledger.settled() and ledger.jobs().get("failed") == 2, 60, 0.2, "both jobs finished")
            rows = {j.series_uid: (j.state, j.error) for j in ledger.job_records()}
            state, error = rows[good[0].SeriesInstanceUID]
            assert state == "failed" and "3 instances not enhanced" in error  # each bad one failed alone (the
            # good ones are delivered, the job stays failed so status shows it)...
            for bad in (truncated, no_pixels, jpeg):
                assert f"{bad.SOPInstanceUID}.dcm: " in error  # ...named, with its reason
            state, error = rows[allbad[0].SeriesInstanceUID]
            assert state == "failed" and error.startswith("no instance could be enhanced")
            # the bytes stay in the job's folder for a human (until storage.retention_days_failed)
            kept = {p.stem for p in (tmp_path / "var" / "series").rglob("*.dcm")}
            assert {ds.SOPInstanceUID for ds in allbad} | {truncated.SOPInstanceUID, jpeg.SOPInstanceUID} <= kept
            # ...and a copy of each goes to quarantine with its reason
            reasons = "\n".join(_quarantined(Spool(tmp_path / "var")).values())
            for bad in allbad + [truncated, no_pixels, jpeg]:
                assert f"{bad.SOPInstanceUID}.dcm" in reasons
            # the node still serves a good series after all that
            after = [ct_dataset("badjob", "after", i) for i in range(2)]
            assert send_raw(node.port, [raw_object(ds) for ds in after], tmp_path / "after") == [0, 0]
            wait_until(lambda: ledger.settled() and ledger.jobs().get("done") == 1, 60, 0.2, "good series after")
            status = node.cli("status")
            assert "failed jobs:" in status.stdout and "no instance could be enhanced" in status.stdout
    finally:
        pacs.stop()
    # nothing derived from a bad object reached the PACS; every good one did
    assert pacs_sources(tmp_path / "pacs") == {ds.SOPInstanceUID for ds in good + after}
