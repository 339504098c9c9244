"""A native DICOM upper-layer acceptor (C-ECHO and C-STORE SCP): ``node.receive_engine: native``.

Why: pynetdicom runs two threads per association that poll with 1 ms sleeps and decode every PDU
into Python objects, about 4 ms per 0.5 MB instance before anything is stored. Here one thread per
connection reads PDUs with blocking ``recv_into`` into one reused buffer and writes P-DATA fragments
straight to the object's file, so receiving costs little more than the copy to disk.

pynetdicom still does what is rare and fiddly: decoding the A-ASSOCIATE-RQ, presentation context
negotiation (the same contexts the pynetdicom engine supports) and encoding the A-ASSOCIATE-AC.
Everything on the P-DATA path (PDU and PDV headers, the command set in Implicit VR Little Endian,
the responses, the file) is here.

The promises are those of the pynetdicom engine (:mod:`dicomnode.listener`, :mod:`dicomnode.receive`):
the same admission limits and log reasons, :class:`~dicomnode.listener.PduGuard` on every PDU header,
the TLS handshake in the connection's thread within ``association_request_timeout_seconds``, the same
landed file (preamble, File Meta Information as pynetdicom writes it, the data set as received), and
a partial object removed when a transfer does not complete. What happens to a landed object (checks,
quarantine, spool, ledger, the status) is the caller's ``store`` callable, shared by both engines.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu import A_ASSOCIATE_AC, A_ASSOCIATE_RQ
from pynetdicom.pdu_primitives import (
    A_ASSOCIATE,
    AsynchronousOperationsWindowNegotiation,
    ImplementationClassUIDNotification,
    ImplementationVersionNameNotification,
    MaximumLengthNotification,
    SCP_SCU_RoleSelectionNegotiation,
)
from pynetdicom.presentation import PresentationContext, negotiate_as_acceptor

from dicomnode.config import NodeSettings
from dicomnode.durable import FILE_MODE, start_writeback
from dicomnode.listener import Limits, PduGuard, RefusalLog, admission_refusal
from dicomnode.observe import Observer
from dicomnode.part10 import SCAN_BYTES

log = logging.getLogger(__name__)

__all__ = ["Store", "UpperServer", "file_meta", "rejection_reason"]

Store = Callable[[Path, str, str, str, bytearray], int]
"""(landed file, calling AE title, command SOP Class UID, command SOP Instance UID, the file's first
:data:`~dicomnode.part10.SCAN_BYTES` bytes) -> DIMSE status. The landed file is complete and closed but
not fsynced: ``store`` makes it durable where it keeps it (one sync in its final folder instead of one
here and one there). On Success the landed file has been moved away (into the spool); on any other
status the engine removes whatever is left of it."""

_HEADER = struct.Struct(">BBL")
_PDV = struct.Struct(">LBB")
_ELEMENT = struct.Struct("<HHL")
_US = struct.Struct("<H")

A_ASSOCIATE_RQ_TYPE, A_ASSOCIATE_RJ_TYPE, P_DATA_TYPE, A_RELEASE_RQ_TYPE, A_RELEASE_RP_TYPE, A_ABORT_TYPE = 1, 3, 4, 5, 6, 7
C_STORE_RQ, C_ECHO_RQ, C_CANCEL_RQ = 0x0001, 0x0030, 0x0FFF
NO_DATA_SET = 0x0101
STATUS_SUCCESS = 0x0000
STATUS_UNRECOGNISED_OPERATION = 0x0211
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_CANNOT_UNDERSTAND = 0xC210
MAX_COMMAND_BYTES = 64 * 1024  # a command set is a few hundred bytes; more is not a DICOM peer
WRITEBACK_BYTES = 256 * 1024  # an arriving object's bytes are sent to the disk in steps of this (see _write)
_PREAMBLE = b"\0" * 128 + b"DICM"
_IMPLEMENTATION_UID = str(PYNETDICOM_IMPLEMENTATION_UID)
_IMPLEMENTATION_VERSION = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii") + b" " * (len(PYNETDICOM_IMPLEMENTATION_VERSION) % 2)


def rejection_reason(settings: NodeSettings, calling: str, called: str, active: int = 0) -> str:
    """Why an association was rejected, in the order pynetdicom checks: the called AE title (ours), the calling
    AE title (``node.allowed_calling_aets``), then the association limit."""
    reasons = []
    if settings.require_called_aet and called != settings.ae_title.strip():
        reasons.append(f"called AE {called!r} is not ours ({settings.ae_title!r}; node.require_called_aet)")
    if settings.allowed_calling_aets and calling not in [a.strip() for a in settings.allowed_calling_aets]:
        reasons.append(f"calling AE {calling!r} is not in node.allowed_calling_aets")
    if not reasons:
        reasons.append(f"calling AE {calling!r}, called AE {called!r}: too many associations ({active} open) "
                       "or a negotiation the node does not support")
    return "; ".join(reasons)


class _Abort(Exception):
    """End the association with an A-ABORT (source 2, service provider) and log why."""

    def __init__(self, why: str, reason: int = 0) -> None:
        super().__init__(why)
        self.reason = reason  # 0 not specified, 1 unrecognised PDU, 2 unexpected PDU, 6 invalid parameter value


def _abort_pdu(source: int, reason: int) -> bytes:
    return _HEADER.pack(A_ABORT_TYPE, 0, 4) + bytes([0, 0, source, reason])


def _element(element: int, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0"
    return _ELEMENT.pack(0x0000, element, len(value)) + value


def response(field: int, message_id: int, status: int, sop_class: str = "", sop_instance: str = "") -> bytes:
    """An encoded response command set (group 0000, Implicit VR Little Endian, elements in tag order)."""
    body = b"".join([
        *([_element(0x0002, sop_class.encode("ascii"))] if sop_class else []),
        _element(0x0100, _US.pack(field)), _element(0x0120, _US.pack(message_id)),
        _element(0x0800, _US.pack(NO_DATA_SET)), _element(0x0900, _US.pack(status)),
        *([_element(0x1000, sop_instance.encode("ascii"))] if sop_instance else []),
    ])
    return _element(0x0000, struct.pack("<L", len(body))) + body


def parse_command(data: bytes | bytearray) -> dict[int, bytes]:
    """The elements of a command set by element number; ValueError when it is not one."""
    out: dict[int, bytes] = {}
    pos, end = 0, len(data)
    while pos < end:
        if end - pos < 8:
            raise ValueError("command set ends inside an element header")
        group, element, length = _ELEMENT.unpack_from(data, pos)
        pos += 8
        if group != 0x0000 or pos + length > end:
            raise ValueError(f"command set element ({group:04X},{element:04X}) is not a command element or overruns")
        out[element] = bytes(data[pos:pos + length])
        pos += length
    return out


_META_UID = re.compile(r"[0-9.]{1,64}")


def _meta_element(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH2sH", 0x0002, element, vr, len(value)) + value


def file_meta(sop_class: str, sop_instance: str, transfer_syntax: str) -> bytes:
    """Preamble, "DICM" and the File Meta Information pynetdicom writes for a received data set, same bytes.

    Why: pydicom's ``create_file_meta`` + ``write_file_meta_info`` cost 0.3-0.4 ms of CPU per instance, a
    fifth of the native engine's; encoding these seven elements by hand costs microseconds. UIDs that are
    not plain (digits and dots, 1-64 characters) go through pydicom, whose bytes are the reference.
    """
    if not all(_META_UID.fullmatch(uid) for uid in (sop_class, sop_instance, transfer_syntax)):
        meta = BytesIO()
        meta.write(_PREAMBLE)
        write_file_meta_info(meta, create_file_meta(  # type: ignore[arg-type]
            sop_class_uid=UID(sop_class), sop_instance_uid=UID(sop_instance), transfer_syntax=UID(transfer_syntax)))
        return meta.getvalue()
    body = b"".join([
        struct.pack("<HH2sHL", 0x0002, 0x0001, b"OB", 0, 2) + b"\0\1",
        *(_meta_element(element, b"UI", uid.encode("ascii") + b"\0" * (len(uid) % 2)) for element, uid in (
            (0x0002, sop_class), (0x0003, sop_instance), (0x0010, transfer_syntax), (0x0012, _IMPLEMENTATION_UID))),
        _meta_element(0x0013, b"SH", _IMPLEMENTATION_VERSION),
    ])
    return _PREAMBLE + _meta_element(0x0000, b"UL", struct.pack("<L", len(body))) + body


def _us(command: dict[int, bytes], element: int) -> int | None:
    value = command.get(element)
    return _US.unpack(value)[0] if value is not None and len(value) == 2 else None


def _ui(command: dict[int, bytes], element: int) -> str:
    return command.get(element, b"").rstrip(b"\0 ").decode("ascii", errors="replace")


@dataclass
class _Message:
    """The DIMSE request in flight: its command and, for a C-STORE, the file its data set goes to."""

    context_id: int
    field: int
    message_id: int
    sop_class: str
    sop_instance: str
    path: Path | None = None
    file: Any = None  # an unbuffered binary file while the data set arrives
    head: bytearray = field(default_factory=bytearray)  # the file's first SCAN_BYTES: its UIDs are read from here
    write_failed: bool = False  # the disk refused a write: the rest is read and dropped, the answer is 0xA700
    written: int = 0  # bytes written to ``file``
    flushed: int = 0  # bytes of them whose write-out to the disk has been started


class UpperServer:
    """Listens and serves each connection in its own thread; ``shutdown`` stops accepting, ``drain`` ends."""

    def __init__(self, settings: NodeSettings, contexts: Sequence[PresentationContext], *, store: Store,
                 temp_path: Callable[[], Path], observer: Observer | None = None, tls: ssl.SSLContext | None = None,
                 reuse_port: bool = False, network_timeout: float = 60.0) -> None:
        self.settings = settings
        self.contexts = list(contexts)
        self.store = store
        self.temp_path = temp_path
        self.observer = observer
        self.tls = tls
        self.limits = Limits.from_settings(settings, network_timeout=network_timeout)
        self._cond = threading.Condition()
        self._connections: set[_Association] = set()
        self._log_refusal = RefusalLog(log)
        self._closed = False
        self.socket = socket.socket(socket.AF_INET6 if ":" in settings.host else socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        try:
            self.socket.bind((settings.host, settings.port))
            self.socket.listen(128)
        except OSError:
            self.socket.close()
            raise
        self.server_address = self.socket.getsockname()
        self._thread = threading.Thread(target=self._accept_forever, name="listener", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- accepting ---------------------------------------------------------------------------
    def _accept_forever(self) -> None:
        while not self._closed:
            try:
                sock, address = self.socket.accept()
            except OSError as exc:
                if self._closed:
                    return
                log.error("accept failed: %s", exc)  # out of file descriptors: wait for some to close
                with self._cond:
                    self._cond.wait(0.1)
                continue
            host = str(address[0])
            with self._cond:
                reason = admission_refusal(sum(1 for c in self._connections if c.host == host),
                                           sum(1 for c in self._connections if not c.requested), self.limits)
                if reason is None:
                    assoc = _Association(self, sock, host, int(address[1]))
                    self._connections.add(assoc)
            if reason is not None:
                self._log_refusal(host, reason)
                sock.close()
                continue
            try:
                threading.Thread(target=assoc.run, name=f"association-{host}", daemon=True).start()
            except RuntimeError as exc:  # no more threads: this peer is refused, the node keeps serving
                log.error("cannot serve the connection from %s: %s", host, exc)
                sock.close()
                self.ended(assoc)

    def request(self, assoc: _Association) -> int | None:
        """An A-ASSOCIATE-RQ arrived: take one of ``max_associations``; None when taken, else how many are open."""
        with self._cond:
            busy = sum(1 for c in self._connections if c.requested)
            if busy >= self.limits.max_associations:
                return busy
            assoc.requested = True
            return None

    def ended(self, assoc: _Association) -> None:
        with self._cond:
            self._connections.discard(assoc)
            self._cond.notify_all()

    # -- stopping ----------------------------------------------------------------------------
    def shutdown(self) -> None:
        """Stop accepting (close the listening socket); open associations run to their end."""
        if self._closed:
            return
        self._closed = True
        try:
            self.socket.shutdown(socket.SHUT_RDWR)  # wakes the accept() blocked in the listener thread
        except OSError:
            pass
        self.socket.close()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(5)

    def drain(self, timeout: float, negotiation_grace: float = 1.0) -> bool:
        """Wait up to ``timeout`` s for established associations (connections still negotiating only for
        ``negotiation_grace`` s); abort what is left. False when an established association was aborted."""
        start = time.monotonic()
        deadline = start + timeout
        with self._cond:
            while True:
                now = time.monotonic()
                grace = now - start < negotiation_grace
                if now >= deadline or not [c for c in self._connections if c.established or grace]:
                    break
                self._cond.wait(max(0.01, (min(deadline, start + negotiation_grace) if grace else deadline) - now))
            left = list(self._connections)
        established = [c for c in left if c.established]
        for assoc in left:
            assoc.abort()
        with self._cond:  # let their threads remove partial objects before the caller goes on
            end = time.monotonic() + 2.0
            while self._connections and time.monotonic() < end:
                self._cond.wait(0.1)
        return not established

    @property
    def active(self) -> int:
        with self._cond:
            return len(self._connections)


class _Association:
    """One connection, served in its own thread from accept to close."""

    def __init__(self, server: UpperServer, sock: socket.socket, host: str, port: int) -> None:
        self.server = server
        self.sock: socket.socket = sock
        self.host, self.port = host, port
        self.deadline = time.monotonic() + server.limits.request_timeout  # TLS handshake + A-ASSOCIATE-RQ
        self.requested = False
        self.established = False
        self.calling = ""
        self.contexts: dict[int, str] = {}  # accepted context ID -> its transfer syntax
        self.guard = PduGuard(server.limits.max_pdu, server.limits.max_message)
        self._header = bytearray(6)
        self._buffer = bytearray(64 * 1024)  # grows to the largest PDU read (bounded by the guard)
        self._command = bytearray()
        self._message: _Message | None = None
        self._send_lock = threading.Lock()
        self._aborted = False

    # -- the connection's life -------------------------------------------------------------
    def run(self) -> None:
        try:
            self._run()
        except _Abort as exc:
            log.warning("aborting the connection from %s: %s", self.host, exc)
            self._send(_abort_pdu(source=2, reason=exc.reason))
        except TimeoutError:
            if not self.requested:
                log.info("closed the connection from %s: no association request within %g s "
                         "(node.association_request_timeout_seconds)", self.host, self.server.limits.request_timeout)
            else:
                log.warning("association from %s timed out after %g s without data", self.host,
                            self.server.limits.network_timeout or 0)
        except (ConnectionError, OSError) as exc:
            if self.established and not self._aborted:
                log.warning("connection from %s (%s) dropped: %s", self.calling, self.host, exc)
        except Exception:  # a bug must end this association only, never the node
            log.exception("association from %s failed", self.host)
            self._send(_abort_pdu(source=2, reason=0))
        finally:
            self.established = False
            self._discard_partial()
            try:
                self.sock.close()
            except OSError:
                pass
            self.server.ended(self)

    def _run(self) -> None:
        server = self.server
        if server.tls is not None:
            self.sock.settimeout(max(0.1, self.deadline - time.monotonic()))
            try:
                self.sock = server.tls.wrap_socket(self.sock, server_side=True)
            except (ssl.SSLError, OSError) as exc:
                why = "no handshake within node.association_request_timeout_seconds" if isinstance(exc, TimeoutError) else exc
                log.warning("TLS handshake with %s failed: %s", self.host, why)
                return
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        pdu_type, body = self._read_pdu(self.deadline)  # a peer trickling bytes gets no more time
        if pdu_type != A_ASSOCIATE_RQ_TYPE:
            raise _Abort(f"PDU type 0x{pdu_type:02X} before an A-ASSOCIATE-RQ", reason=2)
        if not self._associate(bytes(self._header) + bytes(body)):
            return
        _set_network_timeout(self.sock, server.limits.network_timeout)
        while True:
            pdu_type, body = self._read_pdu()
            if pdu_type == P_DATA_TYPE:
                self._p_data(body)
            elif pdu_type == A_RELEASE_RQ_TYPE:
                if self._message is not None:
                    raise _Abort("A-RELEASE-RQ while a DIMSE message was in transfer", reason=2)
                self._send(_HEADER.pack(A_RELEASE_RP_TYPE, 0, 4) + b"\0\0\0\0")
                self.established = False
                return
            elif pdu_type == A_ABORT_TYPE:
                log.info("association from %s (%s) aborted by the peer", self.calling, self.host)
                return
            else:
                raise _Abort(f"unexpected PDU type 0x{pdu_type:02X}", reason=2 if pdu_type in (1, 2, 3, 6) else 1)

    def abort(self) -> None:
        """From another thread (the drain): A-ABORT the peer and wake this connection's blocked read."""
        self._aborted = True
        self._send(_abort_pdu(source=0, reason=0))
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass

    # -- PDUs --------------------------------------------------------------------------------
    def _recv_exact(self, view: memoryview, deadline: float | None = None) -> None:
        got, size = 0, len(view)
        while got < size:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError("association request deadline passed")
                self.sock.settimeout(left)
            try:
                n = self.sock.recv_into(view[got:], size - got)
            except BlockingIOError:  # SO_RCVTIMEO expired on a blocking socket (_set_network_timeout)
                raise TimeoutError("no data within the network timeout") from None
            if not n:
                raise ConnectionResetError("the peer closed the connection")
            got += n

    def _read_pdu(self, deadline: float | None = None) -> tuple[int, memoryview]:
        self._recv_exact(memoryview(self._header), deadline)
        pdu_type, _reserved, length = _HEADER.unpack(self._header)
        why = self.guard.check_header(bytes(self._header))
        if why is not None:
            raise _Abort(why, reason=6)
        if length > len(self._buffer):
            self._buffer = bytearray(length)
        body = memoryview(self._buffer)[:length]
        self._recv_exact(body, deadline)
        if self.server.observer is not None:
            self.server.observer.received_bytes(6 + length)
        return pdu_type, body

    def _send(self, pdu: bytes) -> None:
        with self._send_lock:
            self.guard.sent(pdu)
            try:
                self.sock.sendall(pdu)
            except BlockingIOError:  # SO_SNDTIMEO expired: the peer stopped reading
                if pdu[:1] != bytes([A_ABORT_TYPE]):
                    raise TimeoutError("the peer read nothing within the network timeout") from None
            except OSError:
                if pdu[:1] != bytes([A_ABORT_TYPE]):
                    raise

    # -- association negotiation (pynetdicom's code) ------------------------------------------
    def _associate(self, pdu: bytes) -> bool:
        server, settings = self.server, self.server.settings
        try:
            rq = A_ASSOCIATE_RQ()
            rq.decode(pdu)
            primitive = rq.to_primitive()
        except Exception as exc:
            raise _Abort(f"malformed A-ASSOCIATE-RQ: {type(exc).__name__}", reason=6) from None
        self.calling = str(primitive.calling_ae_title or "").strip()
        called = str(primitive.called_ae_title or "").strip()
        busy = server.request(self)
        if busy is not None:
            log.warning("association from %s (%s) rejected: %d associations open (node.max_associations)",
                        self.calling, self.host, busy)
            self._reject(0x02, 0x03, 0x02)  # transient, presentation related, local limit exceeded
            return False
        allowed = [a.strip() for a in settings.allowed_calling_aets]
        rejection: tuple[int, int, int] | None = None
        if allowed and self.calling not in allowed:
            rejection = (0x01, 0x01, 0x03)  # permanent, service user, calling AE title not recognised
        if settings.require_called_aet and called != settings.ae_title.strip():
            rejection = (0x01, 0x01, 0x07)  # called AE title not recognised
        if rejection is not None:
            log.warning("association from %s rejected: %s", self.host, rejection_reason(settings, self.calling, called))
            self._reject(*rejection)
            return False
        items = primitive.user_information
        roles = {item.sop_class_uid: (item.scu_role, item.scp_role) for item in items
                 if isinstance(item, SCP_SCU_RoleSelectionNegotiation)}
        results, role_replies = negotiate_as_acceptor(
            primitive.presentation_context_definition_list, server.contexts, roles or None)
        self.contexts = {int(cx.context_id): str(cx.transfer_syntax[0]) for cx in results if cx.result == 0x00}
        accept = A_ASSOCIATE()
        accept.application_context_name = primitive.application_context_name
        accept.calling_ae_title = primitive.calling_ae_title
        accept.called_ae_title = primitive.called_ae_title
        accept.result = 0x00
        accept.result_source = 0x01
        accept.presentation_context_definition_results_list = results
        max_length = MaximumLengthNotification()
        max_length.maximum_length_received = settings.max_pdu_size
        class_uid = ImplementationClassUIDNotification()
        class_uid.implementation_class_uid = PYNETDICOM_IMPLEMENTATION_UID
        version = ImplementationVersionNameNotification()
        version.implementation_version_name = PYNETDICOM_IMPLEMENTATION_VERSION
        replies: list[Any] = [max_length, class_uid, version, *role_replies]
        if any(isinstance(item, AsynchronousOperationsWindowNegotiation) for item in items):
            window = AsynchronousOperationsWindowNegotiation()  # one operation at a time each way, as pynetdicom
            window.maximum_number_operations_invoked = window.maximum_number_operations_performed = 1
            replies.append(window)
        accept.user_information = replies
        ac = A_ASSOCIATE_AC()
        ac.from_primitive(accept)
        self._send(ac.encode())
        self.established = True
        log.info("association from %s (%s:%s)", self.calling, self.host, self.port)
        return True

    def _reject(self, result: int, source: int, diagnostic: int) -> None:
        self._send(_HEADER.pack(A_ASSOCIATE_RJ_TYPE, 0, 4) + bytes([0, result, source, diagnostic]))

    # -- P-DATA and DIMSE (ours) ---------------------------------------------------------------
    def _p_data(self, body: memoryview) -> None:
        pos, end = 0, len(body)
        while pos < end:
            if end - pos < 6:
                raise _Abort("P-DATA ends inside a PDV header", reason=6)
            length, context_id, control = _PDV.unpack_from(body, pos)
            if length < 2 or pos + 4 + length > end:
                raise _Abort(f"PDV length {length} does not fit its P-DATA", reason=6)
            data = body[pos + 6:pos + 4 + length]
            pos += 4 + length
            if context_id not in self.contexts:
                raise _Abort(f"PDV on presentation context {context_id}, which was not accepted", reason=6)
            if control & 0x01:
                if self._message is not None:
                    raise _Abort("command fragment while a data set was expected", reason=6)
                self._command += data
                if len(self._command) > MAX_COMMAND_BYTES:
                    raise _Abort(f"command set above {MAX_COMMAND_BYTES} bytes", reason=6)
                if control & 0x02:
                    self._command_done(context_id)
            else:
                message = self._message
                if message is None:
                    raise _Abort("data set fragment without a command", reason=6)
                if context_id != message.context_id:
                    raise _Abort("data set fragment on another presentation context than its command", reason=6)
                if message.file is not None:
                    if len(message.head) < SCAN_BYTES:
                        message.head += data[:SCAN_BYTES - len(message.head)]
                    self._write(message, data)
                if control & 0x02:
                    self._data_set_done(message)

    def _command_done(self, context_id: int) -> None:
        try:
            command = parse_command(self._command)
        except ValueError as exc:
            raise _Abort(f"malformed command set: {exc}", reason=6) from None
        finally:
            self._command.clear()
        field, message_id = _us(command, 0x0100), _us(command, 0x0110)
        if field is None or message_id is None:
            raise _Abort("command set without CommandField or MessageID", reason=6)
        if field & 0x8000:
            raise _Abort(f"unexpected DIMSE response 0x{field:04X} from a requestor", reason=2)
        message = _Message(context_id, field, message_id, _ui(command, 0x0002), _ui(command, 0x1000))
        has_data_set = _us(command, 0x0800) != NO_DATA_SET
        if field == C_CANCEL_RQ:
            return  # nothing to cancel: every request is answered before the next is read
        if field not in (C_ECHO_RQ, C_STORE_RQ):
            log.warning("DIMSE command 0x%04X from %s (%s) is not supported: answered 0x%04X", field, self.calling,
                        self.host, STATUS_UNRECOGNISED_OPERATION)
        if not has_data_set:
            self._answer(message)
            return
        if field == C_STORE_RQ:
            meta = file_meta(message.sop_class, message.sop_instance, self.contexts[context_id])
            message.path = self.server.temp_path()
            try:
                fd = os.open(message.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
            except OSError as exc:
                self._write_failed(message, exc)
            else:
                message.file = os.fdopen(fd, "wb", buffering=0)
                message.head += meta
                self._write(message, meta)
        self._message = message

    def _write(self, message: _Message, data: memoryview | bytes) -> None:
        """Append to the object's file; every WRITEBACK_BYTES, start writing what came to the disk, so the
        store's fsync at the end waits for little more than the tail (one sender waited 38% of its time there)."""
        try:
            _write_all(message.file, data)
            message.written += len(data)
            if message.written - message.flushed >= WRITEBACK_BYTES:
                start_writeback(message.file.fileno(), message.flushed, message.written - message.flushed)
                message.flushed = message.written
        except OSError as exc:
            self._write_failed(message, exc)

    def _write_failed(self, message: _Message, exc: OSError) -> None:
        """A full or failing disk: drop this object (answered 0xA700 when it has arrived), keep the association."""
        log.error("cannot write the object from %s (%s) to %s: %s", self.calling, self.host, message.path, exc)
        message.write_failed = True
        if message.file is not None:
            try:
                message.file.close()
            except OSError:
                pass
            message.file = None
        if message.path is not None:
            message.path.unlink(missing_ok=True)
            message.path = None

    def _data_set_done(self, message: _Message) -> None:
        status: int | None = STATUS_OUT_OF_RESOURCES if message.write_failed else None
        if message.file is not None:
            try:  # no fsync here: ``store`` syncs the file once it is in its job folder (see Store)
                message.file.close()
            except OSError as exc:
                self._write_failed(message, exc)
                status = STATUS_OUT_OF_RESOURCES
            message.file = None
        self._message = None
        if message.field == C_STORE_RQ and message.path is not None:
            try:
                status = self.server.store(message.path, self.calling, message.sop_class, message.sop_instance,
                                           message.head)
            finally:
                if status != STATUS_SUCCESS:  # stored means moved away by ``store``: no unlink to fail
                    message.path.unlink(missing_ok=True)  # quarantined or refused: anything left is ours
                message.path = None
        self._answer(message, status)

    def _answer(self, message: _Message, status: int | None = None) -> None:
        if message.field == C_ECHO_RQ:
            status = 0x0000 if status is None else status
        elif message.field == C_STORE_RQ:
            status = STATUS_CANNOT_UNDERSTAND if status is None else status  # a C-STORE without a data set
        else:
            status = STATUS_UNRECOGNISED_OPERATION
        command = response(message.field | 0x8000, message.message_id, status, message.sop_class,
                           message.sop_instance if message.field != C_ECHO_RQ else "")
        pdv = _PDV.pack(len(command) + 2, message.context_id, 0x03) + command
        self._send(_HEADER.pack(P_DATA_TYPE, 0, len(pdv)) + pdv)

    def _discard_partial(self) -> None:
        """The connection ended while a data set was arriving: remove the partial object."""
        message, self._message = self._message, None
        if message is None or message.path is None:
            return
        if message.file is not None:
            try:
                message.file.close()
            except OSError:
                pass
        message.path.unlink(missing_ok=True)
        log.info("removed the partial object from %s (the transfer did not complete)", self.host)


def _set_network_timeout(sock: socket.socket, timeout: float | None) -> None:
    """Bound each read and write on an established association by ``timeout`` seconds (None: no bound).

    Why: with ``settimeout`` CPython calls poll() before every recv and send (13 extra system calls per
    instance). A plain TCP socket is made blocking with the kernel's SO_RCVTIMEO/SO_SNDTIMEO instead: a
    stalled read then fails with EAGAIN, which ``_recv_exact`` turns into the same TimeoutError. A TLS
    socket keeps ``settimeout``: there an EAGAIN inside OpenSSL would surface as SSLWantReadError, not as a
    timeout. SO_SNDTIMEO bounds each send() rather than a whole sendall(); responses are a few hundred bytes.
    """
    if isinstance(sock, ssl.SSLSocket) or not timeout:
        sock.settimeout(timeout)
        return
    sock.settimeout(None)
    seconds, micros = divmod(max(1, round(timeout * 1_000_000)), 1_000_000)
    value = struct.pack("@ll", seconds, micros)  # struct timeval
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)


def _write_all(file: Any, data: memoryview | bytes) -> None:
    view = memoryview(data)
    while view:
        written = file.write(view)
        view = view[written:]
