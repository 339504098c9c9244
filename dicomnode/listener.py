"""The listening socket: who may connect, for how long, and how much a peer can make the node hold.

pynetdicom's own server gives an attacker three levers, each closed here and nothing else changed:

* It performs the TLS handshake inside its single accept thread on a blocking socket, so one silent
  TCP connection to the TLS port stops every other peer. Here ``accept`` returns plain sockets and the
  handshake runs in the connection's own thread, bounded by ``association_request_timeout_seconds``.
* A connection counts against ``maximum_associations`` from the moment it is accepted, so a few idle
  sockets lock out every sender ("Local Limit Exceeded"). Here a connection has
  ``association_request_timeout_seconds`` from accept (TLS handshake included) to send its
  A-ASSOCIATE-RQ or it is closed; only requested associations count against ``max_associations``;
  one IP address may hold at most ``max_connections_per_peer`` connections, and at most
  :data:`MAX_PENDING_CONNECTIONS` connections may wait for their request at once (more are closed at accept).
* It buffers a PDU of whatever length its 6-byte header declares (4 GB from anyone, before any
  authentication). Here every header is checked before its body is read (:class:`PduGuard`): a length
  above :func:`pdu_limit` or P-DATA beyond ``max_object_bytes`` in one message aborts the association,
  and the partial object pynetdicom was streaming to disk is removed.
"""

from __future__ import annotations

import logging
import socket
import ssl
import struct
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import AssociationSocket, RequestHandler, ThreadedAssociationServer

log = logging.getLogger(__name__)

__all__ = ["MAX_PENDING_CONNECTIONS", "Limits", "NodeServer", "PduGuard", "RefusalLog", "admission_refusal", "pdu_limit",
           "start_server"]

MAX_PENDING_CONNECTIONS = 64  # accepted connections that have not sent an A-ASSOCIATE-RQ yet, all peers together
MIN_PDU_LIMIT = 256 * 1024  # an A-ASSOCIATE-RQ proposing 128 contexts x every transfer syntax stays below this
PDU_SLACK = 1024  # for peers that count a header in their fragment size
MESSAGE_OVERHEAD = 64 * 1024  # command set and PDV headers on top of an object's own bytes
REFUSAL_LOG_SECONDS = 10.0  # one log line per peer and reason in this time, so a flood cannot flood the log

_HEADER = struct.Struct(">BBL")
_P_DATA = 0x04
_A_ABORT = 0x07


def pdu_limit(max_pdu_size: int, max_object_bytes: int) -> int:
    """The largest PDU length the node reads from a peer; a header declaring more aborts the association.

    ``max_pdu_size`` is what the node announces (the peer must not send longer P-DATA); other PDUs (an
    A-ASSOCIATE-RQ) are allowed :data:`MIN_PDU_LIMIT`. With 0 (no announced limit) a PDU may hold a
    whole object, so it is bounded by ``max_object_bytes``.
    """
    if max_pdu_size == 0:
        return max_object_bytes + MESSAGE_OVERHEAD
    return max(max_pdu_size, MIN_PDU_LIMIT) + PDU_SLACK


@dataclass(frozen=True)
class Limits:
    """The listener's policy, from ``node.*`` settings."""

    max_associations: int
    per_peer: int
    request_timeout: float  # seconds from accept to the A-ASSOCIATE-RQ, TLS handshake included
    max_pdu: int  # pdu_limit()
    max_message: int  # P-DATA bytes of one DIMSE message: max_object_bytes + MESSAGE_OVERHEAD
    network_timeout: float | None = 60.0  # a socket read or write stalled this long ends the association

    @classmethod
    def from_settings(cls, node: Any, network_timeout: float | None = 60.0) -> Limits:
        return cls(max_associations=int(node.max_associations), per_peer=int(node.max_connections_per_peer),
                   request_timeout=float(node.association_request_timeout_seconds),
                   max_pdu=pdu_limit(int(node.max_pdu_size), int(node.max_object_bytes)),
                   max_message=int(node.max_object_bytes) + MESSAGE_OVERHEAD, network_timeout=network_timeout)


