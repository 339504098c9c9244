"""The native receive engine (``node.receive_engine: native``) against real peers: dcmtk, pynetdicom, raw sockets."""

from __future__ import annotations

import socket
import struct
import tempfile
from collections.abc import Iterator, Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit, generate_uid
from pynetdicom import AE, PYNETDICOM_IMPLEMENTATION_UID, _config
from pynetdicom.dsutils import decode, encode
from pynetdicom.pdu import A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, ImplementationClassUIDNotification, MaximumLengthNotification
from pynetdicom.presentation import build_context
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    CTImageStorage,
    MRImageStorage,
    PatientRootQueryRetrieveInformationModelFind,
    SecondaryCaptureImageStorage,
    Verification,
)
from test_receive import NODE_AET, ct_series, dcmsend, echoscu

from dicomnode.config import NodeSettings, StorageConfig
from dicomnode.receive import Receiver, echo
from dicomnode.spool import Spool

from conftest import require_tools
from factories import StoreCounts, free_port

MAX_OBJECT = 200_000


def start(root: Path, engine: str, **node: Any) -> tuple[Receiver, Spool]:
    spool = Spool(root)
    settings = NodeSettings(**{
        "ae_title": NODE_AET, "host": "127.0.0.1", "port": free_port(), "allowed_calling_aets": ["SCANNER", "ECHOSCU"],
        "max_object_bytes": MAX_OBJECT, "receive_engine": engine, **node})
    receiver = Receiver(spool, settings, StorageConfig(root=root))
    receiver.observer = StoreCounts()
    receiver.start()
    return receiver, spool


@pytest.fixture
def native(tmp_path: Path) -> Iterator[tuple[Receiver, Spool]]:
    require_tools("dcmsend", "echoscu")
    receiver, spool = start(tmp_path / "native", "native")
    yield receiver, spool
    receiver.stop(timeout=5)
    spool.close()


def instances(spool: Spool) -> dict[str, tuple[bytes, tuple[Any, ...]]]:
    """SOP Instance UID -> (landed bytes, ledger row without ids, paths and times)."""
    out = {}
    for job in spool.ledger.jobs():
        for inst in spool.ledger.instances(job.id):
            out[inst.sop_uid] = (inst.path.read_bytes(), (inst.series_uid, inst.sop_class_uid, inst.size, job.calling_aet))
    return out


def leftovers(spool: Spool) -> list[Path]:
    return [*spool.incoming.iterdir(), *spool.chunks.iterdir()]


def scu_store(port: int, files: Sequence[Path], contexts: Sequence[tuple[str, str]], aet: str = "SCANNER") -> list[int]:
    ae = AE(ae_title=aet)
    for sop, ts in contexts:
        ae.add_requested_context(sop, ts)
    assoc = ae.associate("127.0.0.1", port, ae_title=NODE_AET)
    assert assoc.is_established
    try:
        return [int(assoc.send_c_store(dcmread(f)).Status) for f in files]
    finally:
        assoc.release()


# -- a hand-driven requestor ---------------------------------------------------------------------------


