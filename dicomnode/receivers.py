"""Receiving in several processes on one port (``node.receive_processes`` > 1).

One Python process answers C-STOREs one at a time per GIL: pynetdicom decodes PDUs in Python, so a
second association mostly waits for the first. Here ``N`` child processes each run the same
:class:`~dicomnode.receive.Receiver` on the same port (``SO_REUSEPORT``: the kernel spreads new
connections across them) and write the same spool and ledger (SQLite WAL, ``BEGIN IMMEDIATE``
transactions, so two processes filing instances of one series still make one job). The promise is
unchanged: Success only after the file is fsynced in its job folder and its ledger row is committed.

The parent (the node process: assembler, workers, dispatch) keeps a bound, non-listening socket on
the port so it cannot be taken while children restart, and supervises the children:

* each child reports ``ready`` (or why it could not listen) before :meth:`ProcessReceivers.start` returns;
* a child that dies is logged and started again; its open associations were cut (the senders retry:
  nothing they were told was stored is lost, since Success comes after the commit);
* its store counts, byte counts and disk state come back over a pipe twice a second, for the metrics;
* at stop, every child stops accepting, drains its associations for the remaining time and exits.

Limits (``max_associations``, ``max_connections_per_peer``) apply in each process to its own
connections. Children are started with ``spawn``: a fork of the threaded node process could inherit
locks held by other threads.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any

from dicomnode.config import NodeConfig
from dicomnode.netconfig import configure
from dicomnode.observe import Observer
from dicomnode.receive import Receiver
from dicomnode.spool import Spool

log = logging.getLogger(__name__)

__all__ = ["ProcessReceivers", "reserve_port"]

REPORT_SECONDS = 0.5  # how often a child sends its counts
READY_TIMEOUT = 60.0  # a child that has not listened by then is a failed start
EXIT_DRAIN_ABORTED = 3  # child exit code: associations were still open at the end of its drain


def reserve_port(host: str, port: int) -> socket.socket:
    """Bind (never listen on) ``host:port`` with SO_REUSEPORT; port 0 picks one that every child then shares."""
    if not hasattr(socket, "SO_REUSEPORT"):
        raise OSError("node.receive_processes > 1 needs SO_REUSEPORT (Linux, BSD, macOS)")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


class _Counts(Observer):
    """A child's observer: collects what happened since the last report."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._stored: list[tuple[int, float]] = []
        self._bytes = 0

    def stored(self, status: int, seconds: float) -> None:
        with self._lock:
            self._stored.append((status, seconds))

    def received_bytes(self, count: int) -> None:
        with self._lock:
            self._bytes += count

    def take(self) -> tuple[list[tuple[int, float]], int]:
        with self._lock:
            stored, self._stored = self._stored, []
            count, self._bytes = self._bytes, 0
        return stored, count