class PduGuard:
    """Checks each PDU header a peer sends before its body is read; one per connection.

    A DIMSE message (command + dataset) arrives as P-DATA until the node answers it, so the P-DATA
    bytes received since the node last sent P-DATA are the size of the message in flight (pynetdicom
    negotiates no asynchronous operations: a peer waits for each response).
    """

    def __init__(self, max_pdu: int, max_message: int) -> None:
        self.max_pdu = max_pdu
        self.max_message = max_message
        self.message_bytes = 0

    def check_header(self, header: bytes) -> str | None:
        """None when the PDU may be read, else the reason to abort."""
        pdu_type, _reserved, length = _HEADER.unpack(header)
        if length > self.max_pdu:
            return f"PDU type 0x{pdu_type:02X} declares {length} bytes, above the limit of {self.max_pdu} (node.max_pdu_size)"
        if pdu_type == _P_DATA:
            self.message_bytes += length
            if self.message_bytes > self.max_message:
                return (f"object in transfer passed {self.message_bytes} bytes, above the limit of "
                        f"{_size(self.max_message - MESSAGE_OVERHEAD)} (node.max_object_bytes)")
        return None

    def sent(self, pdu: bytes) -> None:
        """The node sent ``pdu``: P-DATA from us answers the message, the next one starts from zero."""
        if pdu[:1] == bytes([_P_DATA]):
            self.message_bytes = 0


def _size(n: int) -> str:
    return f"{n / 2**20:g} MiB" if n % 2**20 == 0 else f"{n} bytes"


def _abort_pdu(source: int, reason: int) -> bytes:
    return _HEADER.pack(_A_ABORT, 0, 4) + bytes([0, 0, source, reason])


class GuardedSocket(AssociationSocket):
    """pynetdicom's socket with a :class:`PduGuard` between the wire and the DUL's PDU reader.

    The DUL reads a PDU as ``recv(6)`` (the header) then ``recv(length)``; headers are followed through
    the byte stream whatever the read sizes. A refused header is answered with an A-ABORT to the peer,
    and pynetdicom is handed that same A-ABORT in place of the header, so its state machine ends the
    association by its normal abort path (closing the socket) without reading the body.
    """

    guard: PduGuard | None = None
    peer: str = "?"
    refused: str | None = None
    _header: bytearray | None = None
    _body_left: int = 0
    _replay: bytearray | None = None

    def arm(self, guard: PduGuard, peer: str) -> None:
        self.guard, self.peer, self._header, self._body_left = guard, peer, bytearray(), 0

    def recv(self, nr_bytes: int) -> bytearray:
        if self._replay is not None:  # the A-ABORT handed to pynetdicom in place of a refused PDU
            out, self._replay = self._replay[:nr_bytes], self._replay[nr_bytes:] or None
            return out
        if self.refused is not None:
            return bytearray()
        data = super().recv(nr_bytes)
        if self.guard is None or self._header is None:
            return data
        pos = 0
        while pos < len(data):
            if self._body_left:
                step = min(self._body_left, len(data) - pos)
                self._body_left -= step
                pos += step
                continue
            step = min(6 - len(self._header), len(data) - pos)
            self._header += data[pos:pos + step]
            pos += step
            if len(self._header) < 6:
                continue
            header, self._header = bytes(self._header), bytearray()
            reason = self.guard.check_header(header)
            if reason is None:
                self._body_left = _HEADER.unpack(header)[2]
                continue
            self._refuse(reason)
            if len(data) == 6 and nr_bytes == 6:  # the DUL asked for exactly this header: hand it the A-ABORT
                self._replay = bytearray(_abort_pdu(source=2, reason=0))
                out, self._replay = self._replay[:6], self._replay[6:]
                return out
            self._shutdown_socket()  # mid-read: pynetdicom sees the connection close
            return bytearray()
        return data

    def send(self, bytestream: bytes) -> None:
        if self.guard is not None:
            self.guard.sent(bytestream)
        super().send(bytestream)

    def _refuse(self, reason: str) -> None:
        self.refused = reason
        log.warning("aborting the connection from %s: %s", self.peer, reason)
        sock = self.socket
        if sock is not None:
            try:
                sock.sendall(_abort_pdu(source=2, reason=6))  # provider, invalid PDU parameter value
            except OSError:
                pass


