"""Access control and DICOM TLS, shown with real dcmtk peers over loopback.

security.py is tested first against a bare pynetdicom SCP/SCU (fast), then the running node is tested
with wrong calling/called AE titles, TLS echoes with and without client certificates, and sending to a
TLS storescp (slow: subprocess node).
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import ExplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from dicomnode.security import TLSConfigError, client_ssl_context, client_tls_args, server_ssl_context

from conftest import require_tools
from reliability import Certs, StoreSCP, dcmsend, echoscu, free_port, make_certs, sop_uids, tool_env, write_series


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    require_tools("openssl")
    return make_certs(tmp_path_factory.mktemp("certs"))


def _tls(key: Path, cert: Path, ca: Path) -> list[str]:
    return ["+tls", str(key), str(cert), "+cf", str(ca)]


# ------------------------------------------------------------------------------------ security.py
def test_server_context_settings(certs: Certs) -> None:
    ctx = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key})
    assert ctx.verify_mode == ssl.CERT_NONE and ctx.minimum_version >= ssl.TLSVersion.TLSv1_2
    ctx = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca})
    assert ctx.verify_mode == ssl.CERT_OPTIONAL
    ctx = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca,
                              "require_client_cert": True})
    assert ctx.verify_mode == ssl.CERT_REQUIRED


def test_bad_tls_settings_are_named(certs: Certs, tmp_path: Path) -> None:
    with pytest.raises(TLSConfigError, match="not found: .*missing.pem"):
        server_ssl_context({"cert": tmp_path / "missing.pem", "key": certs.server_key})
    with pytest.raises(TLSConfigError, match="require_client_cert needs node.tls.ca"):
        server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "require_client_cert": True})
    with pytest.raises(TLSConfigError, match="cannot load certificate"):  # key of another certificate
        server_ssl_context({"cert": certs.server_cert, "key": certs.client_key})
    with pytest.raises(TLSConfigError, match="cert and key go together"):
        client_ssl_context({"ca": certs.ca, "cert": certs.client_cert})
    not_pem = tmp_path / "ca.pem"
    not_pem.write_text("not a certificate")
    with pytest.raises(TLSConfigError, match="cannot load CA"):
        client_ssl_context({"ca": not_pem})
    assert client_tls_args(None, "pacs") is None


def _handshake(server_ctx: ssl.SSLContext, client_ctx: ssl.SSLContext) -> str | None:
    """TLS handshake over a loopback socket pair; None on success, else the client's error."""
    srv, cli = socket.socketpair()
    errors: list[Exception] = []

    def serve() -> None:
        try:
            with server_ctx.wrap_socket(srv, server_side=True) as s:
                s.recv(1)
        except (ssl.SSLError, OSError) as exc:
            errors.append(exc)

    t = threading.Thread(target=serve)
    t.start()
    try:
        with client_ctx.wrap_socket(cli, server_hostname="localhost") as c:
            c.sendall(b"x")
            c.recv(1)  # TLS 1.3: a refused client certificate shows up on the first read
    except (ssl.SSLError, OSError) as exc:
        return str(exc)
    finally:
        t.join(10)
    return str(errors[0]) if errors else None


def test_contexts_verify_each_other(certs: Certs) -> None:
    server = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca,
                                 "require_client_cert": True})
    good = client_ssl_context({"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key})
    assert _handshake(server, good) is None
    assert _handshake(server, client_ssl_context({"ca": certs.ca})) is not None  # no client certificate
    rogue = client_ssl_context({"ca": certs.ca, "cert": certs.rogue_cert, "key": certs.rogue_key})
    assert _handshake(server, rogue) is not None  # client certificate from another CA
    # the client refuses a server whose certificate does not chain to its CA
    fake_server = server_ssl_context({"cert": certs.rogue_cert, "key": certs.rogue_key})
    assert "certificate verify failed" in (_handshake(fake_server, good) or "")


# ------------------------------------------------------------------- dcmtk against security.py (fast)
@pytest.fixture
def tls_echo_scp(certs: Certs, free_port: int):
    """A pynetdicom Verification SCP behind server_ssl_context(require_client_cert=True)."""
    ae = AE(ae_title="DICOMNODE")
    ae.add_supported_context(Verification)
    ctx = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca,
                              "require_client_cert": True})
    server = ae.start_server(("127.0.0.1", free_port), block=False, ssl_context=ctx)
    yield free_port
    server.shutdown()


