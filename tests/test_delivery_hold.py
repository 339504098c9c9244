"""Delivery under faults, over real sockets: a PACS that stalls, a PACS whose refusal names the patient,
a crash in the middle of a batch, a node stopped while a transfer hangs.

The stalling PACS completes the association (through a real pynetdicom SCP behind a relay) and then
stops reading: the node's send fills the socket buffers and blocks, exactly as with a hung PACS.
"""

from __future__ import annotations

import json
import logging
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.dul import DULServiceProvider

from dicomnode.cli import main as cli_main
from dicomnode.cli.node import collect_status, setup_logging
from dicomnode.config import DispatchPolicy, parse_config
from dicomnode.destinations.dicom import DicomDestination
from dicomnode.destinations.folder import FolderDestination
from dicomnode.dispatch import Dispatcher
from dicomnode.ledger import DeliveryState, JobState, SeriesKey
from dicomnode.redact import escape_controls, exception_text, peer_comment, uids_in
from dicomnode.spool import Spool

from conftest import require_tools
from reliability import LedgerView, NodeProcess, ct_dataset, dcmsend, free_port, node_config, uid, wait_until

BIG_ROWS = 2048  # 2048 x 2048 x 16 bit = 8 MB: more than loopback's socket buffers once the PACS stops reading
FAKE_NAME = "Quuxbridge^Wilhelmina"
FAKE_ID = "PHI-ID-551177"


# --------------------------------------------------------------------------- peers


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def _recv_pdu(sock: socket.socket) -> bytes:
    head = _recv_exact(sock, 6)
    return head + _recv_exact(sock, int.from_bytes(head[2:6], "big"))


class StallingPACS:
    """Accepts the association (answered by a real pynetdicom SCP), then never reads another byte."""

    def __init__(self) -> None:
        ae = AE(ae_title="PACS")
        ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        self.backend = ae.start_server(("127.0.0.1", 0), block=False)
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)  # small window: stalls sooner
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(8)
        self.port = self.listener.getsockname()[1]
        self.held: list[socket.socket] = []
        self.associations = 0
        threading.Thread(target=self._serve, name="stalling-pacs", daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.held.append(conn)
            try:
                with socket.create_connection(self.backend.server_address) as backend:
                    backend.sendall(_recv_pdu(conn))  # A-ASSOCIATE-RQ
                    conn.sendall(_recv_pdu(backend))  # A-ASSOCIATE-AC
                self.associations += 1
            except (OSError, EOFError):
                continue

    def close(self) -> None:
        self.listener.close()
        for conn in self.held:  # a send still blocked on us fails now
            conn.close()
        self.backend.shutdown()

    def __enter__(self) -> StallingPACS:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def refusing_pacs(port: int, comment: str, on_store: Callable[[Any], None] | None = None) -> Iterator[list[str]]:
    """A pynetdicom SCP answering every C-STORE 0xA700 with ``comment`` as its ErrorComment."""
    stored: list[str] = []

    def handle(event: Any) -> Dataset:
        stored.append(str(event.request.AffectedSOPInstanceUID))
        if on_store is not None:
            on_store(event)
        rsp = Dataset()
        rsp.Status = 0xA700
        rsp.ErrorComment = comment
        return rsp

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        yield stored
    finally:
        server.shutdown()


def _big_ct(folder: Path, name: str = "big", index: int = 0) -> Path:
    pixels = np.random.default_rng(index).integers(0, 4096, (BIG_ROWS, BIG_ROWS), dtype=np.uint16)
    ds = ct_dataset("hold", name, index, rows=BIG_ROWS, cols=BIG_ROWS, pixels=pixels)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}_{index}.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


def _small_ct(folder: Path, series: str, index: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{series}_{index}.dcm"
    ct_dataset("hold", series, index).save_as(path, enforce_file_format=True)
    return path


def _dul_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if isinstance(t, DULServiceProvider) and t.is_alive()]


def _queue(spool: Spool, files: list[Path], destinations: list[str], series: str = "s") -> list[int]:
    """A derived job whose outputs are ``files``, one pending delivery per (file, destination)."""
    ds = ct_dataset("hold", series, 0)
    landed = spool.write_incoming(b"DICM-source")
    job_id, _ = spool.accept(landed, SeriesKey("p", ds.StudyInstanceUID, ds.SeriesInstanceUID), sop_uid=ds.SOPInstanceUID,
                             sop_class_uid=ds.SOPClassUID, calling_aet="MOD")
    spool.ledger.finish_job(job_id, JobState.DERIVED, action="forward", outputs=files, output_kind="forward",
                            destinations=destinations)
    return [d.id for d in spool.ledger.deliveries(job_id)]


