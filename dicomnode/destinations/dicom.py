"""A PACS reached by C-STORE (``type: dicom``), the node's main destination type.

Every file gets a :class:`SendOutcome`: only a success (or one of the storage warnings B000/B006/B007)
counts as sent, so a refused store is *not* sent and the dispatcher's retry and dead-letter
bookkeeping sees the truth.

One association per batch (about 3x faster than one per file). For every (SOP class, transfer
syntax) of the batch the file's own transfer syntax and Explicit and Implicit VR Little Endian are
proposed, each as a context of its own: in one context with several transfer syntaxes the
*acceptor* picks (pynetdicom and dcmtk pick by their own preference, often uncompressed), and the
node would decompress files the PACS could have taken as they are. So a compressed file goes as-is
where the PACS takes it and is decompressed only where the PACS refuses its compression. Files whose
own transfer syntax was accepted are streamed from disk undecoded.

Every association is bounded in time, so a PACS that stalls delays only its own deliveries and never
the node's shutdown: ``timeout_seconds`` bounds connecting, the association handshake, each socket
send and receive (a PACS that stops reading fails the send after that long without progress) and
the wait for a C-STORE response, which is allowed one more second per MB of the object because
pynetdicom starts that wait once the object is queued, not once it has left. :meth:`DicomDestination.stop`
ends associations in flight at once. Text the PACS writes (an ErrorComment) is not kept: it can name
the patient; only the status code and the UIDs in it are.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

import pydicom
from pydantic import Field
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicomnode.configtypes import AETitle, ConfigPath, Port, StrictModel
from dicomnode.destinations.base import Destination, DestinationSettings, Progress, SendOutcome, destination_type
from dicomnode.encode import decompress_for
from dicomnode.redact import exception_text, peer_comment
from dicomnode.security import client_tls_args

__all__ = [
    "DicomDestination", "DicomSettings", "FileMeta", "MAX_CONTEXTS", "TLSClientSettings", "context_groups",
    "presentation_contexts", "read_file_meta", "response_timeout", "status_text",
]

logger = logging.getLogger(__name__)

STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})  # PS3.4 B.2.3: the instance was stored
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd IDs 1..255)
SECONDS_PER_MB = 1.0  # response wait allowance per MB sent (pynetdicom's wait starts when the object is queued)
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


class TLSClientSettings(StrictModel):
    """TLS when the node connects to a peer: ``ca`` verifies the peer, ``cert``/``key`` identify us.

    The peer's certificate must name ``host`` (DNS name or IP address in its subjectAltName) unless
    ``verify_hostname: false``: see :mod:`dicomnode.security`.
    """

    ca: ConfigPath | None = None  # None = the system's trusted CAs
    cert: ConfigPath | None = None
    key: ConfigPath | None = None
    verify_hostname: bool = True  # false: any certificate from ``ca`` is accepted, whatever host it names


class DicomSettings(DestinationSettings):
    """A DICOM peer (PACS) receiving by C-STORE."""

    implied_by: ClassVar[str | None] = "ae_title"
    type: Literal["dicom"] = "dicom"
    ae_title: AETitle
    host: str = Field(min_length=1)
    port: Port
    calling_ae_title: AETitle | None = None  # None = node.ae_title
    timeout_seconds: float = Field(30.0, gt=0)
    tls: TLSClientSettings | None = None


def response_timeout(timeout_seconds: float, size_bytes: int) -> float:
    """How long to wait for the C-STORE response to an object of ``size_bytes``: the timeout plus 1 s per MB."""
    return timeout_seconds + SECONDS_PER_MB * max(0, size_bytes) / 1e6


def status_text(status: int) -> str:
    """'0xA700 Refused: Out of Resources' for a C-STORE status code."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    meaning = entry[1] if entry and entry[1] else code_to_category(status)
    return f"0x{status:04X} {meaning}"


# --------------------------------------------------------------------------- DICOM (C-STORE SCU)