class RawPeer:
    """Sends what well-behaved SCUs never do: PDUs and DIMSE messages built by hand."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def close(self) -> None:
        self.sock.close()

    def associate(self, contexts: Sequence[tuple[str, str]] = ((CTImageStorage, ExplicitVRLittleEndian),),
                  calling: str = "SCANNER", called: str = NODE_AET) -> int:
        """Send an A-ASSOCIATE-RQ; the reply's PDU type (2 accepted, 3 rejected)."""
        primitive = A_ASSOCIATE()
        primitive.application_context_name = "1.2.840.10008.3.1.1.1"
        primitive.calling_ae_title, primitive.called_ae_title = calling, called
        proposed = []
        for i, (sop, ts) in enumerate(contexts):
            cx = build_context(sop, ts)
            cx.context_id = 2 * i + 1
            proposed.append(cx)
        primitive.presentation_context_definition_list = proposed
        length = MaximumLengthNotification()
        length.maximum_length_received = 16384
        impl = ImplementationClassUIDNotification()
        impl.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        primitive.user_information = [length, impl]
        rq = A_ASSOCIATE_RQ()
        rq.from_primitive(primitive)
        self.sock.sendall(rq.encode())
        return self.pdu()[0]

    def pdu(self) -> tuple[int, bytes]:
        """The next PDU from the node; (0, b"") when it closed the connection."""
        header = self._exact(6)
        if len(header) < 6:
            return 0, b""
        pdu_type, _, length = struct.unpack(">BBL", header)
        return pdu_type, self._exact(length)

    def _exact(self, n: int) -> bytes:
        out = b""
        while len(out) < n:
            try:
                chunk = self.sock.recv(n - len(out))
            except ConnectionResetError:
                return out
            if not chunk:
                return out
            out += chunk
        return out

    def pdv(self, data: bytes, control: int, context_id: int = 1) -> None:
        item = struct.pack(">LBB", len(data) + 2, context_id, control) + data
        self.sock.sendall(struct.pack(">BBL", 4, 0, len(item)) + item)

    def command(self, field: int, sop_class: str, sop_instance: str = "", data: bool = True, context_id: int = 1) -> None:
        cs = Dataset()
        cs.CommandGroupLength = 0
        cs.AffectedSOPClassUID = sop_class
        cs.CommandField = field
        cs.MessageID = 7
        if field == 0x0001:
            cs.Priority = 0
        cs.CommandDataSetType = 0x0001 if data else 0x0101
        if sop_instance:
            cs.AffectedSOPInstanceUID = sop_instance
        cs.CommandGroupLength = len(encode(cs, True, True)) - 12
        self.pdv(encode(cs, True, True), 0x03, context_id)

    def status(self) -> int:
        pdu_type, body = self.pdu()
        assert pdu_type == 4, (pdu_type, body)
        cs = decode(BytesIO(body[6:]), True, True)
        assert cs.MessageIDBeingRespondedTo == 7
        return int(cs.Status)

    def store(self, sop_class: str, sop_instance: str, data: bytes) -> int:
        self.command(0x0001, sop_class, sop_instance)
        self.pdv(data, 0x02)
        return self.status()

    def release(self) -> int:
        self.sock.sendall(struct.pack(">BBL", 5, 0, 4) + b"\0" * 4)
        return self.pdu()[0]


def data_set(path: Path) -> tuple[str, str, bytes]:
    """(SOP Class, SOP Instance, the data set bytes after the File Meta Information) of a Part 10 file."""
    raw = path.read_bytes()
    meta_length = struct.unpack_from("<L", raw, 140)[0]
    ds = dcmread(path, stop_before_pixels=True)
    return str(ds.SOPClassUID), str(ds.SOPInstanceUID), raw[144 + meta_length:]


# -- tests -----------------------------------------------------------------------------------------------


def test_echo_with_dcmtk_and_pynetdicom_and_ae_title_checks(native: tuple[Receiver, Spool]) -> None:
    receiver, _ = native
    assert echoscu(receiver.port, aet="ECHOSCU") == 0
    assert echo("127.0.0.1", receiver.port, NODE_AET)
    assert echoscu(receiver.port, aet="STRANGER") != 0  # not in allowed_calling_aets
    assert echoscu(receiver.port, aec="WRONGAE") != 0  # require_called_aet
    peer = RawPeer(receiver.port)
    assert peer.associate(calling="STRANGER") == 3  # A-ASSOCIATE-RJ
    peer.close()
    assert echoscu(receiver.port, aet="ECHOSCU") == 0


