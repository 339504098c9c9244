"""The node holds under attack: idle connections, TLS stalls, PDU bombs, oversized objects (real sockets).

Every test talks to a listening node over loopback: raw TCP sockets play the attacker (idle
connections, a PDU header that declares 4 GB, 1 GB of garbage behind it), dcmtk's echoscu and dcmsend
the modality that must still get through. Attackers connect from other loopback addresses
(127.0.0.2, ...) so the per-peer connection limit sees them as separate hosts.
"""

from __future__ import annotations

import os
import socket
import stat
import struct
import subprocess
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from dicomnode.config import NodeSettings
from dicomnode.listener import PduGuard, pdu_limit

from conftest import require_tools
from factories import ct_dataset, free_port, start_receiver, write_series
from reliability import Certs, echoscu, make_certs


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require_tools("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(certs: Certs) -> list[str]:
    return ["+tls", str(certs.client_key), str(certs.client_cert), "+cf", str(certs.ca)]


def _connect(port: int, source: str = "127.0.0.1") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.bind((source, 0))
    sock.connect(("127.0.0.1", port))
    return sock


def _closed_within(sock: socket.socket, seconds: float) -> float | None:
    """Seconds until the peer closed ``sock`` (EOF or reset), None if it stayed open ``seconds``."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while True:
            if not sock.recv(4096):
                break
    except TimeoutError:
        return None
    except OSError:  # reset
        pass
    return time.monotonic() - start


def _timed_echo(port: int, **kwargs) -> tuple[int, float]:
    start = time.monotonic()
    try:
        rc = echoscu(port, timeout=20, **kwargs).returncode
    except subprocess.TimeoutExpired:
        rc = -1
    return rc, time.monotonic() - start


# ------------------------------------------------------------------------------------------ 1. TLS stalls
@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_an_idle_connection_to_the_tls_port_does_not_block_the_listener(certs: Certs, tmp_path: Path, engine: str) -> None:
    """pynetdicom shook hands in its one accept thread: one silent TCP connection stopped every TLS peer."""
    require_tools("echoscu")
    tls = {"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca, "require_client_cert": True}
    receiver, spool = start_receiver(tmp_path / "var", tls=tls, association_request_timeout_seconds=2,
                                     receive_engine=engine)
    try:
        idle = _connect(receiver.port)  # connects, never says a word
        time.sleep(0.3)
        rc, seconds = _timed_echo(receiver.port, tls=_tls(certs))
        assert rc == 0 and seconds < 5, f"TLS C-ECHO behind an idle connection: rc {rc} after {seconds:.1f} s"
        closed = _closed_within(idle, 8)
        assert closed is not None and closed < 4, "the node keeps an idle TLS connection past its handshake timeout"
        # a peer that never finishes its handshake is dropped too, and valid peers still get through
        stalled = _connect(receiver.port)
        stalled.sendall(bytes.fromhex("16030100"))  # the first bytes of a ClientHello, then silence
        assert echoscu(receiver.port, tls=_tls(certs)).returncode == 0
        assert _closed_within(stalled, 8) is not None
    finally:
        receiver.stop(timeout=5)
        spool.close()


# ------------------------------------------------------------------------------------------ 2. idle sockets
@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_idle_connections_neither_lock_out_senders_nor_stay(tmp_path: Path, engine: str) -> None:
    """10 silent connections used to take all 10 association slots ("Local Limit Exceeded")."""
    require_tools("echoscu")
    receiver, spool = start_receiver(tmp_path / "var", max_associations=10, association_request_timeout_seconds=2,
                                     max_connections_per_peer=4, receive_engine=engine)
    idle: list[socket.socket] = []
    try:
        for source, n in (("127.0.0.2", 4), ("127.0.0.3", 4), ("127.0.0.4", 2)):
            idle += [_connect(receiver.port, source) for _ in range(n)]
        time.sleep(0.3)
        rc, seconds = _timed_echo(receiver.port)
        assert rc == 0 and seconds < 3, f"C-ECHO with 10 idle connections open: rc {rc} after {seconds:.1f} s"
        # a fifth connection from one address is closed at once
        fifth = _connect(receiver.port, "127.0.0.2")
        closed = _closed_within(fifth, 1.5)
        assert closed is not None and closed < 1, "per-peer connection limit not enforced"
        fifth.close()
        # and the idle ones are dropped after association_request_timeout_seconds
        started = time.monotonic()
        for sock in idle:
            assert _closed_within(sock, max(0.1, started + 6 - time.monotonic())) is not None
        assert time.monotonic() - started < 6
    finally:
        for sock in idle:
            sock.close()
        receiver.stop(timeout=5)
        spool.close()


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_refusals_are_logged_once_and_waiting_connections_are_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture, engine: str) -> None:
    from dicomnode import listener  # admission_refusal, shared by both engines, reads it there

    monkeypatch.setattr(listener, "MAX_PENDING_CONNECTIONS", 3)
    receiver, spool = start_receiver(tmp_path / "var", max_connections_per_peer=1, receive_engine=engine)
    logger = "dicomnode.upper" if engine == "native" else "dicomnode.listener"
    held = [_connect(receiver.port, f"127.0.0.{i}") for i in (2, 3, 4)]
    try:
        time.sleep(0.2)
        refused = [_connect(receiver.port, "127.0.0.5") for _ in range(2)] + [_connect(receiver.port, "127.0.0.2")]
        assert all(_closed_within(sock, 1.5) is not None for sock in refused)
        lines = [r.getMessage() for r in caplog.records if r.name == logger]
        assert lines.count("refused a connection from 127.0.0.5: 3 connections waiting for their association "
                           "request (all peers)") == 1, lines  # once per address and reason, not per connection
        assert any(line.startswith("refused a connection from 127.0.0.2: 1 connections open") for line in lines)
        assert all(_closed_within(sock, 0.2) is None for sock in held)  # the admitted ones are still open
    finally:
        for sock in held:
            sock.close()
        receiver.stop(timeout=5)
        spool.close()


def test_a_pdu_stalled_halfway_ends_the_association(tmp_path: Path) -> None:
    """Without a socket timeout the node's reader blocked for good on a PDU that never completes."""
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    from dicomnode.config import StorageConfig
    from dicomnode.receive import Receiver
    from dicomnode.spool import Spool

    spool = Spool(tmp_path / "var")
    receiver = Receiver(spool, NodeSettings(host="127.0.0.1", port=free_port()), StorageConfig(root=spool.root))
    receiver.ae.network_timeout = 1.5
    receiver.start()
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
    try:
        assert assoc.is_established
        assoc.dul.socket.socket.sendall(struct.pack(">BBL", 0x04, 0, 4096) + b"\0" * 100)  # then nothing
        deadline = time.monotonic() + 8
        while receiver.ae.active_associations and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not receiver.ae.active_associations, "the node still waits for the rest of the PDU"
    finally:
        assoc.abort()
        receiver.stop(timeout=5)
        spool.close()


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_established_associations_still_count_against_max_associations(tmp_path: Path, engine: str) -> None:
    from pynetdicom import AE
    from pynetdicom.sop_class import Verification

    receiver, spool = start_receiver(tmp_path / "var", max_associations=2, max_connections_per_peer=8,
                                     receive_engine=engine)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    held = [ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
        assert third.is_rejected and not third.is_established
        assert third.acceptor.primitive.diagnostic == 0x02  # local limit exceeded
        held[0].release()
        deadline = time.monotonic() + 5
        while True:
            again = ae.associate("127.0.0.1", receiver.port, ae_title="DICOMNODE")
            if again.is_established or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        assert again.is_established
        again.release()
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
        receiver.stop(timeout=5)
        spool.close()


# ------------------------------------------------------------------------------------------ 3. PDU bombs
def test_pdu_limit_follows_max_pdu_size() -> None:
    node = NodeSettings()
    assert node.max_pdu_size == 1024 * 1024
    assert pdu_limit(node.max_pdu_size, int(node.max_object_bytes)) < 2 * 1024 * 1024
    assert pdu_limit(0, 50_000_000) > 50_000_000  # 0: bounded by the largest object accepted
    assert pdu_limit(16384, 50_000_000) >= 64 * 1024  # never below what an A-ASSOCIATE-RQ needs


def test_guard_refuses_a_declared_length_before_reading_it() -> None:
    guard = PduGuard(max_pdu=1 << 20, max_message=10 << 20)
    assert guard.check_header(struct.pack(">BBL", 0x01, 0, 4000)) is None
    assert "declares 4294967280 bytes" in (guard.check_header(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0)) or "")
    for _ in range(9):
        assert guard.check_header(struct.pack(">BBL", 0x04, 0, 1 << 20)) is None
    assert guard.check_header(struct.pack(">BBL", 0x04, 0, 1 << 20)) is None  # exactly at the limit
    assert "max_object_bytes" in (guard.check_header(struct.pack(">BBL", 0x04, 0, 1)) or "")
    guard.sent(struct.pack(">BBL", 0x04, 0, 100))  # our response ends the message: the count restarts
    assert guard.check_header(struct.pack(">BBL", 0x04, 0, 1 << 20)) is None


def _vm(pid: int, key: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(key)


@pytest.mark.slow
def test_pdu_bombs_do_not_take_the_node_memory(tmp_path: Path) -> None:
    """Three raw connections declare a 4 GB PDU and stream 1 GB each: the node stays under 1 GB RSS."""
    require_tools("echoscu")
    from reliability import NodeProcess, node_config

    cfg = node_config(tmp_path / "var", free_port(), {"outbox": {"folder": str(tmp_path / "outbox")}})
    with NodeProcess(tmp_path, cfg) as node:
        assert node.proc is not None
        assert echoscu(node.port).returncode == 0
        before = _vm(node.proc.pid, "VmHWM")
        sent: list[int] = [0, 0, 0]
        chunk = b"\0" * (1 << 20)

        def bomb(i: int) -> None:
            with _connect(node.port) as sock:
                sock.settimeout(30)
                try:
                    sock.sendall(struct.pack(">BBL", 0x04, 0, 0xFFFFFFF0))
                    while sent[i] < 1 << 30:
                        sock.sendall(chunk)
                        sent[i] += len(chunk)
                except OSError:
                    pass

        threads = [threading.Thread(target=bomb, args=(i,)) for i in range(3)]
        started = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        peak = _vm(node.proc.pid, "VmHWM")
        print(f"node peak RSS {before / 2**20:.0f} MiB before, {peak / 2**20:.0f} MiB after 3 bombs; "
              f"bytes sent before the node cut them off: {[s // 2**20 for s in sent]} MiB "
              f"in {time.monotonic() - started:.1f} s")
        assert peak < 1 << 30, f"node RSS {peak / 2**20:.0f} MiB under a PDU bomb"
        assert max(sent) < 64 << 20, f"the node read {max(sent) / 2**20:.0f} MiB of a PDU it should have refused"
        assert node.alive() and echoscu(node.port).returncode == 0
        assert "PDU" in node.stderr() and "declares" in node.stderr()


# ------------------------------------------------------------------------------------------ 4. size limit
def _big_ct(path: Path, nbytes: int) -> Path:
    side = int((nbytes // 2) ** 0.5)
    ds = ct_dataset("big", "s1", 0, rows=16, cols=16)
    ds.Rows = ds.Columns = side
    ds.PixelData = np.zeros(side * side, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture
def chunked_receive(monkeypatch: pytest.MonkeyPatch):
    """The node's process settings (objects stream into the spool's receiving/), restored after the test."""
    import tempfile

    from pynetdicom import _config

    from dicomnode.netconfig import configure

    monkeypatch.setattr(tempfile, "tempdir", tempfile.gettempdir())
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", _config.STORE_RECV_CHUNKED_DATASET)
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", _config.STORE_SEND_CHUNKED_DATASET)
    return configure


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_an_oversized_object_is_aborted_while_it_arrives(tmp_path: Path, chunked_receive, engine: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """max_object_bytes 10 MB: a 100 MB object is cut off near 10 MB, not written whole then refused."""
    require_tools("dcmsend", "echoscu")
    import dicomnode.upper as upper

    from reliability import dcmsend

    big = _big_ct(tmp_path / "in" / "big.dcm", 100_000_000)
    receiver, spool = start_receiver(tmp_path / "var", max_object_bytes=10_000_000, allowed_calling_aets=[],
                                     receive_engine=engine)
    chunked_receive(spool.chunks)
    landing = spool.chunks if engine == "pynetdicom" else spool.incoming  # where each engine streams the object
    seen: dict[str, tuple[int, int]] = {}  # chunk file -> (largest size seen, mode)
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            for path in landing.glob("*"):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                seen[path.name] = (max(st.st_size, seen.get(path.name, (0, 0))[0]), stat.S_IMODE(st.st_mode))
            time.sleep(0.005)

    write_all = upper._write_all

    def watched_write(file: object, data: memoryview | bytes) -> None:
        # the native engine can write its ~10 MB and remove them between two polls of ``watch``: see each write
        write_all(file, data)
        st = os.fstat(file.fileno())
        name = os.path.basename(os.readlink(f"/proc/self/fd/{file.fileno()}"))
        seen[name] = (max(st.st_size, seen.get(name, (0, 0))[0]), stat.S_IMODE(st.st_mode))

    monkeypatch.setattr(upper, "_write_all", watched_write)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        started = time.monotonic()
        result = dcmsend(receiver.port, [big], timeout=120)
        seconds = time.monotonic() - started
        stop.set()
        watcher.join()
        out = result.stdout + result.stderr
        assert result.returncode != 0, out
        assert seen, "no chunk file was seen"
        largest = max(size for size, _mode in seen.values())
        assert largest < 12_000_000, f"{largest} bytes written before the limit was enforced ({seconds:.1f} s)"
        assert {mode for _size, mode in seen.values()} == {0o600}
        deadline = time.monotonic() + 5
        while list(landing.iterdir()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert list(landing.iterdir()) == [], "the partial object stayed on disk after the abort"
        assert not spool.ledger.all_instances()
        # the node keeps serving; an object under the limit still goes in
        small = write_series(tmp_path / "in", "small", "s1", 1)
        assert dcmsend(receiver.port, small).returncode == 0
        assert len(spool.ledger.all_instances()) == 1
    finally:
        stop.set()
        receiver.stop(timeout=5)
        spool.close()


def test_partial_objects_are_swept_at_start_up(tmp_path: Path) -> None:
    from dicomnode.spool import Spool

    spool = Spool(tmp_path / "var")
    (spool.chunks / "tmpabc.dcm").write_bytes(b"partial")
    spool.close()
    spool = Spool(tmp_path / "var")
    try:
        assert spool.clean_incoming() == 1 and not list(spool.chunks.iterdir())
    finally:
        spool.close()


# ------------------------------------------------------------------------------------------ 5. check-config
def _check_config(tmp_path: Path, capsys: pytest.CaptureFixture[str], **sections) -> tuple[int, str]:
    import yaml

    from dicomnode.cli import main

    data = {"node": {"host": "127.0.0.1", "port": 11112}, "storage": {"root": str(tmp_path / "var")},
            "destinations": {"outbox": {"folder": str(tmp_path / "out")}},
            "rules": [{"name": "all", "destinations": ["outbox"]}]}
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(data))
    code = main(["check-config", str(path)])
    out = capsys.readouterr()
    return code, out.out + out.err


def test_check_config_tells_what_only_this_machine_can(certs: Certs, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _check_config(tmp_path, capsys)
    assert code == 0 and out.startswith("OK"), out
    ok_tls = {"cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca)}
    assert _check_config(tmp_path, capsys, node={"tls": ok_tls})[0] == 0

    code, out = _check_config(tmp_path, capsys, node={"tls": {**ok_tls, "key": str(certs.client_key)}})
    assert code == 2 and f"node.tls.key: the private key {certs.client_key} does not belong to the certificate " \
                          f"{certs.server_cert}" in out, out
    code, out = _check_config(tmp_path, capsys, destinations={"pacs": {
        "ae_title": "PACS", "host": "127.0.0.1", "port": 2762,
        "tls": {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.rogue_key)}}})
    assert "destinations.pacs.tls.key: the private key" in out, out

    code, out = _check_config(tmp_path, capsys, node={"host": "192.0.2.7"})  # TEST-NET-1: never ours
    assert code == 2 and "node.host: 192.0.2.7 (192.0.2.7) is not an address of this host" in out, out
    code, out = _check_config(tmp_path, capsys, node={"host": "no-such-host.invalid"})
    assert code == 2 and "node.host: 'no-such-host.invalid' is neither an IP address nor a name" in out, out

    code, out = _check_config(tmp_path, capsys, storage={"root": "/sys/dicomnode-test/var"},
                              logging={"file": "/sys/dicomnode-test.log"})
    assert code == 2, out
    assert "storage.root: cannot create /sys/dicomnode-test/var: /sys is not writable" in out, out
    assert "logging.file: cannot create /sys/dicomnode-test.log: /sys is not writable" in out, out
    a_file = tmp_path / "plain.txt"
    a_file.write_text("x")
    code, out = _check_config(tmp_path, capsys, storage={"root": str(a_file / "var")}, logging={"file": str(tmp_path)})
    assert f"storage.root: cannot create {a_file / 'var'}: {a_file} is not a folder" in out, out
    assert f"logging.file: {tmp_path} is a folder, not a file" in out, out


# ------------------------------------------------------------------------------------------ 5. host names
def _cert_for(certs: Certs, folder: Path, name: str, san: str) -> tuple[Path, Path]:
    """A server certificate from the test CA that names ``san`` (not 127.0.0.1)."""
    key, csr, cert, ext = (folder / f"{name}.{x}" for x in ("key", "csr", "pem", "ext"))
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", f"/CN={name}")
    ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\nsubjectAltName={san}\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(certs.ca), "-CAkey", str(certs.ca.with_name("ca.key")),
        "-CAcreateserial", "-out", str(cert), "-days", "2", "-extfile", str(ext))
    return cert, key


def test_tls_destinations_verify_the_host_name(certs: Certs, tmp_path: Path) -> None:
    """A PACS certificate from the right CA but issued to another host is refused unless verify_hostname: false."""
    require_tools("storescp", "openssl")
    from dicomnode.config import parse_config
    from dicomnode.destinations.dicom import DicomDestination

    from reliability import StoreSCP

    other_cert, other_key = _cert_for(certs, tmp_path, "other", "DNS:archive.example.org")
    wrong = Certs(certs.ca, other_cert, other_key, certs.client_cert, certs.client_key, certs.rogue_cert,
                  certs.rogue_key)
    for server_certs, verify, ok in ((certs, True, True), (wrong, True, False), (wrong, False, True)):
        with StoreSCP(tmp_path / "pacs", certs=server_certs) as pacs:
            tls = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key),
                   **({} if verify else {"verify_hostname": False})}
            cfg = parse_config({"destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                                                          "tls": tls}},
                                "rules": [{"name": "all", "destinations": ["pacs"]}]}, tmp_path)
            dest = DicomDestination.from_settings("pacs", cfg.destinations["pacs"], "DICOMNODE")
            answered, reason = dest.echo()
            assert answered == ok, (server_certs.server_cert.name, verify, reason)
            if not ok:
                assert "mismatch" in reason or "match" in reason, reason
