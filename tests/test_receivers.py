"""Several receiving processes on one port (node.receive_processes): a real node, real dcmtk senders,
real child processes sharing the spool and the ledger."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from test_receive import ct_series, dcmsend

from dicomnode.config import ConfigError, NodeConfig, parse_config
from dicomnode.receivers import ProcessReceivers
from dicomnode.server import Server

from conftest import require_tools
from factories import StoreCounts, config_data
from reliability import wait_until

AET = "DICOMNODE"


def _config(tmp_path: Path, port: int, processes: int = 2, engine: str = "pynetdicom") -> NodeConfig:
    data = config_data(tmp_path / "var", port, {"out": {"folder": str(tmp_path / "out")}})
    data["node"].update(receive_processes=processes, series_quiet_seconds=1.0, receive_engine=engine)
    return parse_config(data, tmp_path)


@pytest.fixture(params=["pynetdicom", "native"])
def node(tmp_path: Path, free_port: int, request: pytest.FixtureRequest) -> Iterator[tuple[Server, StoreCounts]]:
    require_tools("dcmsend", "echoscu")
    stores = StoreCounts()
    server = Server(_config(tmp_path, free_port, engine=request.param), observer=stores)
    server.start()
    try:
        yield server, stores
    finally:
        server.stop(timeout=20)


def _children(server: Server) -> ProcessReceivers:
    assert isinstance(server.receiver, ProcessReceivers)
    return server.receiver


def test_parallel_senders_into_two_processes_make_one_job_per_series_and_outputs(node, tmp_path: Path) -> None:
    server, stores = node
    receivers = _children(server)
    pids = receivers.pids()
    assert len(pids) == 2 and os.getpid() not in pids and receivers.listening
    shared = generate_uid()  # one series sent over two associations at once, as some modalities do
    batches = [ct_series(tmp_path / "a", 6, shared), ct_series(tmp_path / "b", 6, shared), ct_series(tmp_path / "c", 5)]
    outputs: list[str] = []
    threads = [threading.Thread(target=lambda files=files: outputs.append(dcmsend(server.port, *files, aec=AET)))
               for files in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [o.count("with status SUCCESS  : ") for o in outputs] == [1, 1, 1], outputs
    assert sum(int(o.split("with status SUCCESS  : ")[1].split()[0]) for o in outputs) == 17

    ledger = server.spool.ledger
    jobs = ledger.jobs()
    assert sorted(len(ledger.instances(j.id)) for j in jobs) == [5, 12]  # the shared series is one job
    for inst in ledger.all_instances():
        assert inst.path.is_file() and inst.path.parent.name.startswith("job-")
    wait_until(lambda: len(list((tmp_path / "out").rglob("*.dcm"))) == 17, 60, what="17 enhanced outputs")
    wait_until(lambda: len(stores.statuses) == 17, 5, what="the children's store counts")
    assert set(stores.statuses) == {0} and stores.bytes > 17 * 20_000


def test_a_killed_receiving_process_is_replaced_and_the_node_keeps_receiving(node, tmp_path: Path,
                                                                            caplog: pytest.LogCaptureFixture) -> None:
    server, _ = node
    receivers = _children(server)
    victim = receivers.pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(receivers.pids()) == 2 and victim not in receivers.pids(), 30, what="a new receiving process")
    assert "ended with exit code -9; starting it again" in caplog.text
    for i in range(4):  # connections reach both processes, the new one included
        out = dcmsend(server.port, *ct_series(tmp_path / f"s{i}", 2), aec=AET)
        assert "with status SUCCESS  : 2" in out, out
    assert len(server.spool.ledger.all_instances()) == 8


def test_drain_lets_an_open_association_finish_and_children_exit(node, tmp_path: Path) -> None:
    server, _ = node
    receivers = _children(server)
    pids = receivers.pids()
    files = ct_series(tmp_path / "many", 60)
    sender = subprocess.Popen(["dcmsend", "-aet", "SCANNER", "-aec", AET, "127.0.0.1", str(server.port), *map(str, files)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"})
    wait_until(lambda: len(server.spool.ledger.all_instances()) >= 5, 30, what="the transfer to start")
    assert server.stop(timeout=30)
    out = sender.communicate(timeout=30)[0]
    assert sender.returncode == 0, out
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    from dicomnode.ledger import Ledger

    assert len(Ledger(tmp_path / "var" / "ledger.sqlite3", readonly=True).all_instances()) == 60


def test_port_taken_by_another_program_is_a_clear_start_error(tmp_path: Path, free_port: int) -> None:
    other = socket.socket()
    other.bind(("127.0.0.1", free_port))
    other.listen()
    try:
        server = Server(_config(tmp_path, free_port))
        with pytest.raises(OSError, match="Address already in use"):
            server.start()
        assert not server._started
    finally:
        other.close()
    server = Server(_config(tmp_path, free_port))  # the spool lock and the port were released
    server.start()
    try:
        assert _children(server).listening
    finally:
        server.stop(timeout=10)


def test_receive_processes_is_validated(tmp_path: Path) -> None:
    data = config_data(tmp_path / "var", 11112, {"out": {"folder": str(tmp_path / "out")}})
    data["node"]["receive_processes"] = 0
    with pytest.raises(ConfigError, match="node.receive_processes"):
        parse_config(data, tmp_path)


def test_readyz_follows_the_receiving_processes(node) -> None:
    server, _ = node
    receivers = _children(server)
    assert receivers.listening and not receivers.disk_full
    t0 = time.monotonic()
    receivers.stop_accepting()
    assert receivers.drain(10.0)
    assert not receivers.listening and time.monotonic() - t0 < 15