def test_lands_what_the_pynetdicom_engine_lands(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Same files, same senders (dcmsend; pynetdicom in Explicit, Implicit VR and JPEG Baseline): byte-equal
    spooled files and equal ledger rows from both engines."""
    require_tools("dcmsend")
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", True)  # as `dicomnode serve` (netconfig.configure)
    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())
    files = ct_series(tmp_path / "in", 3)
    mr = Path(get_testdata_file("MR_small_implicit.dcm", download=False))
    jpeg = Path(get_testdata_file("SC_rgb_jpeg_dcmtk.dcm", download=False))
    assert dcmread(jpeg).file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    results = []
    for engine in ("pynetdicom", "native"):
        receiver, spool = start(tmp_path / engine, engine)
        try:
            assert "with status SUCCESS  : 3" in dcmsend(receiver.port, *files)
            assert scu_store(receiver.port, [mr], [(MRImageStorage, ImplicitVRLittleEndian)]) == [0]
            assert scu_store(receiver.port, [jpeg], [(SecondaryCaptureImageStorage, JPEGBaseline8Bit)]) == [0]
            ct = dcmread(files[0])
            ct.SOPInstanceUID = ct.file_meta.MediaStorageSOPInstanceUID = "1.2.3.4.5"
            ct.save_as(tmp_path / f"ct-{engine}.dcm")
            assert scu_store(receiver.port, [tmp_path / f"ct-{engine}.dcm"], [(CTImageStorage, ExplicitVRLittleEndian)]) == [0]
            results.append(instances(spool))
            observer = receiver.observer
            assert isinstance(observer, StoreCounts) and observer.statuses == [0] * 6 and observer.bytes > 6 * 5000
            assert leftovers(spool) == []
        finally:
            receiver.stop(timeout=5)
            spool.close()
    pynetdicom_engine, native_engine = results
    assert len(native_engine) == 6 and native_engine.keys() == pynetdicom_engine.keys()
    for sop, (data, row) in native_engine.items():
        assert data == pynetdicom_engine[sop][0], sop
        assert row == pynetdicom_engine[sop][1], sop
    landed = dcmread(BytesIO(native_engine[str(dcmread(jpeg).SOPInstanceUID)][0]))
    assert landed.file_meta.TransferSyntaxUID == JPEGBaseline8Bit
    assert landed.file_meta.ImplementationClassUID == PYNETDICOM_IMPLEMENTATION_UID


def test_max_associations_counts_requested_associations(tmp_path: Path) -> None:
    receiver, spool = start(tmp_path / "var", "native", max_associations=1)
    try:
        idle = RawPeer(receiver.port)  # connected, no request yet: takes no slot
        first = RawPeer(receiver.port)
        assert first.associate() == 2
        second = RawPeer(receiver.port)
        assert second.associate() == 3  # local limit exceeded
        assert first.release() == 6
        assert echo("127.0.0.1", receiver.port, NODE_AET, calling_ae_title="ECHOSCU")
        idle.close()
    finally:
        receiver.stop(timeout=5)
        spool.close()


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about the garbage it reads
def test_store_statuses_and_unsupported_commands(native: tuple[Receiver, Spool], tmp_path: Path) -> None:
    receiver, spool = native
    (ct,) = ct_series(tmp_path / "in", 1)
    sop_class, sop_instance, data = data_set(ct)
    peer = RawPeer(receiver.port)
    assert peer.associate([(CTImageStorage, ExplicitVRLittleEndian), (Verification, ImplicitVRLittleEndian)]) == 2
    assert peer.store(sop_class, generate_uid(), data) == 0xA900  # the command names another instance
    assert peer.store(sop_class, generate_uid(), b"\x08\x00\x16\x00UI\xff\xff" + b"\x01" * 300) == 0xC210
    peer.command(0x0020, PatientRootQueryRetrieveInformationModelFind)  # C-FIND: not ours
    peer.pdv(b"\x08\x00\x52\x00CS\x06\x00STUDY ", 0x02)
    assert peer.status() == 0x0211
    peer.command(0x0030, Verification, data=False, context_id=3)
    assert peer.status() == 0x0000
    assert peer.store(sop_class, sop_instance, data) == 0x0000  # the association still works
    upper = receiver._upper
    assert upper is not None
    real_temp_path = upper.temp_path
    upper.temp_path = lambda: tmp_path / "no such folder" / "x.part"  # the disk refuses the file
    assert peer.store(sop_class, generate_uid(), data) == 0xA700
    upper.temp_path = real_temp_path
    assert peer.release() == 6
    reasons = sorted(p.read_text() for p in spool.quarantine_dir.glob("*.reason.txt"))
    assert len(reasons) == 2 and any("differ from the C-STORE command" in r for r in reasons)
    (job,) = spool.ledger.jobs()
    assert [i.sop_uid for i in spool.ledger.instances(job.id)] == [sop_instance]
    assert leftovers(spool) == []


@pytest.mark.parametrize("misdeed", ["oversized header", "flood", "disconnect", "unaccepted context",
                                     "data before command", "garbage command", "unexpected PDU"])
def test_misbehaving_peer_is_cut_and_leaves_nothing(native: tuple[Receiver, Spool], tmp_path: Path, misdeed: str) -> None:
    receiver, spool = native
    (ct,) = ct_series(tmp_path / "in", 1)
    sop_class, sop_instance, data = data_set(ct)
    peer = RawPeer(receiver.port)
    assert peer.associate() == 2
    if misdeed == "oversized header":
        peer.sock.sendall(struct.pack(">BBL", 4, 0, 512 * 1024 * 1024))
    elif misdeed == "flood":  # P-DATA beyond max_object_bytes in one message, in PDUs the node allows
        peer.command(0x0001, sop_class, sop_instance)
        try:
            for _ in range(MAX_OBJECT // 60_000 + 3):
                peer.pdv(b"\0" * 60_000, 0x00)
        except OSError:
            pass  # the node already closed
    elif misdeed == "disconnect":
        peer.command(0x0001, sop_class, sop_instance)
        peer.pdv(data[:1000], 0x00)
        assert _wait(lambda: len(list(spool.incoming.iterdir())) == 1)  # the node is writing the object
    elif misdeed == "unaccepted context":
        peer.command(0x0030, Verification, data=False, context_id=5)
    elif misdeed == "data before command":
        peer.pdv(data[:100], 0x02)
    elif misdeed == "garbage command":
        peer.pdv(b"\x01\x02\x03", 0x03)
    elif misdeed == "unexpected PDU":
        peer.sock.sendall(struct.pack(">BBL", 2, 0, 4) + b"\0" * 4)  # an A-ASSOCIATE-AC from a requestor
    if misdeed == "disconnect":
        peer.close()
    else:
        assert peer.pdu()[0] == 7  # A-ABORT
        assert peer.pdu()[0] == 0  # then the node closes
        peer.close()
    deadline_ok = _wait(lambda: receiver._upper is not None and receiver._upper.active == 0)
    assert deadline_ok
    assert leftovers(spool) == []
    assert "with status SUCCESS  : 1" in dcmsend(receiver.port, ct)  # still serving


def _wait(condition: Any, timeout: float = 5.0) -> bool:
    import time

    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


def test_drain_waits_then_aborts_and_a_stalled_pdu_times_out(tmp_path: Path) -> None:
    receiver, spool = start(tmp_path / "var", "native")
    receiver.ae.network_timeout = 1.0  # read by start(): a stalled peer is cut after this
    receiver.stop_accepting()
    receiver.start()
    try:
        (ct,) = ct_series(tmp_path / "in", 1)
        sop_class, sop_instance, data = data_set(ct)
        stalled = RawPeer(receiver.port)
        assert stalled.associate() == 2
        stalled.sock.sendall(struct.pack(">BBL", 4, 0, 4096) + b"\0" * 100)  # then nothing
        assert stalled.pdu()[0] == 0  # closed by the node after network_timeout
        busy = RawPeer(receiver.port)
        assert busy.associate() == 2
        busy.command(0x0001, sop_class, sop_instance)
        busy.pdv(data[:1000], 0x00)  # an object in transfer when the node stops
        assert _wait(lambda: len(list(spool.incoming.iterdir())) == 1)
        receiver.stop_accepting()
        assert not receiver.listening
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", receiver.port), timeout=1).recv(1)
        assert receiver.drain(0.3) is False  # an established association had to be aborted
        assert busy.pdu()[0] == 7
        assert leftovers(spool) == []
    finally:
        receiver.stop(timeout=1)
        spool.close()


def test_a_request_trickled_byte_by_byte_gets_no_more_than_the_request_timeout(tmp_path: Path) -> None:
    import time

    receiver, spool = start(tmp_path / "var", "native", association_request_timeout_seconds=1)
    try:
        peer = RawPeer(receiver.port)
        started, closed = time.monotonic(), False
        for _ in range(20):  # an A-ASSOCIATE-RQ header, one byte every 0.2 s
            try:
                peer.sock.sendall(b"\x01")
                time.sleep(0.2)
                closed = peer.sock.recv(1, socket.MSG_DONTWAIT) == b""
            except BlockingIOError:
                continue
            except OSError:
                closed = True
            if closed:
                break
        assert closed and 0.9 < time.monotonic() - started < 2.5
        peer.close()
        assert echo("127.0.0.1", receiver.port, NODE_AET, calling_ae_title="ECHOSCU")
    finally:
        receiver.stop(timeout=1)
        spool.close()


@pytest.mark.parametrize("sop_class, sop_instance, syntax", [
    (CTImageStorage, "1.2.3.4", ExplicitVRLittleEndian),
    (MRImageStorage, "1.2.3.45", ImplicitVRLittleEndian),  # odd and even lengths: padded with NUL
    (SecondaryCaptureImageStorage, "9" * 64, JPEGBaseline8Bit),
    (CTImageStorage, generate_uid(), "1.2.840.10008.1.2.4.201"),
    ("", "1.2.3", ExplicitVRLittleEndian),  # not plain UIDs: pydicom's own encoding
    (CTImageStorage, "1.2.3.\ufffd", ExplicitVRLittleEndian),
    (CTImageStorage, "1.2.3 ", ExplicitVRLittleEndian),
    (CTImageStorage, "1." + "2" * 70, ExplicitVRLittleEndian),
])
def test_file_meta_is_the_bytes_pydicom_writes_for_pynetdicom(sop_class: str, sop_instance: str, syntax: str) -> None:
    from pydicom.filewriter import write_file_meta_info
    from pydicom.uid import UID
    from pynetdicom.dsutils import create_file_meta

    from dicomnode.upper import file_meta

    reference = BytesIO()
    reference.write(b"\0" * 128 + b"DICM")
    try:
        write_file_meta_info(reference, create_file_meta(  # type: ignore[arg-type]
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(syntax)))
    except Exception as exc:  # an empty UID: pydicom refuses, and so does the node (the association is aborted)
        with pytest.raises(type(exc)):
            file_meta(str(sop_class), sop_instance, str(syntax))
        return
    assert file_meta(str(sop_class), sop_instance, str(syntax)) == reference.getvalue()


def test_store_gets_the_landed_files_first_bytes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The UIDs are read from the bytes the engine kept while writing (no second read): they must be the
    file's first SCAN_BYTES, across PDVs of a 16 KiB PDU, and all of a shorter file."""
    from dicomnode.part10 import SCAN_BYTES

    seen: list[tuple[bytes, bytes]] = []
    original = Receiver._store_landed

    def spy(self: Receiver, landed: Path, calling: str, cmd_class: str, cmd_sop: str, head: bytearray) -> int:
        seen.append((bytes(head), landed.read_bytes()))
        return original(self, landed, calling, cmd_class, cmd_sop, head)

    monkeypatch.setattr(Receiver, "_store_landed", spy)
    receiver, spool = start(tmp_path / "node", "native")
    try:
        small = ct_series(tmp_path / "in", 1)[0]
        large = dcmread(small)
        large.Rows = large.Columns = 256
        large.PixelData = bytes(range(256)) * 512  # 128 KiB: the head ends inside the pixel data
        large.SOPInstanceUID = large.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        large.save_as(tmp_path / "large.dcm")
        assert scu_store(receiver.port, [small, tmp_path / "large.dcm"], [(CTImageStorage, ExplicitVRLittleEndian)]) == [0, 0]
    finally:
        receiver.stop(timeout=5)
        spool.close()
    (small_head, small_file), (large_head, large_file) = seen
    assert small_head == small_file and len(small_file) < SCAN_BYTES
    assert len(large_file) > SCAN_BYTES and large_head == large_file[:SCAN_BYTES]


def test_plain_tcp_uses_kernel_timeouts_and_tls_keeps_settimeout() -> None:
    """A plain socket is blocking with SO_RCVTIMEO/SO_SNDTIMEO (no poll() before each recv); TLS keeps settimeout."""
    import ssl

    from dicomnode.upper import _set_network_timeout

    timeval = struct.Struct("@ll")
    with socket.socket() as sock:
        _set_network_timeout(sock, 1.25)
        assert sock.gettimeout() is None
        for option in (socket.SO_RCVTIMEO, socket.SO_SNDTIMEO):
            seconds, micros = timeval.unpack(sock.getsockopt(socket.SOL_SOCKET, option, timeval.size))
            assert seconds == 1 and abs(micros - 250_000) <= 10_000  # the kernel keeps it in jiffies
    with socket.socket() as sock:
        _set_network_timeout(sock, None)
        assert sock.gettimeout() is None
        assert timeval.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval.size)) == (0, 0)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    with context.wrap_socket(socket.socket(), server_hostname="x", do_handshake_on_connect=False) as tls:
        _set_network_timeout(tls, 2.0)
        assert tls.gettimeout() == 2.0


