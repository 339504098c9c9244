"""The node's DICOM face: a pynetdicom AE answering C-ECHO and C-STORE into the spool.

Speed comes from never decoding what we receive: the C-STORE handler takes the encoded bytes as
the sender sent them (``STORE_RECV_CHUNKED_DATASET`` streams them to a file while PDUs arrive;
``maximum_pdu_size = 0`` lets the peer send the largest PDUs it can), reads only the four UIDs
from the header, fsyncs, renames the file into its job folder and records it in the ledger
*before* answering Success. A Success therefore always means "durably on our disk".

Failure statuses are explicit so a sender knows whether to retry:
``0xA700`` out of resources (disk above the high watermark until it drops below the low one,
object above ``max_object_bytes``, a write error), ``0xA900`` the dataset's SOP Class/Instance
UIDs differ from the command's, ``0xC210`` the bytes cannot be parsed for their UIDs (kept in
quarantine/ with a reason). Whatever arrives, the handler answers and the node keeps serving.
"""

from __future__ import annotations

import io
import logging
import re
import os
import shutil
import struct
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.security import server_ssl_context
from dicomnode.spool import Spool, write_atomic

log = logging.getLogger(__name__)

STATUS_SUCCESS = 0x0000
STATUS_OUT_OF_RESOURCES = 0xA700
STATUS_DATASET_MISMATCH = 0xA900
STATUS_CANNOT_UNDERSTAND = 0xC210
STATUS_PROCESSING_FAILURE = 0xC211

_UNCOMPRESSED = (ExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian)
_UID_CHARS = re.compile(r"[0-9]+(\.[0-9]+)*")
_UID_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


def transfer_syntaxes() -> list[str]:
    """Compressed syntaxes first, then Explicit VR, then Implicit VR: senders keep their encoding."""
    compressed = [
        ts for ts in ALL_TRANSFER_SYNTAXES if ts not in _UNCOMPRESSED and ts != DeflatedExplicitVRLittleEndian
    ]
    return [*compressed, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ExplicitVRBigEndian,
            ImplicitVRLittleEndian]


@dataclass(frozen=True)
class ReceiveSettings:
    """What the SCP needs from ``node.*`` and ``storage.*`` (kept apart from the config schema)."""

    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    max_associations: int = 10
    allowed_calling_aets: tuple[str, ...] = ()
    require_called_aet: bool = True
    max_pdu_size: int = 0
    max_object_bytes: int = 2 * 1024**3
    disk_high_watermark_percent: float = 90.0
    disk_low_watermark_percent: float = 85.0
    chunked: bool = True
    tls: Any = None  # node.tls ({cert, key, ca, require_client_cert}); see dicomnode.security

    @classmethod
    def from_config(cls, config: Any) -> "ReceiveSettings":
        node, storage = config.node, config.storage
        return cls(
            ae_title=node.ae_title,
            host=node.host,
            port=node.port,
            max_associations=node.max_associations,
            allowed_calling_aets=tuple(node.allowed_calling_aets),
            require_called_aet=node.require_called_aet,
            max_pdu_size=node.max_pdu_size,
            max_object_bytes=node.max_object_bytes,
            disk_high_watermark_percent=storage.disk_high_watermark_percent,
            disk_low_watermark_percent=storage.disk_low_watermark_percent,
            tls=node.tls,
        )


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


@dataclass
class ReceiveStats:
    stored: int = 0
    bytes: int = 0
    refused: int = 0
    quarantined: int = 0
    echoes: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, **counts: int) -> None:
        with self._lock:
            for key, value in counts.items():
                setattr(self, key, getattr(self, key) + value)