def child_main(config: NodeConfig, port: int, index: int, conn: Connection, setup_logging: Callable[[NodeConfig], None] | None,
               observe: bool) -> None:
    """One receiving process: listen, report, and on ``("drain", seconds)`` (or the parent gone) drain and exit."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C and SIGTERM reach the parent, which drains us in order
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    if setup_logging is not None:
        setup_logging(config)
    threading.current_thread().name = f"receive-{index}"
    spool = Spool(config.storage.root)
    configure(spool.chunks)
    receiver = Receiver(spool, config.node.model_copy(update={"port": port}), config.storage, reuse_port=True)
    counts = _Counts()
    if observe:
        receiver.observer = counts
    try:
        receiver.start()
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        spool.close()
        os._exit(1)
    conn.send(("ready", os.getpid()))
    drain_for = 30.0
    reported_full = False
    while True:
        try:
            if conn.poll(REPORT_SECONDS):
                message = conn.recv()
                if message[0] == "drain":
                    drain_for = float(message[1])
                    break
            stored, nbytes = counts.take()
            if stored or nbytes or receiver.disk_full != reported_full:  # an idle child stays quiet
                reported_full = receiver.disk_full
                conn.send(("counts", stored, nbytes, reported_full))
        except (EOFError, OSError):  # the parent is gone: finish what is open and leave
            break
    receiver.stop_accepting()
    clean = receiver.drain(drain_for)
    stored, nbytes = counts.take()
    try:
        conn.send(("counts", stored, nbytes, receiver.disk_full))
    except OSError:
        pass
    receiver.shutdown()
    spool.close()
    logging.shutdown()
    os._exit(0 if clean else EXIT_DRAIN_ABORTED)  # pynetdicom's non-daemon threads must not keep us alive


@dataclass(eq=False)
class _Child:
    index: int
    process: Any  # multiprocessing.Process (spawn context)
    conn: Connection
    disk_full: bool = False
    stopping: bool = False
    restarts: list[float] = field(default_factory=list)


class ProcessReceivers:
    """``count`` receiving processes on one port, with the interface of :class:`~dicomnode.receive.Receiver`
    that the server uses (``start``, ``port``, ``listening``, ``disk_full``, ``stop_accepting``, ``drain``,
    ``shutdown``)."""

    def __init__(self, config: NodeConfig, count: int, *, observer: Observer | None = None,
                 setup_logging: Callable[[NodeConfig], None] | None = None) -> None:
        if count < 2:
            raise ValueError("ProcessReceivers is for 2 or more processes; 1 runs the Receiver in the node process")
        self.config = config
        self.count = count
        self.observer = observer
        self.setup_logging = setup_logging
        self._ctx = multiprocessing.get_context("spawn")
        self._reserved: socket.socket | None = None
        self._children: list[_Child] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._monitor: threading.Thread | None = None

    @property
    def port(self) -> int:
        if self._reserved is None:
            return self.config.node.port
        return int(self._reserved.getsockname()[1])

    @property
    def listening(self) -> bool:
        with self._lock:
            return bool(self._children) and all(c.process.is_alive() and not c.stopping for c in self._children)

    @property
    def disk_full(self) -> bool:
        with self._lock:
            return any(c.disk_full for c in self._children)

    def pids(self) -> list[int]:
        with self._lock:
            return [int(c.process.pid) for c in self._children if c.process.pid is not None]

    # -- life cycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """Start every child (in parallel) and return once all listen; any failure stops the others and raises OSError."""
        self._reserved = reserve_port(self.config.node.host, self.config.node.port)
        launched: list[tuple[int, Any, Connection]] = []
        try:
            for index in range(1, self.count + 1):  # appended one by one: a failed launch still stops the earlier ones
                launched.append(self._launch(index))
            self._children = [self._await_ready(*item) for item in launched]
        except BaseException:
            for _, process, _conn in launched:
                if process.is_alive():
                    process.kill()
                    process.join(5.0)
            self._reserved.close()
            self._reserved = None
            raise
        log.info("listening as %s on %s:%d in %d receiving processes (pids %s)", self.config.node.ae_title,
                 self.config.node.host, self.port, self.count, ", ".join(map(str, self.pids())))
        self._monitor = threading.Thread(target=self._supervise, name="receive-supervisor", daemon=True)
        self._monitor.start()

    def _launch(self, index: int) -> tuple[int, Any, Connection]:
        parent, child = self._ctx.Pipe()
        process = self._ctx.Process(
            target=child_main, name=f"dicomnode-receive-{index}", daemon=False,
            args=(self.config, self.port, index, child, self.setup_logging, self.observer is not None),
        )
        process.start()
        child.close()
        return index, process, parent

    def _await_ready(self, index: int, process: Any, parent: Connection) -> _Child:
        deadline = time.monotonic() + READY_TIMEOUT
        while time.monotonic() < deadline:
            if parent.poll(0.2):
                try:
                    message = parent.recv()
                except EOFError:
                    break
                if message[0] == "ready":
                    return _Child(index, process, parent)
                process.join(5.0)
                parent.close()
                raise OSError(f"receiving process {index} could not listen on port {self.port}: {message[1]}")
            if not process.is_alive():
                break
        process.kill()
        process.join(5.0)
        parent.close()
        raise OSError(f"receiving process {index} did not start listening on port {self.port} "
                      f"(exit code {process.exitcode})")

    def _spawn(self, index: int) -> _Child:
        return self._await_ready(*self._launch(index))

    def _supervise(self) -> None:
        """Forward counts to the observer; start a child again when it dies unexpectedly."""
        while not self._stop.is_set():
            with self._lock:
                conns = {c.conn: c for c in self._children}
            ready = wait(list(conns), timeout=REPORT_SECONDS)
            for conn in ready:
                child = conns[conn]  # type: ignore[index]
                try:
                    message = conn.recv()  # type: ignore[union-attr]
                except (EOFError, OSError):
                    self._lost(child)
                    continue
                self._report(child, message)

    def _report(self, child: _Child, message: tuple) -> None:
        if message[0] != "counts":
            return
        _, stored, nbytes, disk_full = message
        child.disk_full = bool(disk_full)
        if self.observer is not None:
            for status, seconds in stored:
                self.observer.stored(status, seconds)
            if nbytes:
                self.observer.received_bytes(nbytes)

    def _lost(self, child: _Child) -> None:
        child.process.join(5.0)
        if child.stopping or self._stop.is_set():
            return
        log.error("receiving process %d (pid %s) ended with exit code %s; starting it again (its open associations were "
                  "cut; their senders retry what was not acknowledged)", child.index, child.process.pid, child.process.exitcode)
        now = time.monotonic()
        child.restarts = [t for t in child.restarts if now - t < 60.0] + [now]
        if len(child.restarts) > 5:  # crashing in a loop: back off rather than spin
            self._stop.wait(5.0)
        try:
            fresh = self._spawn(child.index)
        except OSError as exc:
            log.error("%s; retrying in 5 s", exc)
            self._stop.wait(5.0)
            fresh = _Child(child.index, child.process, child.conn)  # keep the slot; next pass tries again
            fresh.conn = _dead_conn(self._ctx)
        fresh.restarts = child.restarts
        with self._lock:
            self._children = [fresh if c is child else c for c in self._children]
        child.conn.close()

    def stop_accepting(self) -> None:
        """Tell every child to stop accepting and drain (the drain's length is given by :meth:`drain`)."""
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5.0)

    def drain(self, timeout: float) -> bool:
        """Children drain their open associations for up to ``timeout`` s and exit; False if any aborted one."""
        with self._lock:
            children = list(self._children)
        for child in children:
            child.stopping = True
            try:
                child.conn.send(("drain", max(0.0, timeout - 1.0)))
            except OSError:
                pass
        deadline = time.monotonic() + timeout + 5.0
        clean = True
        for child in children:
            while child.process.is_alive() and time.monotonic() < deadline:
                if child.conn.poll(0.2):
                    try:
                        self._report(child, child.conn.recv())
                    except (EOFError, OSError):
                        child.process.join(max(0.0, deadline - time.monotonic()))
            child.process.join(max(0.0, deadline - time.monotonic()))
            if child.process.is_alive():
                log.error("receiving process %d did not exit after its drain; killing it", child.index)
                child.process.kill()
                child.process.join(5.0)
                clean = False
            elif child.process.exitcode != 0:
                clean = False
        return clean

    def shutdown(self) -> None:
        self._kill_all()
        with self._lock:
            for child in self._children:
                child.conn.close()
            self._children = []
        if self._reserved is not None:
            self._reserved.close()
            self._reserved = None

    def _kill_all(self) -> None:
        for child in self._children:
            if child.process.is_alive():
                child.process.kill()
                child.process.join(5.0)


def _dead_conn(ctx: Any) -> Connection:
    """A pipe end whose peer is closed: the supervisor sees EOF at once and retries the start."""
    a, b = ctx.Pipe()
    b.close()
    return a