@pytest.fixture
def spool(tmp_path: Path) -> Iterator[Spool]:
    s = Spool(tmp_path / "var")
    yield s
    s.close()


POLICY = DispatchPolicy(max_attempts=5, backoff_initial_seconds=0.2, backoff_max_seconds=1.0, batch_size=10)


# --------------------------------------------------------------------------- 1. a stalled PACS


def test_stalled_pacs_fails_the_send_after_its_timeout(tmp_path: Path) -> None:
    """Before: the send blocked for ever (pynetdicom clears the socket timeout; abort waits on the blocked send)."""
    path = _big_ct(tmp_path)
    result: list[Any] = []
    with StallingPACS() as pacs:
        dest = DicomDestination("pacs", "PACS", "127.0.0.1", pacs.port, timeout_seconds=2)
        start = time.monotonic()
        sender = threading.Thread(target=lambda: result.append(dest.send([path, path])), daemon=True)
        sender.start()
        sender.join(20)
        took = time.monotonic() - start
        assert not sender.is_alive(), "the send to a stalled PACS never returned"
    (first, second), = result
    assert not first.ok and first.attempted and "association ended" in first.detail, first
    assert not second.ok and "association ended before this file was sent" in second.detail
    assert took < 12, took  # 2 s without progress, plus the handshake
    wait_until(lambda: not _dul_threads(), 5, 0.1, "pynetdicom's transport threads to end")


def test_stop_cuts_a_stalled_send_at_once(tmp_path: Path) -> None:
    path = _big_ct(tmp_path)
    result: list[Any] = []
    with StallingPACS() as pacs:
        dest = DicomDestination("pacs", "PACS", "127.0.0.1", pacs.port, timeout_seconds=120)
        sender = threading.Thread(target=lambda: result.append(dest.send([path, path])), daemon=True)
        sender.start()
        wait_until(lambda: pacs.associations == 1, 10, 0.05, "the association")
        time.sleep(1.0)  # the socket buffers fill; the send is blocked now
        stopped = time.monotonic()
        dest.stop(abort=True)
        sender.join(10)
        assert not sender.is_alive(), "stop(abort=True) did not end the blocked send"
        assert time.monotonic() - stopped < 3
    (first, second), = result
    assert not first.ok and "the node is stopping" in first.detail
    assert not second.ok and not second.attempted  # never tried: not a failed attempt
    dest.resume()
    assert not dest._stopping.is_set()


def test_stalled_pacs_delays_only_its_own_deliveries(tmp_path: Path, spool: Spool) -> None:
    """One worker per destination: the folder delivery happens while the PACS hangs; the PACS attempt is recorded."""
    big = _big_ct(tmp_path / "out")
    outbox = tmp_path / "outbox"
    with StallingPACS() as pacs:
        destinations = {"pacs": DicomDestination("pacs", "PACS", "127.0.0.1", pacs.port, timeout_seconds=3),
                        "archive": FolderDestination("archive", outbox)}
        _queue(spool, [big], ["pacs", "archive"])
        dispatcher = Dispatcher(spool.ledger, destinations, POLICY)
        stop = threading.Event()
        workers = [threading.Thread(target=dispatcher.run_destination, args=(name, stop, threading.Event(), 0.1), daemon=True)
                   for name in [*destinations, None]]
        for w in workers:
            w.start()
        try:
            wait_until(lambda: pacs.associations >= 1, 10, 0.05, "the PACS association")
            wait_until(lambda: (outbox / big.name).exists() or any(outbox.glob("*.dcm")), 5, 0.05, "the folder delivery")
            by_dest = {d.destination: d for d in spool.ledger.deliveries()}
            assert by_dest["archive"].state == DeliveryState.SENT
            assert by_dest["pacs"].state == DeliveryState.PENDING and by_dest["pacs"].sending_since is not None
            status = collect_status(spool.ledger)
            assert [s["destination"] for s in status["sending"]] == ["pacs"] and status["sending"][0]["age_seconds"] >= 0

            def failed_once() -> bool:
                d = {x.destination: x for x in spool.ledger.deliveries()}["pacs"]
                return d.attempts >= 1 and d.last_error is not None

            wait_until(failed_once, 20, 0.1, "the stalled attempt recorded as failed")
        finally:
            dispatcher.stop(abort=True)
            stop.set()
            for w in workers:
                w.join(10)
        assert not any(w.is_alive() for w in workers)
    pacs_delivery = {d.destination: d for d in spool.ledger.deliveries()}["pacs"]
    assert "association ended" in pacs_delivery.last_error or "stopping" in pacs_delivery.last_error
    status = collect_status(spool.ledger)
    assert status["retrying"] and status["retrying"][0]["last_error"] == pacs_delivery.last_error