@dataclass(frozen=True)
class FileMeta:
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


class FileMetaError(ValueError):
    """A file without the UIDs a C-STORE needs (the message is the node's own, fit to log)."""


def read_file_meta(path: Path) -> FileMeta:
    """SOP class/instance and transfer syntax from the file meta (falls back to the dataset)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID")
    tsyntax = meta.get("TransferSyntaxUID")
    if not sop_class or not sop_instance or not tsyntax:
        missing = [n for n, v in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_instance),
                                  ("Transfer Syntax UID", tsyntax)) if not v]
        raise FileMetaError(f"missing {', '.join(missing)}")
    return FileMeta(path, UID(sop_class), UID(sop_instance), UID(tsyntax))


def presentation_contexts(infos: Sequence[FileMeta]) -> list[tuple[UID, UID]]:
    """(SOP class, transfer syntax) contexts for a batch: each file's own TS plus both uncompressed."""
    pairs: dict[tuple[UID, UID], None] = {}
    for info in infos:
        pairs[(info.sop_class, info.transfer_syntax)] = None
        for tsyntax in _UNCOMPRESSED:
            pairs[(info.sop_class, tsyntax)] = None
    return list(pairs)


@destination_type(DicomSettings)
class DicomDestination(Destination):
    """A PACS reached by C-STORE. Thread-safe: each ``send`` makes its own AE and association."""

    def __init__(
        self,
        name: str,
        ae_title: str,
        host: str,
        port: int,
        *,
        calling_ae_title: str = "DICOMNODE",
        timeout_seconds: float = 30.0,
        tls_args: tuple[ssl.SSLContext, str | None] | None = None,
        max_pdu_size: int = 0,
    ) -> None:
        self.name = name
        self.ae_title = ae_title
        self.host = host
        self.port = port
        self.calling_ae_title = calling_ae_title
        self.timeout_seconds = timeout_seconds
        self.tls_args = tls_args
        self.max_pdu_size = max_pdu_size
        self._stopping = threading.Event()
        self._cut = threading.Event()  # stop(abort=True) cut the connections in flight
        self._live: set[Association] = set()
        self._live_lock = threading.Lock()

    @classmethod
    def from_settings(cls, name: str, cfg: DicomSettings, node_ae_title: str) -> DicomDestination:
        """Build from config; TLS files are loaded here so a bad certificate fails at start-up."""
        tls_args = client_tls_args(cfg.tls, cfg.host) if cfg.tls is not None else None
        return cls(
            name,
            cfg.ae_title,
            cfg.host,
            cfg.port,
            calling_ae_title=cfg.calling_ae_title or node_ae_title,
            timeout_seconds=cfg.timeout_seconds,
            tls_args=tls_args,
        )

    def __repr__(self) -> str:
        tls = " tls" if self.tls_args else ""
        return f"DicomDestination({self.name!r}: {self.ae_title}@{self.host}:{self.port}{tls})"

    def send(self, paths: Sequence[Path], progress: Progress | None = None) -> list[SendOutcome]:
        if not paths:
            return []
        outcomes: dict[int, SendOutcome] = {}
        infos: list[tuple[int, FileMeta]] = []
        for i, raw in enumerate(paths):
            path = Path(raw)
            try:
                infos.append((i, read_file_meta(path)))
            except Exception as exc:  # noqa: BLE001 - any unreadable file fails alone
                outcomes[i] = SendOutcome(path, False, None, f"cannot read DICOM file: {_reason(exc)}")
                if progress is not None:
                    progress(outcomes[i])
        for group in context_groups(infos):
            for i, outcome in zip([i for i, _ in group], self._send_group([info for _, info in group], progress)):
                outcomes[i] = outcome
        result = [outcomes[i] for i in range(len(paths))]
        sent = sum(o.ok for o in result)
        log = logger.info if sent == len(result) else logger.warning
        log("%s: %d of %d stored", self.name, sent, len(result))
        return result

    def _make_ae(self, infos: Sequence[FileMeta]) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.maximum_pdu_size = self.max_pdu_size
        ae.connection_timeout = self.timeout_seconds
        ae.acse_timeout = self.timeout_seconds
        ae.dimse_timeout = self.timeout_seconds
        ae.network_timeout = self.timeout_seconds
        for sop_class, tsyntax in presentation_contexts(infos):
            ae.add_requested_context(sop_class, [tsyntax])
        return ae

    def _associate(self, ae: AE) -> tuple[Association | None, str]:
        """Open the association; (None, reason) when it cannot be established."""
        where = f"{self.ae_title}@{self.host}:{self.port}"
        # A peer that closes the connection right after its A-ASSOCIATE-RJ (dcmtk does) can make
        # pynetdicom report an abort instead of the rejection: keep the RJ PDU to tell them apart.
        rejections: list[A_ASSOCIATE_RJ] = []

        def on_pdu(event: Any) -> None:
            if isinstance(event.pdu, A_ASSOCIATE_RJ):
                rejections.append(event.pdu)

        def on_open(event: Any) -> None:
            # pynetdicom clears the socket timeout once connected (AssociationSocket.connect), so a
            # PACS that stops reading would block its send() for ever, and with it abort() and the
            # process exit. Put it back: no progress for timeout_seconds fails the send.
            raw = getattr(event.assoc.dul.socket, "socket", None)
            if raw is not None:
                raw.settimeout(self.timeout_seconds)
            with self._live_lock:
                self._live.add(event.assoc)
            if self._stopping.is_set():
                self._shutdown(event.assoc)

        if self._stopping.is_set():
            return None, "not sent: the node is stopping"
        try:
            kwargs: dict[str, Any] = {"ae_title": self.ae_title,
                                      "evt_handlers": [(evt.EVT_PDU_RECV, on_pdu), (evt.EVT_CONN_OPEN, on_open)]}
            if self.tls_args is not None:
                kwargs["tls_args"] = self.tls_args
            assoc = ae.associate(self.host, self.port, **kwargs)
        except Exception as exc:  # noqa: BLE001 - socket/TLS errors surface here on some paths
            return None, f"cannot connect to {where}: {exception_text(exc)}"
        if assoc.is_established:
            return assoc, ""
        self._forget(assoc)
        if self._stopping.is_set():
            return None, "not sent: the node is stopping"
        if rejections or assoc.is_rejected:
            rsp = rejections[0] if rejections else assoc.acceptor.primitive
            if rsp is not None and getattr(rsp, "result_str", None):
                why = f"{rsp.result_str}, source {rsp.source_str}: {rsp.reason_str}"
            else:
                why = "no reason given"
            return None, f"association rejected by {where} ({why})"
        if assoc.acceptor.primitive is None:  # no A-ASSOCIATE response at all
            return None, self._diagnose_no_answer(where)
        if not assoc.accepted_contexts:
            return None, f"{where} accepted none of the proposed presentation contexts"
        return None, f"association with {where} aborted during negotiation"

    def echo(self) -> tuple[bool, str]:
        """C-ECHO the PACS over the same association settings (TLS included) that sending uses."""
        ae = AE(ae_title=self.calling_ae_title)
        ae.add_requested_context(Verification)
        for attr in ("connection_timeout", "acse_timeout", "dimse_timeout", "network_timeout"):
            setattr(ae, attr, self.timeout_seconds)
        assoc, reason = self._associate(ae)
        if assoc is None:
            return False, reason
        try:
            status = assoc.send_c_echo()
            ok = bool(status) and int(status.Status) == 0x0000
            return ok, "C-ECHO answered Success" if ok else f"C-ECHO answered {status_text(int(status.Status)) if status else 'nothing'}"
        finally:
            if assoc.is_established:
                assoc.release()
            self._forget(assoc)

    def stop(self, *, abort: bool = False) -> None:
        """Start no new association or file; with ``abort``, cut the connections in flight now.

        Cutting is a socket shutdown, not an A-ABORT: the PDU would queue behind the unsent data of a
        PACS that stopped reading. The send blocked on it fails at once, so the sending thread returns.
        """
        self._stopping.set()
        if abort:
            self._cut.set()
            with self._live_lock:
                live = list(self._live)
            for assoc in live:
                self._shutdown(assoc)

    def resume(self) -> None:
        self._stopping.clear()
        self._cut.clear()

    @staticmethod
    def _shutdown(assoc: Association) -> None:
        raw = getattr(assoc.dul.socket, "socket", None)
        if raw is not None:
            try:
                raw.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass  # already closed

    def _forget(self, assoc: Association) -> None:
        with self._live_lock:
            self._live.discard(assoc)

    def _diagnose_no_answer(self, where: str) -> str:
        """Why no association came about, found by connecting again ourselves.

        pynetdicom only logs the socket or TLS error (in its own thread); an admin reading a failed
        delivery needs to know whether the PACS is down, unreachable or refusing our certificate.
        """
        timeout = min(self.timeout_seconds, 10.0)
        try:
            with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
                if self.tls_args is None:
                    return (f"{where} accepted the TCP connection but sent no association response within "
                            f"{self.timeout_seconds:g} s (a TLS-only port, or not a DICOM service?)")
                context, server_hostname = self.tls_args
                try:
                    with context.wrap_socket(sock, server_hostname=server_hostname):
                        pass
                except (ssl.SSLError, OSError) as exc:
                    return f"TLS handshake with {where} failed: {exception_text(exc)}"
                return (f"{where} completed the TLS handshake but sent no association response (the PACS may "
                        "require a client certificate, or refuse ours)")
        except ConnectionRefusedError:
            return f"cannot connect to {where}: connection refused (is the PACS running on that port?)"
        except TimeoutError:
            return f"cannot connect to {where}: no answer within {timeout:g} s"
        except OSError as exc:
            return f"cannot connect to {where}: {exc.strerror or exc}"

    def _send_group(self, infos: Sequence[FileMeta], progress: Progress | None = None) -> list[SendOutcome]:
        if not infos:
            return []
        outcomes: list[SendOutcome] = []

        def record(outcome: SendOutcome) -> None:
            outcomes.append(outcome)
            if progress is not None:
                progress(outcome)

        ae = self._make_ae(infos)
        assoc, reason = self._associate(ae)
        if assoc is None:
            stopping = self._stopping.is_set()
            if not stopping:
                logger.warning("%s: %s", self.name, reason)
            for f in infos:
                record(SendOutcome(f.path, False, None, reason, attempted=not stopping))
            return outcomes
        try:
            for info in infos:
                if self._stopping.is_set():
                    record(SendOutcome(info.path, False, None, "not sent: the node is stopping", attempted=False))
                elif not assoc.is_established:
                    record(SendOutcome(info.path, False, None, "association ended before this file was sent"))
                else:
                    record(self._store_one(assoc, info))
        finally:
            if assoc.is_established:
                assoc.release()
            self._forget(assoc)
        return outcomes

    def _store_one(self, assoc: Association, info: FileMeta) -> SendOutcome:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == info.sop_class]
        if not accepted:
            return SendOutcome(info.path, False, None,
                               f"PACS refused SOP class {info.sop_class.name} ({info.sop_class}) in every proposed transfer syntax")
        accepted_ts = {cx.transfer_syntax[0] for cx in accepted}
        note = ""
        try:
            if info.transfer_syntax in accepted_ts:
                payload: Path | Dataset = info.path  # streamed from disk as stored
                logger.debug("%s: SOP instance %s sent as stored (%s)", self.name, info.sop_instance, info.transfer_syntax.name)
            elif not (accepted_ts & set(_UNCOMPRESSED)):
                return SendOutcome(info.path, False, None,
                                   f"PACS accepted SOP class {info.sop_class.name} only in "
                                   f"{', '.join(sorted(ts.name for ts in accepted_ts))}, which this file is not in")
            else:
                payload, note = self._as_uncompressed(info, accepted_ts)
        except Exception as exc:  # noqa: BLE001 - a file that cannot be decoded fails alone
            return SendOutcome(info.path, False, None,
                               f"cannot convert {info.transfer_syntax.name} for sending: {exception_text(exc)}")
        try:
            size = info.path.stat().st_size
        except OSError:
            size = 0
        wait = response_timeout(self.timeout_seconds, size)
        assoc.dimse_timeout = wait
        started = time.monotonic()
        try:
            rsp = assoc.send_c_store(payload)
        except Exception as exc:  # noqa: BLE001 - encoding/IO errors for this file
            return SendOutcome(info.path, False, None, f"C-STORE not sent: {exception_text(exc)}")
        if not rsp or "Status" not in rsp:
            took = time.monotonic() - started
            if self._cut.is_set():
                detail = f"association cut after {took:.0f} s: the node is stopping"
            elif took >= 0.9 * wait:
                detail = f"no C-STORE response within {round(wait, 1):g} s"
            else:
                detail = (f"association ended after {took:.0f} s without a C-STORE response (the PACS closed it, "
                          f"aborted, or read nothing for {self.timeout_seconds:g} s)")
            logger.warning("%s: SOP instance %s: %s", self.name, info.sop_instance, detail)
            if assoc.is_established:  # the connection closed under it: end it (bounded by the socket timeout)
                assoc.abort()
            return SendOutcome(info.path, False, None, detail)
        status = int(rsp.Status)
        comment = f" ({peer_comment(rsp.get('ErrorComment'))})" if rsp.get("ErrorComment") else ""
        if status == 0x0000:
            return SendOutcome(info.path, True, status, f"stored{note}")
        if status in STORED_WARNINGS:
            return SendOutcome(info.path, True, status, f"stored with warning {status_text(status)}{comment}{note}")
        detail = f"PACS refused the store: {status_text(status)}{comment}"
        logger.warning("%s: SOP instance %s: %s", self.name, info.sop_instance, detail)
        return SendOutcome(info.path, False, status, detail)

    def _as_uncompressed(self, info: FileMeta, accepted: set[UID]) -> tuple[Dataset, str]:
        """Decode the file into an uncompressed dataset pynetdicom can encode for any accepted TS.

        The SOP Instance UID is kept: the PACS stores the same instance, only its encoding differs.
        """
        ds, decoded_from = decompress_for(pydicom.dcmread(info.path), accepted)
        if decoded_from is None:
            return ds, ""
        logger.info("%s: SOP instance %s: PACS refused %s for %s, sent decompressed", self.name, info.sop_instance,
                    decoded_from.name, info.sop_class.name)
        return ds, f" (decompressed from {decoded_from.name}: PACS refused it)"


def _reason(exc: Exception) -> str:
    """Why a file could not be read, fit for the ledger: the node's own message, else the redacted exception."""
    return str(exc) if isinstance(exc, FileMetaError) else exception_text(exc)


def context_groups(infos: Sequence[tuple[int, FileMeta]]) -> list[list[tuple[int, FileMeta]]]:
    """Split a batch so that no association needs more than MAX_CONTEXTS presentation contexts."""
    groups: list[list[tuple[int, FileMeta]]] = []
    current: list[tuple[int, FileMeta]] = []
    keys: set[tuple[UID, UID]] = set()
    for item in infos:
        needed = set(presentation_contexts([item[1]])) - keys
        if current and len(keys) + len(needed) > MAX_CONTEXTS:
            groups.append(current)
            current, keys = [], set()
            needed = set(presentation_contexts([item[1]]))
        keys |= needed
        current.append(item)
    if current:
        groups.append(current)
    return groups