def test_dcmtk_echo_through_server_context(certs: Certs, tls_echo_scp: int) -> None:
    require_tools("echoscu")
    ok = echoscu(tls_echo_scp, tls=_tls(certs.client_key, certs.client_cert, certs.ca))
    assert ok.returncode == 0, ok.stderr
    plain = echoscu(tls_echo_scp)
    assert plain.returncode != 0
    anonymous = echoscu(tls_echo_scp, tls=["+tla", "+cf", str(certs.ca)])  # TLS, but no client certificate
    assert anonymous.returncode != 0
    rogue = echoscu(tls_echo_scp, tls=_tls(certs.rogue_key, certs.rogue_cert, certs.ca))
    assert rogue.returncode != 0


def test_pynetdicom_scu_stores_to_tls_storescp(certs: Certs, tmp_path: Path) -> None:
    require_tools("storescp")
    paths = write_series(tmp_path / "in", "tls", "s1", 2)
    with StoreSCP(tmp_path / "pacs", certs=certs) as pacs:
        ae = AE(ae_title="DICOMNODE")
        ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)  # the files' own transfer syntax
        tls = client_tls_args({"ca": certs.ca, "cert": certs.client_cert, "key": certs.client_key}, "127.0.0.1")
        assoc = ae.associate("127.0.0.1", pacs.port, ae_title="PACS", tls_args=tls)
        assert assoc.is_established
        statuses = [assoc.send_c_store(p).Status for p in paths]
        assoc.release()
        assert statuses == [0, 0]
        # without TLS the same PACS does not answer DICOM
        plain = ae.associate("127.0.0.1", pacs.port, ae_title="PACS")
        assert not plain.is_established
    assert len(set(sop_uids(tmp_path / "pacs"))) == 2




# ------------------------------------------------------------------- the node's Receiver (fast)
def _receiver(tmp_path: Path, **settings):
    from factories import start_receiver

    return start_receiver(tmp_path / "var", **settings)