def test_status_shows_a_delivery_in_progress_and_its_age(tmp_path: Path, spool: Spool, capsys: pytest.CaptureFixture) -> None:
    out = _small_ct(tmp_path / "out", "progress", 0)
    (delivery_id,) = _queue(spool, [out], ["pacs"])
    spool.ledger.mark_sending([delivery_id], since=time.time() - 42)
    status = collect_status(spool.ledger)
    (sending,) = status["sending"]
    assert sending["id"] == delivery_id and 41 <= sending["age_seconds"] < 60
    config = tmp_path / "node.yaml"
    config.write_text(json.dumps(node_config(tmp_path / "var", free_port(), {"pacs": {"ae_title": "PACS", "host": "127.0.0.1",
                                                                                      "port": 11112}})))
    assert cli_main(["status", "--config", str(config)]) == 0
    text = capsys.readouterr().out
    assert "sending now:" in text and f"#{delivery_id} job" in text and "in progress for 4" in text, text
    spool.ledger.mark_sent([delivery_id])
    assert collect_status(spool.ledger)["sending"] == []


# --------------------------------------------------------------------------- 3. per-file records


def test_each_stored_file_is_recorded_before_the_batch_ends(tmp_path: Path, spool: Spool) -> None:
    """A crash in the middle of a batch must not re-send the files already stored: each is recorded at once."""
    files = [_small_ct(tmp_path / "out", "batch", i) for i in range(3)]
    ids = _queue(spool, files, ["pacs"], series="batch")
    third = threading.Event()
    release = threading.Event()
    port = free_port()

    def handle(event: Any) -> int:
        if event.request.AffectedSOPInstanceUID == uid("hold/batch/2"):
            third.set()
            release.wait(10)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    try:
        dispatcher = Dispatcher(spool.ledger, {"pacs": DicomDestination("pacs", "PACS", "127.0.0.1", port, timeout_seconds=15)},
                                POLICY)
        sender = threading.Thread(target=dispatcher.run_once, args=("pacs",), daemon=True)
        sender.start()
        assert third.wait(10)
        states = {d.id: (d.state, d.sending_since is not None) for d in spool.ledger.deliveries()}
        assert states == {ids[0]: (DeliveryState.SENT, False), ids[1]: (DeliveryState.SENT, False),
                          ids[2]: (DeliveryState.PENDING, True)}
        release.set()
        sender.join(10)
    finally:
        release.set()
        server.shutdown()
    assert {d.state for d in spool.ledger.deliveries()} == {DeliveryState.SENT}


# --------------------------------------------------------------------------- 2. text from the PACS


def test_redaction_keeps_uids_and_codes_only() -> None:
    comment = f"PatientID {FAKE_ID} name {FAKE_NAME} conflicts with 1.2.840.10008.5.1.4.1.1.2 (seen 2024-01-01)"
    kept = peer_comment(comment)
    assert FAKE_ID not in kept and "Quuxbridge" not in kept and "2024" not in kept
    assert kept == "comment withheld, UIDs in it: 1.2.840.10008.5.1.4.1.1.2"
    assert peer_comment("") == "" and peer_comment("just words") == "comment withheld"
    assert uids_in("id 784512, 1.2.3 and 1.2.3 again, 4.5") == ["1.2.3", "4.5"]
    assert exception_text(ValueError(f"bad value {FAKE_NAME!r} in 1.2.3.4")) == \
        "ValueError (message withheld, UIDs in it: 1.2.3.4)"
    assert exception_text(ConnectionRefusedError(111, "Connection refused")) == "ConnectionRefusedError: Connection refused"
    assert escape_controls("1.2\n2026 ERROR forged\r\x1b[31m\u2028x\tok") == "1.2\\n2026 ERROR forged\\r\\x1b[31m\\u2028x\tok"