class Receiver:
    """The C-ECHO / C-STORE SCP bound to one spool; ``start`` returns at once (threaded server)."""

    def __init__(
        self, spool: Spool, settings: ReceiveSettings, *, on_stored: Callable[[int, str], None] | None = None,
        disk_guard: DiskGuard | None = None,
    ) -> None:
        self.spool = spool
        self.settings = settings
        self.on_stored = on_stored
        self.stats = ReceiveStats()
        self.disk = disk_guard or DiskGuard(
            spool.root, settings.disk_high_watermark_percent, settings.disk_low_watermark_percent
        )
        self.ae = self._build_ae()
        self._server: Any = None

    def _build_ae(self) -> AE:
        s = self.settings
        ae = AE(ae_title=s.ae_title)
        ae.maximum_pdu_size = s.max_pdu_size
        ae.maximum_associations = s.max_associations
        ae.require_called_aet = s.require_called_aet
        ae.require_calling_aet = list(s.allowed_calling_aets)
        ae.network_timeout = 60
        ae.dimse_timeout = 60
        syntaxes = transfer_syntaxes()
        ae.add_supported_context(Verification, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, syntaxes)
        return ae

    def _ensure_renamable_chunks(self) -> None:
        """pynetdicom streams each dataset into the temp dir; make sure it can be *renamed* into the spool.

        A temp dir on another file system or mount (a container volume, systemd PrivateTmp) would
        make every instance a full copy. Then the process temp dir is pointed into the spool (a
        process-wide setting, acceptable for the dedicated node process) and logged.
        """
        probe = Path(tempfile.mkstemp(prefix="dicomnode-probe-")[1])
        target = self.spool.incoming / probe.name
        try:
            os.replace(probe, target)
        except OSError as exc:
            chunk_dir = self.spool.incoming / "chunks"
            chunk_dir.mkdir(mode=0o700, exist_ok=True)
            tempfile.tempdir = str(chunk_dir)
            log.info("temp dir %s cannot be renamed into the spool (%s): receiving into %s",
                     probe.parent, exc.strerror or exc, chunk_dir)
        finally:
            probe.unlink(missing_ok=True)
            target.unlink(missing_ok=True)

    @property
    def port(self) -> int:
        """The bound port (differs from settings.port when that was 0)."""
        if self._server is None:
            return self.settings.port
        return int(self._server.server_address[1])

    def start(self) -> None:
        if self.settings.chunked:
            # Stream each dataset to a file as PDUs arrive instead of growing it in memory:
            # fastest measured path (REFERENCE §5). Process-wide pynetdicom switch.
            _config.STORE_RECV_CHUNKED_DATASET = True
            self._ensure_renamable_chunks()
        handlers = [
            (evt.EVT_C_ECHO, self._on_echo),
            (evt.EVT_C_STORE, self._on_store),
            (evt.EVT_ACCEPTED, self._on_accepted),
            (evt.EVT_REJECTED, self._on_rejected),
        ]
        tls = server_ssl_context(self.settings.tls) if self.settings.tls is not None else None
        self._server = self.ae.start_server(
            (self.settings.host, self.settings.port), block=False, evt_handlers=handlers, ssl_context=tls
        )
        log.info(
            "listening as %s on %s:%d (max %d associations, TLS %s)",
            self.settings.ae_title, self.settings.host, self.port, self.settings.max_associations,
            "on" if tls else "off",
        )

    def stop_accepting(self) -> None:
        """Close the listening socket; associations already open run to their end."""
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def drain(self, timeout: float, negotiation_grace: float = 1.0) -> bool:
        """Wait up to ``timeout`` s for established associations to finish; abort what is left.

        A connection that never sends an A-ASSOCIATE-RQ (a port probe, a health check) stays
        "active" in pynetdicom until its ARTIM timer expires (30 s): after ``negotiation_grace``
        s such half-open associations are not waited for. Returns False when an established
        association had to be aborted.
        """
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
        self.ae.shutdown()

    # -- handlers ----------------------------------------------------------------------------
    def _on_accepted(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.info("association from %s (%s:%s)", req.ae_title, req.address, req.port)

    def _on_rejected(self, event: evt.Event) -> None:
        req = event.assoc.requestor
        log.warning("association rejected: calling AE %r from %s", req.ae_title, req.address)

    def _on_echo(self, event: evt.Event) -> int:
        self.stats.add(echoes=1)
        return STATUS_SUCCESS

    def _on_store(self, event: evt.Event) -> int:
        calling = str(event.assoc.requestor.ae_title).strip()
        request = event.request
        try:
            return self._store(event, calling, str(request.AffectedSOPClassUID), str(request.AffectedSOPInstanceUID))
        except Exception:  # never let one object take the SCP down; the sender gets a clear failure
            log.exception("store of %s failed", request.AffectedSOPInstanceUID)
            self.stats.add(refused=1)
            return STATUS_PROCESSING_FAILURE

    def _store(self, event: evt.Event, calling: str, cmd_class: str, cmd_sop: str) -> int:
        if self.disk.refuse():
            self.stats.add(refused=1)
            return STATUS_OUT_OF_RESOURCES
        landed = self._land(event)
        size = landed.stat().st_size
        if size > self.settings.max_object_bytes:
            landed.unlink(missing_ok=True)
            log.warning(
                "refused %s from %s: %d bytes > max_object_bytes %d", cmd_sop, calling, size,
                self.settings.max_object_bytes,
            )
            self.stats.add(refused=1)
            return STATUS_OUT_OF_RESOURCES
        try:
            uids = read_uids(landed)
        except ValueError as exc:
            reason = f"calling AE {calling}, SOP Instance {cmd_sop}: {exc}"
            kept = self.spool.quarantine(landed, reason)
            log.warning("quarantined %s: %s", kept.name, reason)
            self.stats.add(quarantined=1)
            return STATUS_CANNOT_UNDERSTAND
        if uids["SOPInstanceUID"] != cmd_sop or uids["SOPClassUID"] != cmd_class:
            reason = (
                f"dataset UIDs (class {uids['SOPClassUID']}, instance {uids['SOPInstanceUID']}) differ from "
                f"the C-STORE command (class {cmd_class}, instance {cmd_sop})"
            )
            kept = self.spool.quarantine(landed, f"calling AE {calling}: {reason}")
            log.warning("quarantined %s: %s", kept.name, reason)
            self.stats.add(quarantined=1)
            return STATUS_DATASET_MISMATCH
        try:
            job_id, _final = self.spool.accept(
                landed,
                study_uid=uids["StudyInstanceUID"],
                series_uid=uids["SeriesInstanceUID"],
                sop_uid=uids["SOPInstanceUID"],
                sop_class_uid=uids["SOPClassUID"],
                calling_aet=calling,
            )
        except OSError as exc:
            landed.unlink(missing_ok=True)
            log.error("cannot spool %s: %s", cmd_sop, exc)
            self.stats.add(refused=1)
            return STATUS_OUT_OF_RESOURCES
        self.stats.add(stored=1, bytes=size)
        log.debug("stored %s series %s -> job %d", cmd_sop, uids["SeriesInstanceUID"], job_id)
        if self.on_stored is not None:
            self.on_stored(job_id, uids["SeriesInstanceUID"])
        return STATUS_SUCCESS

    def _land(self, event: evt.Event) -> Path:
        """The received bytes as a durable file in incoming/ (no decoding, no copy when avoidable)."""
        target = self.spool.temp_path()
        chunk_path = getattr(event.request, "_dataset_path", None)
        if isinstance(chunk_path, Path):
            fd = os.open(chunk_path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            try:
                os.replace(chunk_path, target)  # pynetdicom's later unlink of its temp name is best effort
            except OSError:  # temp dir on another file system: copy
                shutil.copyfile(chunk_path, target)
                _fsync_path(target)
            os.chmod(target, 0o600)
            return target
        write_atomic(target, event.encoded_dataset())
        return target


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_SCAN_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
_SCAN_BYTES = 64 * 1024
_IMPLICIT_LE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def scan_uids(head: bytes) -> dict[str, str] | None:
    """Fast path: the four UIDs straight from the first bytes of a Part 10 file, or None.

    Walks the elements by their lengths (no decoding) up to (0020,000E). Returns None, leaving the
    decision to pydicom, whenever anything is unusual: no preamble, big endian or deflated data,
    an undefined length before the UIDs, an element running past ``head``, a UID missing or not
    well-formed. It never judges a file bad by itself, so it cannot refuse what pydicom accepts.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos, end, syntax = 132, len(head), None
    found: dict[str, str] = {}
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002 and syntax is None:
            return None  # file meta without a transfer syntax
        tag = (group << 16) | element
        if group != 0x0002 and syntax == _IMPLICIT_LE:  # file meta is always explicit VR
            (length,) = struct.unpack_from("<I", head, pos + 4)
            header = 8
        else:
            vr = head[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    return None
                (length,) = struct.unpack_from("<I", head, pos + 8)
                header = 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from("<H", head, pos + 6)
                header = 8
            else:  # not a VR: pydicom guesses how to go on, so its verdict must decide (found by fuzzing)
                return None
        if length == 0xFFFFFFFF or pos + header + length > end:
            return None
        value = head[pos + header : pos + header + length]
        if tag == 0x00020010:
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
            if syntax in (_BIG_ENDIAN, _DEFLATED):
                return None
        elif tag in _SCAN_TAGS:
            found[_SCAN_TAGS[tag]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        elif tag > 0x0020000E:
            break
        pos += header + length
    if len(found) != len(_SCAN_TAGS):
        return None
    if any(len(v) > 64 or not _UID_CHARS.fullmatch(v) for v in found.values()):
        return None
    return found


def read_uids(path: Path | io.BufferedIOBase) -> dict[str, str]:
    """The four UIDs that file a received object; ValueError naming what is missing or unreadable.

    :func:`scan_uids` answers for well-formed files from one 64 KiB read; everything else goes
    through pydicom, whose verdict (and error message) is the one that counts.
    """
    if isinstance(path, (str, Path)):
        with open(path, "rb") as fh:
            fast = scan_uids(fh.read(_SCAN_BYTES))
        if fast is not None:
            return fast
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=list(_UID_TAGS))
        uids = {tag: str(ds.get(tag, "") or "").strip() for tag in _UID_TAGS}
    except Exception as exc:  # untrusted bytes: any parser failure means "cannot understand"
        raise ValueError(f"cannot parse the dataset: {exc.__class__.__name__}: {exc}") from exc
    missing = [tag for tag, value in uids.items() if not value]
    if missing:
        raise ValueError(f"dataset lacks {', '.join(missing)}")
    bad = [tag for tag, value in uids.items() if len(value) > 64 or not _UID_CHARS.fullmatch(value)]
    if bad:
        raise ValueError(f"invalid UID in {', '.join(bad)}")
    return uids


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


__all__: Sequence[str] = (
    "DiskGuard",
    "ReceiveSettings",
    "ReceiveStats",
    "Receiver",
    "echo",
    "read_uids",
    "transfer_syntaxes",
)
