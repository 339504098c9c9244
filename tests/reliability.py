"""Shared helpers for the reliability tests: certificates, synthetic studies, dcmtk peers, a node process.

Everything runs over loopback with real processes: ``storescp`` as the PACS, ``dcmsend``/``echoscu`` as
the modality and ``dicomnode serve`` as the node, so the tests see what a site would see.
"""

from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pydicom
import yaml
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from dicomnode.ledger import DeliveryState, JobState, Ledger, LedgerError

from factories import Patient, ct_dataset, free_port, sop_uids, uid, write_series  # noqa: F401 (re-exported)

REPO = Path(__file__).resolve().parents[1]
DICOMNODE = REPO / ".venv" / "bin" / "dicomnode"
def wait_port(port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    """Wait until something accepts TCP connections on loopback ``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on {port}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listening on port {port} after {timeout} s")


# ----------------------------------------------------------------------------------------------- TLS
@dataclass(frozen=True)
class Certs:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # self-signed, not from the CA
    rogue_key: Path


def _openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_certs(folder: Path) -> Certs:
    """A private CA, a server and a client certificate signed by it, and a rogue self-signed one."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = folder / "ca.key", folder / "ca.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca),
             "-days", "2", "-subj", "/CN=dicomnode test CA",
             "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    pairs = {}
    for name in ("server", "client"):
        key, csr, cert = folder / f"{name}.key", folder / f"{name}.csr", folder / f"{name}.pem"
        _openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
                 "-subj", f"/CN=dicomnode test {name}")
        ext = folder / f"{name}.ext"
        usage = "serverAuth" if name == "server" else "clientAuth"
        ext.write_text(f"basicConstraints=CA:FALSE\nextendedKeyUsage={usage}\n"
                       "subjectAltName=DNS:localhost,IP:127.0.0.1\n")
        _openssl("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
                 "-out", str(cert), "-days", "2", "-extfile", str(ext))
        pairs[name] = (cert, key)
    rogue_key, rogue = folder / "rogue.key", folder / "rogue.pem"
    _openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(rogue_key), "-out", str(rogue),
             "-days", "2", "-subj", "/CN=rogue")
    return Certs(ca, *pairs["server"], *pairs["client"], rogue, rogue_key)


# ----------------------------------------------------------------------------------------------- peers
def tool_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"  # dcmtk leaves Nagle on otherwise: slow small PDUs
    return env