def test_log_lines_cannot_be_forged(tmp_path: Path) -> None:
    log_file = tmp_path / "node.log"
    config = parse_config(node_config(tmp_path / "var", free_port(), {"archive": {"folder": str(tmp_path / "out")}},
                                      log_file=log_file), tmp_path)
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, logging.getLogger("pynetdicom").level)
    try:
        setup_logging(config)
        log = logging.getLogger("dicomnode.test")
        log.warning("SOP instance %s stored", "1.2.3\n2026-01-01 00:00:00,000 ERROR forged line\x1b[2J")
        try:
            raise ValueError("boom\nFORGED-IN-TRACEBACK")
        except ValueError:
            log.exception("with a traceback")
        for handler in root.handlers:
            handler.flush()
    finally:
        for handler in list(root.handlers):
            root.removeHandler(handler)
            handler.close()
        for handler in saved[0]:
            root.addHandler(handler)
        root.setLevel(saved[1])
        logging.getLogger("pynetdicom").setLevel(saved[2])
    lines = log_file.read_text().splitlines()
    stored = [line for line in lines if "stored" in line]
    assert len(stored) == 1 and "1.2.3\\n2026-01-01 00:00:00,000 ERROR forged line\\x1b[2J stored" in stored[0]
    assert "\x1b" not in log_file.read_text()
    assert not any(line.startswith("2026-01-01") or line.startswith("FORGED") for line in lines)
    traceback = lines[lines.index(next(x for x in lines if "with a traceback" in x)) + 1:]
    assert traceback and all(line.startswith("  ") for line in traceback), traceback


@pytest.mark.slow
def test_pacs_refusal_text_reaches_no_log_ledger_or_status(tmp_path: Path) -> None:
    """A PACS that names the patient in its ErrorComment: only the status code and the UIDs are kept."""
    require_tools("dcmsend")
    pacs_port, node_port = free_port(), free_port()
    source = _small_ct(tmp_path / "in", "refused", 0)
    marker_uid = "1.2.826.0.1.3680043.9.9999.42"
    comment = f"PatientID {FAKE_ID} name {FAKE_NAME} conflict with {marker_uid}\nforged"
    cfg = node_config(tmp_path / "var", node_port,
                      {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "timeout_seconds": 5}},
                      rules=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
                      dispatch={"max_attempts": 2, "backoff_initial_seconds": 0.2, "backoff_max_seconds": 0.5},
                      log_file=tmp_path / "logs" / "node.log")
    ledger = LedgerView(tmp_path / "var")
    with refusing_pacs(pacs_port, comment) as stored, NodeProcess(tmp_path, cfg) as node:
        assert dcmsend(node_port, [source]).returncode == 0
        wait_until(lambda: ledger.deliveries().get("dead_letter") == 1, 60, 0.2, "the refused delivery dead-lettered")
        assert len(stored) == 2
        text = node.cli("status")
        as_json = node.cli("status", "--json")
    assert text.returncode == 0 and as_json.returncode == 0
    (dead,) = json.loads(as_json.stdout)["dead_letters"]
    assert "0xA700" in dead["last_error"] and marker_uid in dead["last_error"], dead
    needles = [FAKE_ID, FAKE_NAME, "Quuxbridge", "Wilhelmina", "forged"]
    blobs = {"log file": (tmp_path / "logs" / "node.log").read_bytes(), "stderr": node.stderr().encode(),
             "status": text.stdout.encode(), "status --json": as_json.stdout.encode()}
    for path in (tmp_path / "var").glob("ledger.sqlite3*"):
        blobs[path.name] = path.read_bytes()
    assert "ledger.sqlite3" in blobs
    for where, blob in blobs.items():
        for needle in needles:
            assert needle.encode() not in blob, f"{needle!r} found in {where}"


# --------------------------------------------------------------------------- the node: stall, folder, SIGTERM


