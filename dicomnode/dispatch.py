"""Destinations: send files to a PACS (C-STORE SCU) or write them into a folder.

``send`` never raises for a peer or network problem: every file gets a :class:`SendOutcome`, and
only a success (or one of the storage warnings B000/B006/B007) counts as sent. A refused store is
*not* sent, so the runtime's retry and dead-letter bookkeeping sees the truth.

The SCU reuses one association per batch (about 3x faster than one per file, REFERENCE §5). For
every (SOP class, transfer syntax) of the batch it proposes the file's own transfer syntax and
Explicit and Implicit VR Little Endian, each as a context of its own: in one context with several
transfer syntaxes the *acceptor* picks (pynetdicom and dcmtk pick by their own preference, often
uncompressed), and the node would decompress files the PACS could have taken as they are. So a
compressed file goes as-is where the PACS takes it and is decompressed only where the PACS refuses
its compression. Files whose own transfer syntax was accepted are streamed from disk undecoded.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import socket
import ssl
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
from pydicom.dataset import Dataset
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association
from pynetdicom.pdu import A_ASSOCIATE_RJ
from pynetdicom.status import GENERAL_STATUS, STORAGE_SERVICE_CLASS_STATUS, code_to_category

from dicomnode.config import DicomDestinationConfig, DispatchPolicy, FolderDestinationConfig, NodeConfig

__all__ = [
    "DicomDestination",
    "Destination",
    "FolderDestination",
    "SendOutcome",
    "backoff_seconds",
    "make_destinations",
]

logger = logging.getLogger(__name__)

# Stream files from disk when sending by path: no decode/re-encode and memory bounded by the PDU
# size rather than the object (a 2 GiB object is never read whole); about 1.5x the files/s of the
# default on loopback (benchmarks/bench_dispatch.py, noisy shared machine). Process-wide, but it only
# changes Association.send_c_store(<path>), which in dicomnode only this module calls.
_config.STORE_SEND_CHUNKED_DATASET = True

STORED_WARNINGS = frozenset({0xB000, 0xB006, 0xB007})  # PS3.4 B.2.3: the instance was stored
MAX_CONTEXTS = 128  # presentation contexts per association (PS3.8: odd IDs 1..255)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)


@dataclass(frozen=True)
class SendOutcome:
    """What happened to one file: ``ok`` only if the destination stored it.

    ``status`` is the C-STORE status code when the peer answered (None otherwise: not connected,
    refused context, unreadable file, folder destinations).
    """

    path: Path
    ok: bool
    status: int | None
    detail: str


class Destination(ABC):
    """Somewhere derived (or forwarded) files go."""

    name: str

    @abstractmethod
    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        """Deliver ``paths`` as one batch; one outcome per path, in order. Never raises for peer errors."""


def backoff_seconds(attempt: int, policy: DispatchPolicy) -> float:
    """Delay before retry number ``attempt`` (1 = first retry): initial * 2**(attempt-1), capped."""
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    exponent = min(attempt - 1, 64)  # 2**64 * any sane initial is far above any cap
    return float(min(policy.backoff_initial_seconds * 2.0**exponent, policy.backoff_max_seconds))


def status_text(status: int) -> str:
    """'0xA700 Refused: Out of Resources' for a C-STORE status code."""
    entry = STORAGE_SERVICE_CLASS_STATUS.get(status) or GENERAL_STATUS.get(status)
    meaning = entry[1] if entry and entry[1] else code_to_category(status)
    return f"0x{status:04X} {meaning}"


# --------------------------------------------------------------------------- DICOM (C-STORE SCU)


@dataclass(frozen=True)
class _FileInfo:
    path: Path
    sop_class: UID
    sop_instance: UID
    transfer_syntax: UID


def _read_meta(path: Path) -> _FileInfo:
    """SOP class/instance and transfer syntax from the file meta (falls back to the dataset)."""
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
    meta = ds.file_meta
    sop_class = meta.get("MediaStorageSOPClassUID") or ds.get("SOPClassUID")
    sop_instance = meta.get("MediaStorageSOPInstanceUID") or ds.get("SOPInstanceUID")
    tsyntax = meta.get("TransferSyntaxUID")
    if not sop_class or not sop_instance or not tsyntax:
        missing = [n for n, v in (("SOP Class UID", sop_class), ("SOP Instance UID", sop_instance),
                                  ("Transfer Syntax UID", tsyntax)) if not v]
        raise ValueError(f"missing {', '.join(missing)}")
    return _FileInfo(path, UID(sop_class), UID(sop_instance), UID(tsyntax))


def _contexts(infos: Sequence[_FileInfo]) -> list[tuple[UID, UID]]:
    """(SOP class, transfer syntax) contexts for a batch: each file's own TS plus both uncompressed."""
    pairs: dict[tuple[UID, UID], None] = {}
    for info in infos:
        pairs[(info.sop_class, info.transfer_syntax)] = None
        for tsyntax in _UNCOMPRESSED:
            pairs[(info.sop_class, tsyntax)] = None
    return list(pairs)


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

    @classmethod
    def from_config(cls, name: str, cfg: DicomDestinationConfig, node_ae_title: str) -> DicomDestination:
        """Build from config; TLS files are loaded here so a bad certificate fails at start-up."""
        tls_args = None
        if cfg.tls is not None:
            from dicomnode.security import client_tls_args

            tls_args = client_tls_args(cfg.tls, cfg.host)
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

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        if not paths:
            return []
        outcomes: dict[int, SendOutcome] = {}
        infos: list[tuple[int, _FileInfo]] = []
        for i, raw in enumerate(paths):
            path = Path(raw)
            try:
                infos.append((i, _read_meta(path)))
            except Exception as exc:  # noqa: BLE001 - any unreadable file fails alone
                outcomes[i] = SendOutcome(path, False, None, f"cannot read DICOM file: {exc}")
        for group in _context_groups(infos):
            for i, outcome in zip([i for i, _ in group], self._send_group([info for _, info in group])):
                outcomes[i] = outcome
        result = [outcomes[i] for i in range(len(paths))]
        sent = sum(o.ok for o in result)
        log = logger.info if sent == len(result) else logger.warning
        log("%s: %d of %d stored", self.name, sent, len(result))
        return result

    def _make_ae(self, infos: Sequence[_FileInfo]) -> AE:
        ae = AE(ae_title=self.calling_ae_title)
        ae.maximum_pdu_size = self.max_pdu_size
        ae.connection_timeout = self.timeout_seconds
        ae.acse_timeout = self.timeout_seconds
        ae.dimse_timeout = self.timeout_seconds
        ae.network_timeout = self.timeout_seconds
        for sop_class, tsyntax in _contexts(infos):
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

        try:
            kwargs: dict[str, Any] = {"ae_title": self.ae_title, "evt_handlers": [(evt.EVT_PDU_RECV, on_pdu)]}
            if self.tls_args is not None:
                kwargs["tls_args"] = self.tls_args
            assoc = ae.associate(self.host, self.port, **kwargs)
        except Exception as exc:  # noqa: BLE001 - socket/TLS errors surface here on some paths
            return None, f"cannot connect to {where}: {exc}"
        if assoc.is_established:
            return assoc, ""
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
                    return f"TLS handshake with {where} failed: {exc}"
                return (f"{where} completed the TLS handshake but sent no association response (the PACS may "
                        "require a client certificate, or refuse ours)")
        except ConnectionRefusedError:
            return f"cannot connect to {where}: connection refused (is the PACS running on that port?)"
        except TimeoutError:
            return f"cannot connect to {where}: no answer within {timeout:g} s"
        except OSError as exc:
            return f"cannot connect to {where}: {exc.strerror or exc}"

    def _send_group(self, infos: Sequence[_FileInfo]) -> list[SendOutcome]:
        if not infos:
            return []
        ae = self._make_ae(infos)
        assoc, reason = self._associate(ae)
        if assoc is None:
            logger.warning("%s: %s", self.name, reason)
            return [SendOutcome(f.path, False, None, reason) for f in infos]
        outcomes: list[SendOutcome] = []
        try:
            for info in infos:
                if not assoc.is_established:
                    outcomes.append(SendOutcome(info.path, False, None, "association ended before this file was sent"))
                    continue
                outcomes.append(self._store_one(assoc, info))
        finally:
            if assoc.is_established:
                assoc.release()
        return outcomes

    def _store_one(self, assoc: Association, info: _FileInfo) -> SendOutcome:
        accepted = [cx for cx in assoc.accepted_contexts if cx.abstract_syntax == info.sop_class]
        if not accepted:
            return SendOutcome(info.path, False, None,
                               f"PACS refused SOP class {info.sop_class.name} ({info.sop_class}) in every proposed transfer syntax")
        accepted_ts = {cx.transfer_syntax[0] for cx in accepted}
        note = ""
        try:
            if info.transfer_syntax in accepted_ts:
                payload: Path | Dataset = info.path  # streamed from disk as stored
            elif not (accepted_ts & set(_UNCOMPRESSED)):
                return SendOutcome(info.path, False, None,
                                   f"PACS accepted SOP class {info.sop_class.name} only in "
                                   f"{', '.join(sorted(ts.name for ts in accepted_ts))}, which this file is not in")
            else:
                payload, note = self._as_uncompressed(info)
        except Exception as exc:  # noqa: BLE001 - a file that cannot be decoded fails alone
            return SendOutcome(info.path, False, None, f"cannot convert {info.transfer_syntax.name} for sending: {exc}")
        try:
            rsp = assoc.send_c_store(payload)
        except Exception as exc:  # noqa: BLE001 - encoding/IO errors for this file
            return SendOutcome(info.path, False, None, f"C-STORE not sent: {exc}")
        if not rsp or "Status" not in rsp:
            detail = f"no C-STORE response within {self.timeout_seconds:g} s or association aborted"
            logger.warning("%s: SOP instance %s: %s", self.name, info.sop_instance, detail)
            return SendOutcome(info.path, False, None, detail)
        status = int(rsp.Status)
        comment = f" ({rsp.ErrorComment})" if rsp.get("ErrorComment") else ""
        if status == 0x0000:
            return SendOutcome(info.path, True, status, f"stored{note}")
        if status in STORED_WARNINGS:
            return SendOutcome(info.path, True, status, f"stored with warning {status_text(status)}{comment}{note}")
        detail = f"PACS refused the store: {status_text(status)}{comment}"
        logger.warning("%s: SOP instance %s: %s", self.name, info.sop_instance, detail)
        return SendOutcome(info.path, False, status, detail)

    @staticmethod
    def _as_uncompressed(info: _FileInfo) -> tuple[Dataset, str]:
        """Decode the file into an uncompressed dataset pynetdicom can encode for any accepted TS."""
        ds = pydicom.dcmread(info.path)
        tsyntax = info.transfer_syntax
        if tsyntax.is_compressed and "PixelData" in ds:
            ds.decompress()  # sets the file meta to Explicit VR Little Endian
            return ds, f" (decompressed from {tsyntax.name}: PACS refused it)"
        if tsyntax == DeflatedExplicitVRLittleEndian or tsyntax.is_compressed:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds, ""