def echoscu(port: int, *, aet: str = "MODALITY", aec: str = "DICOMNODE", tls: Sequence[str] = (),
            timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(["echoscu", "-aet", aet, "-aec", aec, "-to", "10", "-ta", "10", "-td", "10",
                           *tls, "127.0.0.1", str(port)], capture_output=True, text=True, timeout=timeout,
                          env=tool_env())


def dcmsend(port: int, paths: Iterable[Path], *, aet: str = "MODALITY", aec: str = "DICOMNODE",
            tls: Sequence[str] = (), extra: Sequence[str] = (), timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(["dcmsend", "-aet", aet, "-aec", aec, "-to", "10", "-ta", "10", "-td", "30",
                           *tls, *extra, "127.0.0.1", str(port), *map(str, paths)],
                          capture_output=True, text=True, timeout=timeout, env=tool_env())


class StoreSCP:
    """``storescp`` as the PACS: receives into ``folder``; TLS when ``certs`` is given."""

    def __init__(self, folder: Path, *, port: int | None = None, aet: str = "PACS", certs: Certs | None = None):
        self.folder = folder
        self.port = port or free_port()
        self.aet = aet
        self.certs = certs
        self.proc: subprocess.Popen | None = None
        self.log = folder.parent / f"storescp_{self.port}.log"

    def start(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        tls: list[str] = []
        if self.certs is not None:
            tls = ["+tls", str(self.certs.server_key), str(self.certs.server_cert), "+cf", str(self.certs.ca),
                   "-vc"]
        self.proc = subprocess.Popen(
            ["storescp", "-aet", self.aet, "-od", str(self.folder), "+xa", "+uf", "--fork", *tls, str(self.port)],
            stdout=self.log.open("ab"), stderr=subprocess.STDOUT, env=tool_env(), start_new_session=True)
        wait_port(self.port, 15, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # --fork children are in its own process group
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def __enter__(self) -> StoreSCP:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ----------------------------------------------------------------------------------------------- node
def node_config(root: Path, port: int, destinations: Mapping[str, Any], *, rules: list[dict] | None = None,
                node: Mapping[str, Any] | None = None, storage: Mapping[str, Any] | None = None,
                dispatch: Mapping[str, Any] | None = None, log_file: Path | None = None,
                models: Mapping[str, Any] | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """A config dict (the YAML schema of dicomnode.config) for a node on loopback; CLAHE by default."""
    dest_names = list(destinations)
    cfg: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "series_quiet_seconds": 1.0,
                 **(node or {})},
        "storage": {"root": str(root), **(storage or {})},
        "destinations": dict(destinations),
        "models": dict(models) if models is not None else {"clahe": {"kind": "clahe"}},
        "rules": rules if rules is not None else [
            {"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": dest_names}],
        "dispatch": {"max_attempts": 5, "backoff_initial_seconds": 0.5, "backoff_max_seconds": 2.0,
                     **(dispatch or {})},
        "logging": {"level": "INFO", **({"file": str(log_file)} if log_file else {})},
    }
    cfg.update(extra or {})
    return cfg


class NodeProcess:
    """``dicomnode serve`` as a subprocess (so it can be SIGKILLed and restarted like in production).

    ``prefix`` runs it under another command (``prlimit --as=N --``); ``env`` adds environment variables.
    """

    def __init__(self, workdir: Path, config: Mapping[str, Any], *, prefix: Sequence[str] = (),
                 env: Mapping[str, str] | None = None):
        self.workdir = workdir
        self.config = dict(config)
        self.prefix = list(prefix)
        self.env = dict(env or {})
        self.port = int(config["node"]["port"])
        self.config_path = workdir / "node.yaml"
        self.stderr_path = workdir / "node.stderr.log"
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, timeout: float = 60) -> NodeProcess:
        if not DICOMNODE.exists():
            raise RuntimeError(f"{DICOMNODE} not found: run `make setup`")
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(yaml.safe_dump(self.config, sort_keys=False))
        self.starts += 1
        offset = self.stderr_path.stat().st_size if self.stderr_path.exists() else 0
        self.proc = subprocess.Popen([*self.prefix, str(DICOMNODE), "serve", "--config", str(self.config_path)],
                                     stdout=subprocess.DEVNULL, stderr=self.stderr_path.open("ab"),
                                     cwd=self.workdir, env={**tool_env(), **self.env})
        # Wait for the node's own "listening" line rather than probing the port: a bare TCP connect
        # would leave the SCP waiting for an A-ASSOCIATE-RQ (ACSE timeout) and slow its shutdown.
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"dicomnode serve exited with {self.proc.returncode}:\n{self.stderr()[offset:]}")
            with self.stderr_path.open("rb") as fh:
                fh.seek(offset)
                if b"listening as" in fh.read():
                    return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"dicomnode serve not listening after {timeout} s:\n{self.stderr()[offset:]}")
            time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no clean-up handlers run, as in a power cut or an OOM kill."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def stop(self) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        rc = self.proc.returncode
        self.proc = None
        return rc

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace") if self.stderr_path.exists() else ""

    def cli(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        """Run another ``dicomnode`` command (status, resend) on the same config."""
        return subprocess.run([str(DICOMNODE), *args, "--config", str(self.config_path)], capture_output=True,
                              text=True, timeout=timeout, cwd=self.workdir)

    def __enter__(self) -> NodeProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def wait_until(predicate, timeout: float, interval: float = 0.2, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout} s waiting for {what}")


# ----------------------------------------------------------------------------------------------- raw SCU
@dataclass(frozen=True)
class RawObject:
    """Bytes to send as one C-STORE exactly as given (no encoding, no validation by the sender)."""

    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax: str
    body: bytes


def encoded_body(ds: Dataset) -> bytes:
    """The dataset as it travels over the wire: no preamble, no file meta."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset

    fp = DicomBytesIO()
    ts = ds.file_meta.TransferSyntaxUID
    fp.is_little_endian, fp.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    write_dataset(fp, ds)
    return fp.getvalue()


def raw_object(ds: Dataset, body: bytes | None = None) -> RawObject:
    return RawObject(str(ds.file_meta.MediaStorageSOPClassUID), str(ds.file_meta.MediaStorageSOPInstanceUID),
                     str(ds.file_meta.TransferSyntaxUID), encoded_body(ds) if body is None else body)


def send_raw(port: int, objects: Sequence[RawObject], folder: Path, *, aet: str = "MODALITY",
             aec: str = "DICOMNODE", timeout: float = 30) -> list[int | None]:
    """C-STORE each object's bytes over one pynetdicom association; the status per object.

    None: no status came back (context not accepted, association refused or aborted). Bytes are sent
    from files with pynetdicom's chunked sender, which streams them without parsing, so malformed
    datasets reach the peer as they are.
    """
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info
    from pynetdicom import AE, _config
    from pynetdicom.presentation import build_context

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, obj in enumerate(objects):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = obj.sop_class_uid
        meta.MediaStorageSOPInstanceUID = obj.sop_instance_uid
        meta.TransferSyntaxUID = obj.transfer_syntax
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        fp = DicomBytesIO()
        fp.is_little_endian, fp.is_implicit_VR = True, False
        write_file_meta_info(fp, meta, enforce_standard=True)
        path = folder / f"raw_{i:04d}.dcm"
        path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + obj.body)
        paths.append(path)
    ae = AE(ae_title=aet)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    contexts = {(o.sop_class_uid, o.transfer_syntax) for o in objects}
    for sop_class, syntax in sorted(contexts):  # one context per pair: an SCP accepts one syntax per context
        ae.requested_contexts.append(build_context(sop_class, [syntax]))
    previous = _config.STORE_SEND_CHUNKED_DATASET
    _config.STORE_SEND_CHUNKED_DATASET = True
    statuses: list[int | None] = []
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title=aec)
        if not assoc.is_established:
            return [None] * len(objects)
        for path in paths:
            if not assoc.is_established:
                statuses.append(None)
                continue
            try:
                rsp = assoc.send_c_store(path)
            except ValueError:  # no accepted presentation context for this object
                statuses.append(None)
                continue
            statuses.append(int(rsp.Status) if "Status" in rsp else None)
        if assoc.is_established:
            assoc.release()
    finally:
        _config.STORE_SEND_CHUNKED_DATASET = previous
    return statuses


def pacs_sources(folder: Path) -> set[str]:
    """Source SOP Instance UIDs referenced (SourceImageSequence) by the objects a PACS received."""
    out: set[str] = set()
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith("."):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - a peer's temp file
                continue
            out |= {str(item.ReferencedSOPInstanceUID) for item in ds.get("SourceImageSequence", [])}
    return out


# ----------------------------------------------------------------------------------------------- ledger
UNFINISHED_JOBS = (JobState.COLLECTING, JobState.COMPLETE, JobState.PROCESSING, JobState.DERIVED)


class LedgerView:
    """Read-only look at a running node's ledger through its API (SQLite WAL allows a reader beside the writer)."""

    def __init__(self, root: Path):
        self.path = root / "ledger.sqlite3"

    def _ledger(self) -> Ledger | None:
        try:
            return Ledger(self.path, readonly=True)
        except LedgerError:  # the node has not created it yet
            return None

    def jobs(self) -> dict[str, int]:
        ledger = self._ledger()
        try:
            return dict(ledger.counts()["jobs"]) if ledger else {}
        finally:
            if ledger:
                ledger.close()

    def deliveries(self) -> dict[str, int]:
        ledger = self._ledger()
        try:
            return dict(ledger.counts()["deliveries"]) if ledger else {}
        finally:
            if ledger:
                ledger.close()

    def job_records(self):
        ledger = self._ledger()
        try:
            return ledger.jobs() if ledger else []
        finally:
            if ledger:
                ledger.close()

    def delivery_records(self, state: DeliveryState | None = None):
        ledger = self._ledger()
        try:
            return ledger.deliveries(state=state) if ledger else []
        finally:
            if ledger:
                ledger.close()

    def instances(self) -> set[str]:
        ledger = self._ledger()
        try:
            return {i.sop_uid for i in ledger.all_instances()} if ledger else set()
        finally:
            if ledger:
                ledger.close()

    def _rows(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Raw read-only SQL for assertions the Ledger API has no query for (attempt counts, errors)."""
        if not self.path.exists():
            return []
        db = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=10)
        try:
            return db.execute(sql, params).fetchall()
        except sqlite3.OperationalError:  # schema not created yet
            return []
        finally:
            db.close()

    def retried(self) -> int:
        return sum(1 for d in self.delivery_records(DeliveryState.PENDING) if d.attempts > 0)

    def settled(self) -> bool:
        jobs = self.jobs()
        return not any(jobs.get(str(s)) for s in UNFINISHED_JOBS) and not self.deliveries().get("pending")