@pytest.mark.slow
def test_node_with_a_stalled_pacs_delivers_elsewhere_and_stops_within_the_drain(tmp_path: Path) -> None:
    require_tools("dcmsend")
    node_port = free_port()
    outbox = tmp_path / "outbox"
    big = _big_ct(tmp_path / "in")
    ledger = LedgerView(tmp_path / "var")
    with StallingPACS() as pacs:
        cfg = node_config(tmp_path / "var", node_port,
                          {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port, "timeout_seconds": 3},
                           "archive": {"folder": str(outbox)}},
                          rules=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs", "archive"]}],
                          log_file=tmp_path / "node.log")
        node = NodeProcess(tmp_path, cfg).start()
        try:
            assert dcmsend(node_port, [big]).returncode == 0
            wait_until(lambda: any(outbox.glob("*.dcm")), 30, 0.2, "the folder delivery beside the stalled PACS")
            wait_until(lambda: ledger._rows("SELECT attempts FROM deliveries WHERE destination='pacs' AND attempts > 0"
                                            " AND last_error IS NOT NULL"), 30, 0.2, "the stalled attempt recorded")
            status = json.loads(node.cli("status", "--json").stdout)
            (retrying,) = status["retrying"]
            assert retrying["destination"] == "pacs" and "association ended" in retrying["last_error"], retrying
            first_stop = time.monotonic()
            assert node.stop() == 0
            quick = time.monotonic() - first_stop

            # the same PACS with a long timeout: SIGTERM while the transfer hangs must still end the node in the drain
            node.config["destinations"]["pacs"]["timeout_seconds"] = 300
            node.start()
            wait_until(lambda: ledger._rows("SELECT id FROM deliveries WHERE sending_since < ?", (time.time() - 2,)), 30, 0.2,
                       "a transfer hanging for 2 s")
            sent_term = time.monotonic()
            node.proc.send_signal(signal.SIGTERM)
            node.proc.wait(45)
            took = time.monotonic() - sent_term
            rc = node.proc.returncode
            node.proc = None
        finally:
            node.stop()
    print(f"\nstalled PACS: SIGTERM during 3 s-timeout retries took {quick:.1f} s; "
          f"SIGTERM during a hanging transfer (timeout 300 s) took {took:.1f} s (drain 30 s)")
    assert rc == 0
    assert took < 30, took
    log = (tmp_path / "node.log").read_text()
    assert "cutting transfers still in flight" in log


# --------------------------------------------------------------------------- 3. SIGKILL in the middle of a batch


@pytest.mark.slow
def test_sigkill_during_a_batch_resends_only_the_file_in_flight(tmp_path: Path) -> None:
    """Kill -9 while the 4th file of a 6-file batch is at the PACS: after the restart only that file goes again.

    Before: the whole batch was recorded after its last file, so files 1-3 (already stored) went twice.
    """
    require_tools("dcmsend")
    pacs_port, node_port = free_port(), free_port()
    sources = [_small_ct(tmp_path / "in", "batch", i) for i in range(6)]
    fourth = uid("hold/batch/3")
    at_fourth, release = threading.Event(), threading.Event()
    stores: list[str] = []

    def handle(event: Any) -> int:
        sop = str(event.request.AffectedSOPInstanceUID)
        stores.append(sop)
        if sop == fourth and not at_fourth.is_set():
            at_fourth.set()
            release.wait(30)
        return 0x0000

    ae = AE(ae_title="PACS")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", pacs_port), block=False, evt_handlers=[(evt.EVT_C_STORE, handle)])
    cfg = node_config(tmp_path / "var", node_port,
                      {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "timeout_seconds": 30}},
                      rules=[{"name": "fwd", "match": {"Modality": "CT"}, "destinations": ["pacs"]}],
                      dispatch={"batch_size": 10}, log_file=tmp_path / "node.log")
    ledger = LedgerView(tmp_path / "var")
    node = NodeProcess(tmp_path, cfg)
    try:
        node.start()
        assert dcmsend(node_port, sources).returncode == 0
        assert at_fourth.wait(30), "the 4th file never reached the PACS"
        sent_before_kill = ledger.deliveries().get("sent", 0)
        node.kill()
        release.set()
        node.start()
        wait_until(ledger.settled, 30, 0.2, "every delivery sent after the restart")
    finally:
        release.set()
        node.stop()
        server.shutdown()
    counts = {sop: stores.count(sop) for sop in set(stores)}
    duplicates = sum(n - 1 for n in counts.values())
    print(f"\nSIGKILL in the middle of a 6-file batch: {sent_before_kill} recorded sent before the kill, "
          f"{duplicates} re-deliveries after the restart")
    assert sent_before_kill == 3
    assert counts == {uid(f"hold/batch/{i}"): 2 if i == 3 else 1 for i in range(6)}, counts
    assert "3 deliveries of a batch in flight when the node stopped" in (tmp_path / "node.log").read_text()