def admission_refusal(same_peer: int, pending: int, limits: Limits) -> str | None:
    """Why a just-accepted connection is closed at once (None: admitted), given the connections already open
    from its address and those of all peers still waiting for their A-ASSOCIATE-RQ. Both engines use it."""
    if same_peer >= limits.per_peer:
        return f"{same_peer} connections open from this address (node.max_connections_per_peer)"
    if pending >= MAX_PENDING_CONNECTIONS:
        return f"{pending} connections waiting for their association request (all peers)"
    return None


class RefusalLog:
    """Logs a refused connection once per peer and reason in :data:`REFUSAL_LOG_SECONDS`, so a flood cannot
    flood the log; to the caller's logger (each engine logs under its own name)."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._last: dict[tuple[str, str], float] = {}

    def __call__(self, host: str, reason: str) -> None:
        now = time.monotonic()
        key = (host, reason.split(" ", 1)[1])
        if now - self._last.get(key, -REFUSAL_LOG_SECONDS) >= REFUSAL_LOG_SECONDS:
            if len(self._last) > 1024:
                self._last.clear()
            self._last[key] = now
            self._log.warning("refused a connection from %s: %s", host, reason)


@dataclass(eq=False)
class _Connection:
    address: str
    deadline: float  # the A-ASSOCIATE-RQ (and the TLS handshake before it) must arrive by then
    requested: bool = False
    assoc: Any = None


class NodeServer(ThreadedAssociationServer):
    """pynetdicom's threaded server with the node's admission, timeouts and PDU guard (see the module)."""

    block_on_close = False  # shutdown() stops accepting at once; open associations end on their own (drain)
    daemon_threads = True

    def __init__(self, ae: Any, address: Any, ae_title: str, contexts: list[Any], ssl_context: Any = None,
                 evt_handlers: list[Any] | None = None, *, limits: Limits, tls: ssl.SSLContext | None = None,
                 reuse_port: bool = False) -> None:
        self.limits = limits
        self.reuse_port = reuse_port  # several receiving processes share the port (dicomnode.receivers)
        self.tls = tls
        self._lock = threading.Lock()
        self._connections: set[_Connection] = set()
        self._admitted: dict[Any, _Connection] = {}  # accepted socket -> its record, until its thread picks it up
        self._local = threading.local()
        self._log_refusal = RefusalLog(log)
        handlers = [*(evt_handlers or []), (evt.EVT_REQUESTED, self._on_requested)]
        super().__init__(ae, address, ae_title, contexts, None, evt_handlers=handlers, request_handler=_Handler)

    def server_bind(self) -> None:
        if self.reuse_port:
            assert self.socket is not None
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    # -- admission (the accept thread) ---------------------------------------------------------
    def get_request(self) -> tuple[socket.socket, Any]:
        """Accept only: the TLS handshake happens in the connection's own thread."""
        assert self.socket is not None
        return self.socket.accept()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        host = str(client_address[0])
        with self._lock:
            reason = admission_refusal(sum(1 for c in self._connections if c.address == host),
                                       sum(1 for c in self._connections if not c.requested), self.limits)
            if reason is None:
                conn = _Connection(host, time.monotonic() + self.limits.request_timeout)
                self._connections.add(conn)
                self._admitted[request] = conn
                return True
        self._log_refusal(host, reason)
        return False  # socketserver closes it

    def process_request(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self._lock:
                conn = self._admitted.pop(request, None)
                self._connections.discard(conn)  # type: ignore[arg-type]
            raise

    # -- one connection (its own thread, for its whole life) ----------------------------------
    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._lock:
            conn = self._admitted.pop(request)
        sock = request
        try:
            sock = self._handshake(request, conn)
            if sock is not None:
                sock.settimeout(self.limits.network_timeout)
                self._local.conn = conn
                self.finish_request(sock, client_address)  # returns when the association has ended
        except Exception:
            self.handle_error(request, client_address)
        finally:
            with self._lock:
                self._connections.discard(conn)
            self.shutdown_request(sock if sock is not None else request)

    def _handshake(self, sock: socket.socket, conn: _Connection) -> socket.socket | None:
        if self.tls is None:
            return sock
        sock.settimeout(max(0.1, conn.deadline - time.monotonic()))
        try:
            return self.tls.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            why = "no handshake within node.association_request_timeout_seconds" if isinstance(exc, TimeoutError) else exc
            log.warning("TLS handshake with %s failed: %s", conn.address, why)
            sock.close()
            return None

    def _on_requested(self, event: evt.Event) -> None:
        """An A-ASSOCIATE-RQ arrived: from now on the connection takes one of ``max_associations``."""
        assoc = event.assoc
        with self._lock:
            conn = next((c for c in self._connections if c.assoc is assoc), None)
            if conn is None:
                return
            busy = sum(1 for c in self._connections if c.requested)
            if busy < self.limits.max_associations:
                conn.requested = True
        if conn.requested:
            assoc.acse_timeout = self.ae.acse_timeout  # the request deadline no longer applies
            return
        log.warning("association from %s (%s) rejected: %d associations open (node.max_associations)",
                    assoc.requestor.ae_title, conn.address, busy)
        assoc.acse.send_reject(0x02, 0x03, 0x02)  # transient, presentation related, local limit exceeded
        assoc.kill()


class _Handler(RequestHandler):
    """pynetdicom's request handler, arming the PDU guard and waiting for the association to end."""

    server: NodeServer

    def handle(self) -> None:
        server = self.server
        conn: _Connection = server._local.conn
        assoc = self._create_association()
        sock = assoc.dul.socket
        sock.__class__ = GuardedSocket  # same object and state, plus the guard on recv/send
        assert isinstance(sock, GuardedSocket)
        sock.arm(PduGuard(server.limits.max_pdu, server.limits.max_message), conn.address)
        assoc.acse_timeout = max(0.5, conn.deadline - time.monotonic())  # what is left of the request deadline
        conn.assoc = assoc
        evt.trigger(assoc, evt.EVT_CONN_OPEN, {"address": self.client_address})
        assoc.start()
        assoc.join()
        if not conn.requested and sock.refused is None and time.monotonic() >= conn.deadline:
            log.info("closed the connection from %s: no association request within %g s "
                     "(node.association_request_timeout_seconds)", conn.address, server.limits.request_timeout)
        _remove_partial_object(assoc, conn.address)


def _remove_partial_object(assoc: Any, peer: str) -> None:
    """Delete the file pynetdicom was streaming an unfinished object into (an abort, a dropped connection)."""
    message = getattr(assoc.dimse, "message", None)
    handle = getattr(message, "_data_set_file", None)
    path = getattr(message, "_data_set_path", None)
    if handle is not None:
        try:
            handle.close()
        except OSError:
            pass
    if path is not None and Path(path).exists():
        Path(path).unlink(missing_ok=True)
        log.info("removed the partial object from %s (the transfer did not complete)", peer)


def start_server(ae: Any, address: tuple[str, int], *, handlers: list[Any], limits: Limits,
                 tls: ssl.SSLContext | None = None, reuse_port: bool = False) -> NodeServer:
    """Listen on ``address`` in a background thread (as ``AE.start_server(block=False)`` does);
    ``reuse_port`` lets other processes listen on the same port (SO_REUSEPORT)."""
    server = ae.make_server(address, evt_handlers=handlers, server_class=NodeServer, limits=limits, tls=tls,
                            reuse_port=reuse_port)
    thread = threading.Thread(target=server.serve_forever, name="listener", daemon=True)
    thread.start()
    ae._servers.append(server)  # as AE.start_server: AE.shutdown() and NodeServer.shutdown() find it there
    return server

