"""The C-STORE SCP against real dcmtk senders (echoscu, dcmsend) over loopback."""

from __future__ import annotations

import re
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from dicomnode.config import NodeSettings, StorageConfig
from dicomnode.part10 import read_uids, scan_uids
from dicomnode.receive import DiskGuard, Receiver, transfer_syntaxes
from dicomnode.spool import Spool

from conftest import require_tools
from factories import sample

NODE_AET = "TESTNODE"


def ct_series(folder: Path, count: int, series_uid: str | None = None) -> list[Path]:
    """Copies of pydicom's CT_small with fresh SOPInstanceUIDs in one series."""
    ds = sample("CT_small.dcm")
    ds.SeriesInstanceUID = series_uid or generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        path = folder / f"ct{i}.dcm"
        ds.save_as(path)
        paths.append(path)
    return paths


def dcmsend(port: int, *files: Path, aet: str = "SCANNER", aec: str = NODE_AET) -> str:
    proc = subprocess.run(
        ["dcmsend", "-v", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
        capture_output=True, text=True, timeout=60, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"},
    )
    return proc.stdout + proc.stderr


def echoscu(port: int, aec: str = NODE_AET, aet: str = "SCANNER") -> int:
    return subprocess.run(
        ["echoscu", "-aet", aet, "-aec", aec, "127.0.0.1", str(port)], capture_output=True, timeout=30
    ).returncode


class Usage:
    """A fake disk whose fill level the test sets."""

    def __init__(self) -> None:
        self.percent = 10.0

    def __call__(self, _path: Path) -> tuple[int, int, int]:
        used = int(self.percent * 10)
        return 1000, used, 1000 - used


@pytest.fixture(params=["pynetdicom", "native"])
def node(tmp_path: Path, free_port: int, request: pytest.FixtureRequest) -> Iterator[tuple[Receiver, Spool, Usage]]:
    """A receiver with each ``node.receive_engine``: both must behave the same."""
    require_tools("dcmsend", "echoscu")
    spool = Spool(tmp_path / "var")
    usage = Usage()
    settings = NodeSettings(
        ae_title=NODE_AET, host="127.0.0.1", port=free_port, allowed_calling_aets=["SCANNER", "ECHOSCU"],
        max_object_bytes=200_000, receive_engine=request.param,
    )
    guard = DiskGuard(spool.root, 90.0, 85.0, usage=usage, interval=0.0)
    receiver = Receiver(spool, settings, StorageConfig(root=spool.root), disk_guard=guard)
    receiver.start()
    yield receiver, spool, usage
    receiver.stop(timeout=5)
    spool.close()


def test_transfer_syntax_order() -> None:
    ts = transfer_syntaxes()
    assert ts[0] != ExplicitVRLittleEndian and ts[-1] == "1.2.840.10008.1.2"  # compressed first, implicit last
    assert ts.index(ExplicitVRLittleEndian) < ts.index("1.2.840.10008.1.2")
    assert ts.index("1.2.840.10008.1.2.4.50") < ts.index(ExplicitVRLittleEndian)


def test_echo_store_duplicates_and_calling_aet(node: tuple[Receiver, Spool, Usage], tmp_path: Path) -> None:
    receiver, spool, _ = node
    assert echoscu(receiver.port, aet="ECHOSCU") == 0
    assert echoscu(receiver.port, aet="STRANGER") != 0  # not in allowed_calling_aets
    assert echoscu(receiver.port, aec="WRONGAE") != 0  # require_called_aet
    files = ct_series(tmp_path / "in", 3)
    out = dcmsend(receiver.port, *files, files[0])  # the first one twice
    assert "with status SUCCESS  : 4" in out, out
    (job,) = spool.ledger.jobs()
    assert job.state == "collecting" and job.calling_aet == "SCANNER"
    stored = spool.ledger.instances(job.id)
    assert sorted(i.sop_uid for i in stored) == sorted(dcmread(f).SOPInstanceUID for f in files)
    for inst, src in zip(sorted(stored, key=lambda i: i.sop_uid), sorted(files, key=lambda f: dcmread(f).SOPInstanceUID)):
        # bytes as sent: same dataset, nothing decoded or rewritten
        assert dcmread(inst.path).PixelData == dcmread(src).PixelData


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbage it reads
def test_unparseable_and_incomplete_objects_fail_and_node_keeps_serving(
    node: tuple[Receiver, Spool, Usage], tmp_path: Path
) -> None:
    receiver, spool, _ = node
    (good,) = ct_series(tmp_path / "in", 1)
    ds = dcmread(good)
    del ds.SeriesInstanceUID
    ds.SOPInstanceUID = generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    bad = tmp_path / "noseries.dcm"
    ds.save_as(bad)
    out = dcmsend(receiver.port, bad, good)
    assert "Error: CannotUnderstand" in out and "with status SUCCESS  : 1" in out, out

    # Valid file meta followed by garbage: pynetdicom's chunked sender streams the bytes as they are.
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    holder = Dataset()
    holder.file_meta = meta
    garbage = tmp_path / "garbage.dcm"
    holder.save_as(garbage, enforce_file_format=True)
    with garbage.open("ab") as fh:
        fh.write(b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 300)
    ae = AE(ae_title="SCANNER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        assoc = ae.associate("127.0.0.1", receiver.port, ae_title=NODE_AET)
        assert assoc.is_established
        status = assoc.send_c_store(garbage)
        assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = False
    assert 0xC000 <= status.Status <= 0xCFFF

    reasons = sorted(p.read_text() for p in spool.quarantine_dir.glob("*.reason.txt"))
    assert len(reasons) == 2
    missing = [r for r in reasons if "lacks SeriesInstanceUID" in r]
    assert len(missing) == 1
    (other,) = set(reasons) - set(missing)
    assert re.search(r"cannot parse|invalid UID|lacks", other), other
    assert echoscu(receiver.port) == 0  # still serving
    assert len(spool.ledger.instances(spool.ledger.jobs()[0].id)) == 1


def test_disk_watermarks_and_size_limit(node: tuple[Receiver, Spool, Usage], tmp_path: Path) -> None:
    receiver, spool, usage = node
    files = ct_series(tmp_path / "in", 3)
    usage.percent = 95.0
    assert "with status REFUSED  : 1" in dcmsend(receiver.port, files[0])  # 0xA700
    usage.percent = 87.0  # between the watermarks: still refusing (hysteresis)
    assert "with status REFUSED  : 1" in dcmsend(receiver.port, files[1])
    usage.percent = 80.0
    assert "with status SUCCESS  : 1" in dcmsend(receiver.port, files[2])
    assert [i.sop_uid for i in spool.ledger.instances(spool.ledger.jobs()[0].id)] == [dcmread(files[2]).SOPInstanceUID]

    for name, payload in (("over.dcm", 180_000), ("big.dcm", 250_000)):  # private payload beyond max_object_bytes
        big = dcmread(files[0])
        big.add_new(0x00291010, "OB", b"\0" * payload)
        big.SOPInstanceUID = generate_uid()
        big.file_meta.MediaStorageSOPInstanceUID = big.SOPInstanceUID
        big.save_as(tmp_path / name)
    # just over the limit: received, measured and refused (0xA700); far over it: aborted while it arrives
    assert "with status REFUSED  : 1" in dcmsend(receiver.port, tmp_path / "over.dcm")
    aborted = dcmsend(receiver.port, tmp_path / "big.dcm")
    assert "SUCCESS  : 1" not in aborted and "Abort" in aborted, aborted
    deadline = time.monotonic() + 5  # the connection's thread removes the partial object after dcmsend saw the abort
    while (list(spool.incoming.iterdir()) or list(spool.chunks.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(spool.incoming.iterdir()) == [] and list(spool.chunks.iterdir()) == []
    assert echoscu(receiver.port) == 0


def test_read_uids_names_the_problem(tmp_path: Path) -> None:
    junk = tmp_path / "junk.dcm"
    junk.write_bytes(b"hello")
    with pytest.raises(ValueError, match="cannot parse"):
        read_uids(junk)
    (ct,) = ct_series(tmp_path, 1)
    assert read_uids(ct)["SOPClassUID"] == CTImageStorage


def test_chunked_receive_streams_into_the_spool_not_tmp(tmp_path: Path, free_port: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """pynetdicom engine, with the node's process settings: objects stream into spool/receiving and are renamed
    into the job (the native engine streams into incoming/ itself)."""
    import tempfile

    from dicomnode.netconfig import configure

    require_tools("dcmsend")
    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())  # restored after the test
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    spool = Spool(tmp_path / "var")
    configure(spool.chunks)
    receiver = Receiver(spool, NodeSettings(ae_title=NODE_AET, host="127.0.0.1", port=free_port, receive_engine="pynetdicom"),
                        StorageConfig(root=spool.root))
    seen: list[Path] = []
    real_land = receiver._land

    def spy(event):  # the path pynetdicom streamed into, seen from the public Event API
        seen.append(event.dataset_path)
        return real_land(event)

    monkeypatch.setattr(receiver, "_land", spy)
    receiver.start()
    try:
        (ct,) = ct_series(tmp_path / "in", 1)
        assert "with status SUCCESS  : 1" in dcmsend(receiver.port, ct)
        assert seen and seen[0].parent == spool.chunks
        assert list(spool.chunks.iterdir()) == []  # renamed into the job folder, nothing left behind
        (job,) = spool.ledger.jobs()
        assert len(spool.ledger.instances(job.id)) == 1
    finally:
        receiver.stop(timeout=5)
        spool.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom's notes on its odd test files
def test_fast_uid_scan_agrees_with_pydicom_or_defers() -> None:
    """scan_uids answers only when pydicom would give the same four UIDs; otherwise it returns None."""
    from pydicom.data import get_testdata_files

    uid_tags = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
    answered = 0
    for name in get_testdata_files("*"):
        path = Path(name)
        if not path.is_file():
            continue
        head = path.read_bytes()[:65536]
        fast = scan_uids(head)
        if fast is None:
            continue
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[*uid_tags, "PatientID"])
        assert {t: fast[t] for t in uid_tags} == {t: str(ds.get(t)).strip() for t in uid_tags}, path.name
        assert fast["PatientID"] == str(ds.get("PatientID", "") or "").strip(), path.name
        answered += 1
        for cut in (140, 400, len(head) // 3):  # a head cut short never yields a partial answer
            partial = scan_uids(head[:cut])
            assert partial is None or partial == fast
    assert answered >= 20
    assert scan_uids(b"\0" * 128 + b"DICM" + b"\xff" * 64) is None
    assert scan_uids(b"not dicom") is None