def test_an_idle_association_is_dropped_after_the_network_timeout(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Between messages (nothing in transfer) a silent peer is cut after network_timeout, not before, not never."""
    import logging
    import time

    receiver, spool = start(tmp_path / "var", "native")
    receiver.ae.network_timeout = 1.0  # read by start()
    receiver.stop_accepting()
    receiver.start()
    try:
        peer = RawPeer(receiver.port)
        assert peer.associate() == 2
        (ct,) = ct_series(tmp_path / "in", 1)
        assert peer.store(*data_set(ct)) == 0  # the association works, then the peer goes silent
        started = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="dicomnode.upper"):
            assert peer.pdu()[0] == 0  # closed by the node
            waited = time.monotonic() - started
            assert _wait(lambda: "timed out after 1 s without data" in caplog.text)
        assert 0.8 < waited < 4, waited
        assert len(instances(spool)) == 1
    finally:
        receiver.stop(timeout=1)
        spool.close()


def test_the_landed_file_is_synced_whole_before_its_row_is_committed(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole landed file is fsynced before the ledger row that makes it acknowledged is committed: a
    series' first instance before it is renamed into its job folder, every later one once it is linked
    there (one sync of file and folder entry, issue 16)."""
    import os
    import stat as st

    from dicomnode.ledger import Ledger

    synced: dict[int, int] = {}  # inode -> size when synced
    checked: list[str] = []
    real = os.fsync

    def fsync(fd: int) -> None:
        info = os.fstat(fd)
        if st.S_ISREG(info.st_mode):
            synced[info.st_ino] = info.st_size
        real(fd)

    def assert_synced(path: Path) -> None:
        info = path.stat()
        assert synced.get(info.st_ino) == info.st_size, f"{path.name} not synced whole before its row"
        checked.append(path.parent.name)

    record, add = Ledger.record_instance, Ledger.add_instance

    def record_spy(self: Ledger, job_id: int, key: object, **kw: object) -> bool:
        assert_synced(kw["path"])
        return record(self, job_id, key, **kw)

    def add_spy(self: Ledger, key: object, *, place: object, **kw: object) -> object:
        def placed(job_id: int) -> Path:
            final = place(job_id)
            assert_synced(final)
            return final
        return add(self, key, place=placed, **kw)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(Ledger, "record_instance", record_spy)
    monkeypatch.setattr(Ledger, "add_instance", add_spy)
    receiver, spool = start(tmp_path / "node", "native")
    try:
        files = ct_series(tmp_path / "in", 3)
        assert scu_store(receiver.port, files, [(CTImageStorage, ExplicitVRLittleEndian)]) == [0, 0, 0]
        rows = [i for j in spool.ledger.jobs() for i in spool.ledger.instances(j.id)]
    finally:
        receiver.stop(timeout=5)
        spool.close()
    assert len(rows) == 3 and len(checked) == 3 and len(set(checked)) == 1


def test_an_arriving_object_is_sent_to_the_disk_in_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a large object arrives, its bytes are handed to the disk every WRITEBACK_BYTES (the kernel
    accepts each request), so the fsync at its end has only the tail left; the file is still whole."""
    import os

    import dicomnode.upper as upper

    require_tools("dcmsend")

    calls: list[tuple[int, int, int]] = []
    real = upper.start_writeback

    def spy(fd: int, offset: int, count: int) -> bool:
        calls.append((offset, count, os.fstat(fd).st_size))
        accepted = real(fd, offset, count)
        assert accepted, "sync_file_range refused"
        return accepted

    monkeypatch.setattr(upper, "start_writeback", spy)
    (ct,) = ct_series(tmp_path / "in", 1)
    ds = dcmread(ct)
    ds.add_new(0x00291010, "OB", bytes(range(256)) * 3000)  # 768 kB: two steps or more (fragment sizes vary)
    ds.save_as(ct)
    receiver, spool = start(tmp_path / "node", "native", max_object_bytes=2_000_000)
    try:
        assert "with status SUCCESS  : 1" in dcmsend(receiver.port, ct)  # dcmtk: 16 kB PDUs
        (instance,) = spool.ledger.instances(spool.ledger.jobs()[0].id)
        landed = instance.path.read_bytes()
    finally:
        receiver.stop(timeout=5)
        spool.close()
    assert len(calls) >= 2 and sum(count for _, count, _ in calls) <= len(landed)
    assert [offset for offset, _, _ in calls] == [sum(count for _, count, _ in calls[:i]) for i in range(len(calls))]
    assert all(count >= upper.WRITEBACK_BYTES and offset + count <= size for offset, count, size in calls)
    assert dcmread(BytesIO(landed)).SOPInstanceUID == ds.SOPInstanceUID and landed.endswith(ds.PixelData)
