"""The node's DICOM face: C-ECHO and C-STORE into the spool.

Two engines receive (``node.receive_engine``): pynetdicom's server (:mod:`dicomnode.listener`) or the
node's own upper layer (:mod:`dicomnode.upper`, several times faster). Both land the same Part 10 file
and hand it to the same checks here (:meth:`Receiver._store`), so nothing downstream can tell them apart.

Speed comes from never decoding what we receive: the C-STORE handler takes the encoded bytes as
the sender sent them (``STORE_RECV_CHUNKED_DATASET`` streams them to a file while PDUs arrive;
``node.max_pdu_size``, 1 MiB, is as fast as larger PDUs and bounds what one PDU can make us buffer),
reads only the four UIDs
from the header, moves the file into its job folder, fsyncs file and folder and records it in the
ledger *before* answering Success (:meth:`~dicomnode.spool.Spool.accept` says in which order). A
Success therefore always means "durably on our disk".

Failure statuses are explicit so a sender knows whether to retry:
``0xA700`` out of resources (disk above the high watermark until it drops below the low one,
object above ``max_object_bytes``, a write error), ``0xA900`` the dataset's SOP Class/Instance
UIDs differ from the command's, ``0xC210`` the bytes cannot be parsed for their UIDs (kept in
quarantine/ with a reason). Whatever arrives, the handler answers and the node keeps serving.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.config import NodeSettings, StorageConfig
from dicomnode.domain import patient_key
from dicomnode.durable import FILE_MODE, copy_file, fsync_file
from dicomnode.ledger import SeriesKey
from dicomnode.listener import MAX_PENDING_CONNECTIONS, Limits, start_server
from dicomnode.observe import Observer
from dicomnode.part10 import PATIENT_ID, read_uids
from dicomnode.security import server_ssl_context
from dicomnode.spool import Spool
from dicomnode.upper import UpperServer, rejection_reason

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0xC211

_UNCOMPRESSED = (ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian)


def transfer_syntaxes() -> list[str]:
    """Compressed syntaxes first, then Explicit VR, then Implicit VR: senders keep their encoding."""
    compressed = [
        ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED and ts != DeflatedExplicitVRLittleEndian
    ]
    return [*compressed, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
            ImplicitVRLittleEndian]


class DiskGuard:
    """Refuse stores once the spool's disk is above the high watermark, until it is below the low one.

    The hysteresis stops the node flapping between accept and refuse around one threshold; the
    usage is sampled at most once a second because ``statvfs`` per instance is measurable.
    """

    def __init__(
        self, path: Path, high_percent: float, low_percent: float, *,
        usage: Callable[[Path], tuple[int, int, int]] = shutil.disk_usage, interval: float = 1.0,
    ) -> None:
        self.path, self.high, self.low = path, high_percent, low_percent
        self._usage, self._interval = usage, interval
        self._lock = threading.Lock()
        self._checked = 0.0
        self.full = False
        self.percent = 0.0

    def refuse(self) -> bool:
        now = time.monotonic()
        with self._lock:
            if now - self._checked >= self._interval:
                self._checked = now
                total, used, _free = self._usage(self.path)
                self.percent = 100.0 * used / total if total else 100.0
                if not self.full and self.percent >= self.high:
                    self.full = True
                    log.error("disk %.1f%% >= high watermark %.1f%%: refusing stores (0xA700)", self.percent, self.high)
                elif self.full and self.percent < self.low:
                    self.full = False
                    log.warning("disk %.1f%% < low watermark %.1f%%: accepting stores again", self.percent, self.low)
            return self.full


class Receiver:
    """The C-ECHO / C-STORE SCP bound to one spool; ``start`` returns at once (threaded server)."""

    def __init__(self, spool: Spool, node: NodeSettings, storage: StorageConfig, *, disk_guard: DiskGuard | None = None,
                 reuse_port: bool = False) -> None:
        self.spool = spool
        self.reuse_port = reuse_port  # one of several receiving processes on the port (dicomnode.receivers)
        self.settings = node
        self.disk = disk_guard or DiskGuard(spool.root, storage.disk_high_watermark_percent, storage.disk_low_watermark_percent)
        self.ae = self._build_ae()
        self._server: Any = None  # accepting: pynetdicom's NodeServer or the native UpperServer
        self._upper: UpperServer | None = None  # the native engine's server, kept after stop_accepting for drain
        self.observer: Observer | None = None  # told of each C-STORE and of the bytes read (metrics); set before start

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        # The listener counts requested associations against max_associations itself (idle connections do
        # not take slots); pynetdicom's own count includes connections still waiting, so it must not bite first.
        ae.maximum_associations = s.max_associations + MAX_PENDING_CONNECTIONS
        ae.acse_timeout = s.association_request_timeout_seconds
        ae.require_called_aet = s.require_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        return ae

    @property
    def port(self) -> int:
        """The bound port (differs from settings.port when that was 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        """Listen with ``node.receive_engine``. For pynetdicom the process-wide settings (chunked receive
        into the spool) are applied once by :func:`dicomnode.netconfig.configure` before this is called."""
        tls = server_ssl_context(self.settings.tls) if self.settings.tls is not None else None
        if self.settings.receive_engine == "native":
            self._upper = UpperServer(
                self.settings, self.ae.supported_contexts, store=self._store_landed, temp_path=self.spool.temp_path,
                observer=self.observer, tls=tls, reuse_port=self.reuse_port, network_timeout=self.ae.network_timeout)
            self._upper.start()
            self._server = self._upper
        else:
            self._start_pynetdicom(tls)
        log.info(
            "listening as %s on %s:%d (max %d associations, TLS %s, %s engine)",
            self.settings.ae_title, self.settings.host, self.port, self.settings.max_associations,
            "on" if tls else "off", self.settings.receive_engine,
        )

    def _start_pynetdicom(self, tls: Any) -> None:
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
            *([(evt.EVT_DATA_RECV, self._on_data)] if self.observer is not None else []),
        ]
        limits = Limits.from_settings(self.settings, network_timeout=self.ae.network_timeout)
        self._server = start_server(self.ae, (self.settings.host, self.settings.port), handlers=handlers,
                                    limits=limits, tls=tls, reuse_port=self.reuse_port)

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def disk_full(self) -> bool:
        return self.disk.full

    def shutdown(self) -> None:
        """Release the AE (after :meth:`drain`)."""
        self.ae.shutdown()

    def stop_accepting(self) -> None:
        """Close the listening socket; associations already open run to their end."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def drain(self, timeout: float, negotiation_grace: float = 1.0) -> bool:
        """Wait up to ``timeout`` s for established associations to finish; abort what is left.

        A connection that never sends an A-ASSOCIATE-RQ (a port probe, a health check) stays
        "active" in pynetdicom until ``association_request_timeout_seconds``: after ``negotiation_grace``
        s such half-open associations are not waited for. Returns False when an established
        association had to be aborted.
        """
        if self._upper is not None:
            return self._upper.drain(timeout, negotiation_grace)
        start = time.monotonic()
        deadline = start + timeout
        while time.monotonic() < deadline:
            grace = time.monotonic() - start < negotiation_grace
            if not [a for a in self.ae.active_associations if a.is_established or grace]:
                break
            time.sleep(0.05)
        left = self.ae.active_associations
        established = [a for a in left if a.is_established]
        for assoc in left:
            assoc.abort()
        return not established

    def stop(self, timeout: float = 10.0) -> None:
        self.stop_accepting()
        self.drain(timeout)
        self.shutdown()

    # -- handlers ----------------------------------------------------------------------------
    def _on_accepted(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.info("association from %s (%s:%s)", req.ae_title, req.address, req.port)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association from %s rejected: %s", req.address, rejection_reason(
            self.settings, str(req.ae_title).strip(), str(getattr(req.primitive, "called_ae_title", "") or "").strip(),
            len([a for a in self.ae.active_associations if a.is_acceptor])))

    def _on_echo(self, event: evt.Event) -> int:
        return STATUS_SUCCESS

    def _on_data(self, event: evt.Event) -> None:
        if self.observer is not None:
            self.observer.received_bytes(len(event.data))

    def _on_store(self, event: evt.Event) -> int:
        request = event.request
        return self._handle_store(lambda: self._land(event), str(event.assoc.requestor.ae_title).strip(),
                                  str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))

    def _store_landed(self, landed: Path, calling: str, cmd_class: str, cmd_sop: str, head: bytes | bytearray) -> int:
        """The native engine's C-STORE: ``landed`` is a complete Part 10 file in incoming/, not yet fsynced (the
        spool syncs it in its job folder), ``head`` its first bytes (:data:`~dicomnode.part10.SCAN_BYTES`)."""
        return self._handle_store(lambda: landed, calling, cmd_class, cmd_sop, head, synced=False)

    def _handle_store(self, land: Callable[[], Path], calling: str, cmd_class: str, cmd_sop: str,
                      head: bytes | bytearray | None = None, *, synced: bool = True) -> int:
        """One C-STORE for either engine, timed for the observer; an exception fails this object only."""
        started = time.perf_counter()
        status = STATUS_PROCESSING_FAILURE
        try:
            status = self._store(land, calling, cmd_class, cmd_sop, head, synced=synced)
            return status
        except Exception:  # never let one object take the SCP down; the sender gets a clear failure
            log.exception("store of %s failed", cmd_sop)
            return STATUS_PROCESSING_FAILURE
        finally:
            if self.observer is not None:
                self.observer.stored(status, time.perf_counter() - started)

    def _store(self, land: Callable[[], Path], calling: str, cmd_class: str, cmd_sop: str,
               head: bytes | bytearray | None = None, *, synced: bool = True) -> int:
        """Check, spool and record the object ``land`` puts in incoming/ (the caller removes it on refusal);
        ``head``: its first bytes when the engine kept them (no second read); ``synced``: whether the landed
        file is fsynced already (the native engine leaves that to the spool)."""
        if self.disk.refuse():
            return STATUS_OUT_OF_RESOURCES
        landed = land()
        size = landed.stat().st_size
        if size > self.settings.max_object_bytes:
            landed.unlink(missing_ok=True)
            log.warning(
                "refused %s from %s: %d bytes > max_object_bytes %d", cmd_sop, calling, size,
                self.settings.max_object_bytes,
            )
            return STATUS_OUT_OF_RESOURCES
        try:
            uids = read_uids(landed, head)
        except ValueError as exc:
            if not synced:
                fsync_file(landed)  # kept for a human: as durable as what is spooled
            reason = f"calling AE {calling}, SOP Instance {cmd_sop}: {exc}"
            kept = self.spool.quarantine(landed, reason)
            log.warning("quarantined %s: %s", kept.name, reason)
            return STATUS_CANNOT_UNDERSTAND
        if uids["SOPInstanceUID"] != cmd_sop or uids["SOPClassUID"] != cmd_class:
            reason = (
                f"dataset UIDs (class {uids['SOPClassUID']}, instance {uids['SOPInstanceUID']}) differ from "
                f"the C-STORE command (class {cmd_class}, instance {cmd_sop})"
            )
            if not synced:
                fsync_file(landed)
            kept = self.spool.quarantine(landed, f"calling AE {calling}: {reason}")
            log.warning("quarantined %s: %s", kept.name, reason)
            return STATUS_DATASET_MISMATCH
        key = SeriesKey(patient_key(uids[PATIENT_ID]), uids["StudyInstanceUID"], uids["SeriesInstanceUID"])
        try:
            job_id, _final = self.spool.accept(
                landed, key, sop_uid=uids["SOPInstanceUID"], sop_class_uid=uids["SOPClassUID"], calling_aet=calling,
                synced=synced, size=size,
            )
        except OSError as exc:
            landed.unlink(missing_ok=True)
            log.error("cannot spool %s: %s", cmd_sop, exc)
            return STATUS_OUT_OF_RESOURCES
        log.debug("stored %s series %s -> job %d", cmd_sop, uids["SeriesInstanceUID"], job_id)
        return STATUS_SUCCESS

    def _land(self, event: evt.Event) -> Path:
        """The received bytes as a durable file in incoming/ (no decoding, no copy when avoidable)."""
        target = self.spool.temp_path()
        chunk_path = event.dataset_path if self._chunked(event) else None
        if chunk_path is not None:
            fsync_file(chunk_path)
            try:
                os.replace(chunk_path, target)  # pynetdicom's later unlink of its temp name is best effort
                os.chmod(target, FILE_MODE)
            except OSError:  # the chunk folder is on another file system: copy
                copy_file(chunk_path, target)
            return target
        return self.spool.write_incoming(event.encoded_dataset())

    @staticmethod
    def _chunked(event: evt.Event) -> bool:
        """True when pynetdicom streamed this dataset to a file (its public ``dataset_path``)."""
        try:
            return event.dataset_path is not None
        except AttributeError:  # not a chunked receive
            return False


def echo(host: str, port: int, ae_title: str, calling_ae_title: str = "ECHOSCU", timeout: float = 10.0) -> bool:
    """C-ECHO a peer; True when it answers Success (used by status checks and tests)."""
    ae = AE(ae_title=calling_ae_title)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.network_timeout = timeout
    assoc = ae.associate(host, port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status) and status.Status == 0x0000
    finally:
        assoc.release()


__all__: Sequence[str] = ("DiskGuard", "Receiver", "echo", "read_uids", "rejection_reason", "transfer_syntaxes")