def storescu(port: int, paths: list[Path], *, tls: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run(["storescu", "-aet", "MODALITY", "-aec", "DICOMNODE", "-to", "10", *tls, "127.0.0.1",
                           str(port), *map(str, paths)], capture_output=True, text=True, timeout=60, env=tool_env())


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_calling_and_called_ae_checks(tmp_path: Path, engine: str) -> None:
    require_tools("echoscu", "dcmsend")
    receiver, spool = _receiver(tmp_path, ae_title="DICOMNODE", allowed_calling_aets=["CT01", "MR01"], receive_engine=engine)
    try:
        port = receiver.port
        assert echoscu(port, aet="CT01").returncode == 0
        assert echoscu(port, aet="MR01").returncode == 0
        refused = echoscu(port, aet="INTRUDER")
        assert refused.returncode != 0 and "Association Rejected" in refused.stdout + refused.stderr
        assert echoscu(port, aet="CT01", aec="WRONGNODE").returncode != 0  # called AE must be ours
        paths = write_series(tmp_path / "in", "access", "s1", 2)
        assert dcmsend(port, paths, aet="INTRUDER").returncode != 0
        assert not spool.ledger.all_instances()  # nothing stored from a stranger
        assert dcmsend(port, paths, aet="CT01").returncode == 0
        assert len(spool.ledger.all_instances()) == 2
    finally:
        receiver.stop()
        spool.close()


def test_anyone_may_call_when_the_list_is_empty(tmp_path: Path) -> None:
    require_tools("echoscu")
    receiver, spool = _receiver(tmp_path, require_called_aet=False)
    try:
        assert echoscu(receiver.port, aet="ANYONE", aec="WHATEVER").returncode == 0
    finally:
        receiver.stop()
        spool.close()


@pytest.mark.parametrize("engine", ["pynetdicom", "native"])
def test_node_receiver_over_tls(certs: Certs, tmp_path: Path, engine: str) -> None:
    require_tools("echoscu", "storescu")
    tls = {"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca, "require_client_cert": True}
    receiver, spool = _receiver(tmp_path, tls=tls, receive_engine=engine)
    try:
        port = receiver.port
        client = _tls(certs.client_key, certs.client_cert, certs.ca)
        assert echoscu(port, tls=client).returncode == 0
        assert echoscu(port).returncode != 0  # plain TCP to a TLS port
        assert echoscu(port, tls=["+tla", "+cf", str(certs.ca)]).returncode != 0  # no client certificate
        assert echoscu(port, tls=_tls(certs.rogue_key, certs.rogue_cert, certs.ca)).returncode != 0
        # the modality does not trust a node certificate from another CA either
        assert echoscu(port, tls=_tls(certs.client_key, certs.client_cert, certs.rogue_cert)).returncode != 0
        paths = write_series(tmp_path / "in", "tls", "s1", 3)
        sent = storescu(port, paths, tls=client)  # dcmtk's dcmsend has no TLS; storescu does
        assert sent.returncode == 0, sent.stderr
        assert len(spool.ledger.all_instances()) == 3
    finally:
        receiver.stop()
        spool.close()


# ------------------------------------------------------------------- dicomnode serve end to end (slow)
@pytest.mark.slow
@pytest.mark.parametrize("processes", [1, 2])
def test_serve_tls_in_and_out(certs: Certs, tmp_path: Path, processes: int) -> None:
    """TLS modality -> node (client certificates required) -> TLS PACS, with AE checks on top; the same
    with two receiving processes on the port (node.receive_processes)."""
    require_tools("echoscu", "storescu", "storescp")
    from reliability import LedgerView, NodeProcess, node_config, pacs_sources, wait_until

    with StoreSCP(tmp_path / "pacs", certs=certs) as pacs:
        cfg = node_config(
            tmp_path / "var", free_port(),
            {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port,
                      "tls": {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}}},
            node={"series_quiet_seconds": 1.0, "allowed_calling_aets": ["MODALITY"], "receive_processes": processes,
                  "tls": {"cert": str(certs.server_cert), "key": str(certs.server_key), "ca": str(certs.ca),
                          "require_client_cert": True}})
        ledger = LedgerView(tmp_path / "var")
        with NodeProcess(tmp_path, cfg) as node:
            client = _tls(certs.client_key, certs.client_cert, certs.ca)
            assert echoscu(node.port, tls=client).returncode == 0
            assert echoscu(node.port).returncode != 0  # plain TCP
            assert echoscu(node.port, tls=["+tla", "+cf", str(certs.ca)]).returncode != 0  # no client cert
            assert echoscu(node.port, aet="INTRUDER", tls=client).returncode != 0  # TLS, but a stranger's AE
            paths = write_series(tmp_path / "in", "tls-e2e", "s1", 3)
            sent = storescu(node.port, paths, tls=client)
            assert sent.returncode == 0, sent.stderr
            wait_until(lambda: ledger.settled() and ledger.deliveries().get("sent") == 3, 60, 0.2, "TLS delivery")
    sources = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in paths}
    assert pacs_sources(tmp_path / "pacs") == sources


@pytest.mark.slow
def test_serve_refuses_a_bad_tls_setup(certs: Certs, tmp_path: Path) -> None:
    from reliability import NodeProcess, node_config

    cfg = node_config(tmp_path / "var", free_port(), {"out": {"folder": str(tmp_path / "out")}},
                      node={"tls": {"cert": str(certs.server_cert), "key": str(certs.client_key)}})  # wrong key
    node = NodeProcess(tmp_path, cfg)
    with pytest.raises(RuntimeError, match="exited"):
        node.start(timeout=60)
    assert "cannot load certificate" in node.stderr()