def _context_groups(infos: Sequence[tuple[int, _FileInfo]]) -> list[list[tuple[int, _FileInfo]]]:
    """Split a batch so that no association needs more than MAX_CONTEXTS presentation contexts."""
    groups: list[list[tuple[int, _FileInfo]]] = []
    current: list[tuple[int, _FileInfo]] = []
    keys: set[tuple[UID, UID]] = set()
    for item in infos:
        needed = set(_contexts([item[1]])) - keys
        if current and len(keys) + len(needed) > MAX_CONTEXTS:
            groups.append(current)
            current, keys = [], set()
            needed = set(_contexts([item[1]]))
        keys |= needed
        current.append(item)
    if current:
        groups.append(current)
    return groups


# --------------------------------------------------------------------------- folder


class FolderDestination(Destination):
    """Writes each file as ``SOPInstanceUID.dcm`` atomically (temp file, fsync, rename).

    A reader watching the folder never sees a partial file, and a retry overwrites the same name
    instead of duplicating the instance.
    """

    def __init__(self, name: str, folder: Path) -> None:
        self.name = name
        self.folder = Path(folder)

    def __repr__(self) -> str:
        return f"FolderDestination({self.name!r}: {self.folder})"

    def send(self, paths: Sequence[Path]) -> list[SendOutcome]:
        if not paths:
            return []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            detail = f"cannot create folder {self.folder}: {exc.strerror or exc}"
            logger.warning("%s: %s", self.name, detail)
            return [SendOutcome(Path(p), False, None, detail) for p in paths]
        outcomes = [self._write_one(Path(p)) for p in paths]
        if any(o.ok for o in outcomes):
            _fsync_dir(self.folder)
        sent = sum(o.ok for o in outcomes)
        (logger.info if sent == len(outcomes) else logger.warning)("%s: %d of %d written", self.name, sent, len(outcomes))
        return outcomes

    def _write_one(self, path: Path) -> SendOutcome:
        try:
            sop_instance = _read_meta(path).sop_instance
        except Exception as exc:  # noqa: BLE001
            return SendOutcome(path, False, None, f"cannot read DICOM file: {exc}")
        if not _UID_RE.match(sop_instance) or len(sop_instance) > 64:
            return SendOutcome(path, False, None, f"invalid SOP Instance UID {sop_instance!r}")
        target = self.folder / f"{sop_instance}.dcm"
        tmp_name = None
        try:
            with open(path, "rb") as src, tempfile.NamedTemporaryFile(
                dir=self.folder, prefix=".incoming-", suffix=".tmp", delete=False
            ) as dst:
                tmp_name = dst.name
                shutil.copyfileobj(src, dst, 1 << 20)
                dst.flush()
                os.fsync(dst.fileno())
            os.chmod(tmp_name, 0o644)
            os.replace(tmp_name, target)
            tmp_name = None
        except OSError as exc:
            return SendOutcome(path, False, None, f"cannot write {target}: {exc.strerror or exc}")
        finally:
            if tmp_name is not None:
                try:
                    os.unlink(tmp_name)
                except OSError:
                    pass
        return SendOutcome(path, True, None, f"written to {target}")


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable (POSIX: the directory entry lives in the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- factory


def make_destinations(config: NodeConfig) -> dict[str, Destination]:
    """One Destination per configured name. TLS material is loaded now (fails at start-up)."""
    out: dict[str, Destination] = {}
    for name, cfg in config.destinations.items():
        if isinstance(cfg, FolderDestinationConfig):
            out[name] = FolderDestination(name, cfg.folder)
        else:
            out[name] = DicomDestination.from_config(name, cfg, config.node.ae_title)
    return out
