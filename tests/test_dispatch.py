"""Dispatch: C-STORE SCU against real peers (an in-process pynetdicom SCP, and dcmtk storescp in the
slow tests), folder destination, backoff."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGLosslessSV1,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)
from pynetdicom import AE, evt

from dicomnode.config import DispatchPolicy, parse_config
from dicomnode.destinations import SendOutcome
from dicomnode.destinations.dicom import MAX_CONTEXTS, DicomDestination, FileMeta, context_groups, presentation_contexts
from dicomnode.destinations.folder import FolderDestination
from dicomnode.dispatch import backoff_seconds
from dicomnode.server import make_destinations

from conftest import require_tools

UNCOMPRESSED = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


# --------------------------------------------------------------------------- helpers


def write_image(path: Path, *, sop_class: str = SecondaryCaptureImageStorage, seed: int = 0,
                compress: str | None = None, size: int = 32) -> Path:
    rng = np.random.default_rng(seed)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.Modality = "OT"
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = rng.integers(0, 256, (size, size), dtype=np.uint8).tobytes()
    if compress:
        ds.compress(compress)
    ds.save_as(path, enforce_file_format=True)
    return path


def sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


class FakePACS:
    """An in-process pynetdicom SCP recording what it stores and how many associations it saw."""

    def __init__(self, port: int, *, status: int | Callable[[Any], int] = 0x0000, transfer_syntaxes: Sequence[str] | None = None,
                 sop_classes: Sequence[str] = (SecondaryCaptureImageStorage,), require_called_aet: bool = False,
                 ssl_context: Any = None) -> None:
        self.port = port
        self.ssl_context = ssl_context
        self.status = status
        self.received: list[Dataset] = []
        self.transfer_syntaxes: list[str] = []
        self.associations = 0
        ae = AE(ae_title="PACS")
        ae.require_called_aet = require_called_aet
        for sop in sop_classes:
            if transfer_syntaxes is None:
                ae.add_supported_context(sop, [*UNCOMPRESSED, RLELossless, JPEGLosslessSV1])
            else:
                ae.add_supported_context(sop, list(transfer_syntaxes))
        self.ae = ae
        self.server: Any = None

    def _on_store(self, event: Any) -> int:
        ds = event.dataset
        ds.file_meta = event.file_meta
        self.received.append(ds)
        self.transfer_syntaxes.append(str(event.context.transfer_syntax))
        return self.status(event) if callable(self.status) else self.status

    def _on_established(self, event: Any) -> None:
        self.associations += 1

    def __enter__(self) -> FakePACS:
        handlers = [(evt.EVT_C_STORE, self._on_store), (evt.EVT_ESTABLISHED, self._on_established)]
        self.server = self.ae.start_server(("127.0.0.1", self.port), block=False, evt_handlers=handlers,
                                           ssl_context=self.ssl_context)
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()


def destination(port: int, **kwargs: Any) -> DicomDestination:
    kwargs.setdefault("timeout_seconds", 5)
    return DicomDestination("pacs", kwargs.pop("ae_title", "PACS"), "127.0.0.1", port, calling_ae_title="DICOMNODE",
                            **kwargs)


# --------------------------------------------------------------------------- backoff


def test_backoff_doubles_and_is_capped() -> None:
    policy = DispatchPolicy(backoff_initial_seconds=2, backoff_max_seconds=30)
    assert [backoff_seconds(n, policy) for n in range(1, 7)] == [2, 4, 8, 16, 30, 30]
    assert backoff_seconds(10_000, policy) == 30
    with pytest.raises(ValueError, match="attempt"):
        backoff_seconds(0, policy)


# --------------------------------------------------------------------------- DICOM, in-process peer


def test_batch_is_stored_in_one_association(tmp_path: Path, free_port: int) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(4)]
    files.append(write_image(tmp_path / "ct.dcm", sop_class=CTImageStorage, seed=9))
    with FakePACS(free_port, sop_classes=(SecondaryCaptureImageStorage, CTImageStorage)) as pacs:
        outcomes = destination(free_port).send(files)
    assert [o.ok for o in outcomes] == [True] * 5
    assert [o.path for o in outcomes] == files
    assert all(o.status == 0 and o.detail == "stored" for o in outcomes)
    assert pacs.associations == 1
    assert sorted(str(ds.SOPInstanceUID) for ds in pacs.received) == sorted(sop_uid(f) for f in files)


def test_compressed_file_goes_as_is_when_accepted(tmp_path: Path, free_port: int) -> None:
    path = write_image(tmp_path / "rle.dcm", compress=RLELossless, size=64)
    with FakePACS(free_port) as pacs:
        (outcome,) = destination(free_port).send([path])
    assert outcome.ok and outcome.detail == "stored"
    assert pacs.transfer_syntaxes == [RLELossless]


def test_compressed_file_is_decompressed_when_refused(tmp_path: Path, free_port: int) -> None:
    path = write_image(tmp_path / "rle.dcm", compress=RLELossless, size=64, seed=3)
    plain = write_image(tmp_path / "plain.dcm", seed=4)
    with FakePACS(free_port, transfer_syntaxes=[ImplicitVRLittleEndian]) as pacs:
        outcomes = destination(free_port).send([path, plain])
    assert [o.ok for o in outcomes] == [True, True]
    assert "decompressed from RLE Lossless" in outcomes[0].detail
    assert pacs.transfer_syntaxes == [ImplicitVRLittleEndian, ImplicitVRLittleEndian]
    sent = pacs.received[0]
    assert np.array_equal(sent.pixel_array, pydicom.dcmread(path).pixel_array)


@pytest.mark.parametrize(("status", "ok", "fragment"), [
    (0xA700, False, "0xA700 Refused: Out of Resources"),
    (0xA900, False, "0xA900 Data Set Does Not Match SOP Class"),
    (0xC123, False, "0xC123 Cannot Understand"),
    (0x0110, False, "0x0110 Processing Failure"),
    (0xB000, True, "stored with warning 0xB000"),
    (0xB007, True, "stored with warning 0xB007"),
])
def test_store_status_decides_the_outcome(tmp_path: Path, free_port: int, status: int, ok: bool, fragment: str) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(2)]
    with FakePACS(free_port, status=status):
        outcomes = destination(free_port).send(files)
    assert [o.ok for o in outcomes] == [ok, ok]
    assert all(o.status == status and fragment in o.detail for o in outcomes), outcomes


def test_only_refused_instances_fail(tmp_path: Path, free_port: int) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(3)]
    refused = sop_uid(files[1])
    with FakePACS(free_port, status=lambda e: 0xA700 if e.request.AffectedSOPInstanceUID == refused else 0):
        outcomes = destination(free_port).send(files)
    assert [(o.ok, o.status) for o in outcomes] == [(True, 0), (False, 0xA700), (True, 0)]


def test_handler_error_is_a_failure_not_sent(tmp_path: Path, free_port: int) -> None:
    def explode(event: Any) -> int:
        raise RuntimeError("disk on fire")

    with FakePACS(free_port, status=explode):
        (outcome,) = destination(free_port).send([write_image(tmp_path / "a.dcm")])
    assert not outcome.ok and outcome.status == 0xC211


def test_pacs_down_gives_failed_outcomes_not_exceptions(tmp_path: Path, free_port: int) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(2)]
    start = time.monotonic()
    outcomes = destination(free_port).send(files)
    assert time.monotonic() - start < 5
    assert [o.ok for o in outcomes] == [False, False]
    assert all(o.status is None and "cannot connect to PACS@127.0.0.1" in o.detail and "connection refused" in o.detail
               for o in outcomes)


def test_wrong_called_ae_is_rejected(tmp_path: Path, free_port: int) -> None:
    with FakePACS(free_port, require_called_aet=True) as pacs:
        (outcome,) = destination(free_port, ae_title="NOTPACS").send([write_image(tmp_path / "a.dcm")])
    assert not outcome.ok and outcome.status is None
    assert "association rejected by NOTPACS@127.0.0.1" in outcome.detail
    assert "Called AE title not recognised" in outcome.detail
    assert pacs.received == []


def test_refused_sop_class_fails_that_file_only(tmp_path: Path, free_port: int) -> None:
    sc = write_image(tmp_path / "sc.dcm")
    ct = write_image(tmp_path / "ct.dcm", sop_class=CTImageStorage)
    with FakePACS(free_port, sop_classes=(SecondaryCaptureImageStorage,)):
        outcomes = destination(free_port).send([ct, sc])
    assert [o.ok for o in outcomes] == [False, True]
    assert "refused SOP class CT Image Storage" in outcomes[0].detail


def test_no_accepted_context_at_all(tmp_path: Path, free_port: int) -> None:
    ct = write_image(tmp_path / "ct.dcm", sop_class=CTImageStorage)
    with FakePACS(free_port, sop_classes=(SecondaryCaptureImageStorage,)):
        (outcome,) = destination(free_port).send([ct])
    assert not outcome.ok and "accepted none of the proposed presentation contexts" in outcome.detail


def test_unreadable_file_fails_alone(tmp_path: Path, free_port: int) -> None:
    good = write_image(tmp_path / "good.dcm")
    bad = tmp_path / "bad.dcm"
    bad.write_text("not dicom")
    with FakePACS(free_port) as pacs:
        outcomes = destination(free_port).send([bad, good, tmp_path / "missing.dcm"])
    assert [o.ok for o in outcomes] == [False, True, False]
    assert "cannot read DICOM file" in outcomes[0].detail and "cannot read DICOM file" in outcomes[2].detail
    assert len(pacs.received) == 1


def test_no_response_within_timeout_fails_and_the_rest_of_the_batch_too(tmp_path: Path, free_port: int) -> None:
    release = threading.Event()

    def slow(event: Any) -> int:
        release.wait(5)
        return 0

    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(2)]
    with FakePACS(free_port, status=slow):
        outcomes = destination(free_port, timeout_seconds=0.5).send(files)
        release.set()
    assert [o.ok for o in outcomes] == [False, False]
    assert "no C-STORE response within 0.5 s" in outcomes[0].detail
    assert "association ended" in outcomes[1].detail


def test_empty_batch_opens_nothing(free_port: int) -> None:
    assert destination(free_port).send([]) == []


@pytest.mark.slow
def test_tls_destination_stores_and_wrong_ca_fails(tmp_path: Path, free_port: int) -> None:
    require_tools("openssl")
    from dicomnode.security import server_ssl_context

    from reliability import make_certs

    certs = make_certs(tmp_path / "certs")
    server_ctx = server_ssl_context({"cert": certs.server_cert, "key": certs.server_key, "ca": certs.ca,
                                     "require_client_cert": True})

    def dest(tls: dict[str, Any] | None) -> DicomDestination:
        config = parse_config({
            "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port,
                                      "timeout_seconds": 5, **({"tls": tls} if tls else {})}},
            "rules": [{"name": "fwd", "destinations": ["pacs"]}]}, tmp_path)
        d = make_destinations(config)["pacs"]
        assert isinstance(d, DicomDestination)
        return d

    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(2)]
    good = {"ca": str(certs.ca), "cert": str(certs.client_cert), "key": str(certs.client_key)}
    with FakePACS(free_port, ssl_context=server_ctx) as pacs:
        assert [o.ok for o in dest(good).send(files)] == [True, True]
        assert len(pacs.received) == 2
        # The PACS certificate does not chain to this CA: failed outcomes, nothing raised.
        wrong_ca = dest({**good, "ca": str(certs.rogue_cert)}).send(files[:1])
        no_client_cert = dest({"ca": str(certs.ca)}).send(files[:1])
        plain = dest(None).send(files[:1])
    for outcome in (*wrong_ca, *no_client_cert, *plain):
        assert not outcome.ok and outcome.status is None and "PACS@127.0.0.1" in outcome.detail
    assert "TLS handshake" in wrong_ca[0].detail and "CERTIFICATE_VERIFY_FAILED" in wrong_ca[0].detail
    assert "client certificate" in no_client_cert[0].detail
    assert "TLS-only port" in plain[0].detail
    assert len(pacs.received) == 2


def test_large_mixed_batches_are_split_to_fit_the_context_limit() -> None:
    infos = [(i, FileMeta(Path(f"{i}.dcm"), UID(f"1.2.3.{i % 60}"), UID(f"1.2.4.{i}"),
                          RLELossless if i % 2 else ExplicitVRLittleEndian)) for i in range(200)]
    groups = context_groups(infos)
    assert [item for group in groups for item in group] == infos  # order kept, nothing lost
    assert len(groups) > 1
    assert all(len(presentation_contexts([info for _, info in group])) <= MAX_CONTEXTS for group in groups)


# --------------------------------------------------------------------------- folder


def test_folder_destination_writes_atomically_named_by_sop_uid(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(3)]
    out = tmp_path / "outbox" / "nested"
    synced: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd))[1])
    outcomes = FolderDestination("archive", out).send(files)
    assert [o.ok for o in outcomes] == [True] * 3 and all(o.status is None for o in outcomes)
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{sop_uid(f)}.dcm" for f in files)
    for f in files:
        assert (out / f"{sop_uid(f)}.dcm").read_bytes() == f.read_bytes()
    assert len(synced) >= 4  # each file, then the folder
    # A retry overwrites the same names instead of duplicating.
    assert all(o.ok for o in FolderDestination("archive", out).send(files))
    assert len(list(out.iterdir())) == 3


def test_folder_destination_leaves_no_partial_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_image(tmp_path / "a.dcm")
    out = tmp_path / "out"

    def broken_replace(src: Any, dst: Any) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken_replace)
    (outcome,) = FolderDestination("archive", out).send([path])
    assert not outcome.ok and "No space left on device" in outcome.detail
    assert list(out.iterdir()) == []  # neither the target nor the temp file


def test_folder_destination_failures_are_outcomes(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    path = write_image(tmp_path / "a.dcm")
    (outcome,) = FolderDestination("archive", blocker / "sub").send([path])
    assert not outcome.ok and "cannot create folder" in outcome.detail
    bad = tmp_path / "bad.dcm"
    bad.write_text("nope")
    outcomes = FolderDestination("archive", tmp_path / "out").send([bad, path])
    assert [o.ok for o in outcomes] == [False, True]


def test_make_destinations_from_config(tmp_path: Path) -> None:
    config = parse_config({
        "node": {"ae_title": "NODE1"},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "10.0.0.5", "port": 104, "timeout_seconds": 7},
                         "other": {"ae_title": "OTHER", "host": "h", "port": 11112, "calling_ae_title": "ME"},
                         "out": {"folder": "outbox"}},
        "rules": [{"name": "fwd", "destinations": ["pacs"]}],
    }, tmp_path)
    dests = make_destinations(config)
    pacs, other, out = dests["pacs"], dests["other"], dests["out"]
    assert isinstance(pacs, DicomDestination) and isinstance(other, DicomDestination)
    assert (pacs.ae_title, pacs.host, pacs.port, pacs.calling_ae_title, pacs.timeout_seconds) == (
        "PACS", "10.0.0.5", 104, "NODE1", 7)
    assert other.calling_ae_title == "ME" and pacs.tls_args is None
    assert isinstance(out, FolderDestination) and out.folder == tmp_path / "outbox"


# --------------------------------------------------------------------------- DICOM, dcmtk storescp (slow)


def listening(port: int) -> bool:
    """Whether a socket listens on ``port``, seen in /proc without connecting.

    A probe connection would be taken by storescp (without --fork) as a failed association and
    could race with the association under test.
    """
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:  # 0A = LISTEN
                return True
    if not Path("/proc/net/tcp").exists():  # not Linux: fall back to a probe connection
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return True
        except OSError:
            return False
    return False


@contextmanager
def storescp(folder: Path, port: int, *args: str) -> Iterator[subprocess.Popen]:
    require_tools("storescp")
    folder.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "TCP_NODELAY": "1"}
    proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(folder), *args, str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while not listening(port):
            if proc.poll() is not None:
                raise RuntimeError(f"storescp exited with {proc.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"storescp not listening on {port}")
            time.sleep(0.05)
        yield proc
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(10)


def jpeg_file(src: Path, dst: Path) -> Path:
    require_tools("dcmcjpeg")
    subprocess.run(["dcmcjpeg", "+e1", str(src), str(dst)], check=True, capture_output=True)  # JPEG lossless SV1
    return dst


def received(folder: Path) -> dict[str, Dataset]:
    out = {}
    for p in folder.iterdir():
        ds = pydicom.dcmread(p)
        out[str(ds.SOPInstanceUID)] = ds
    return out


def wait_for_files(folder: Path, count: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while len(list(folder.iterdir())) < count and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.slow
def test_storescp_receives_a_batch(tmp_path: Path, free_port: int) -> None:
    files = [write_image(tmp_path / f"{i}.dcm", seed=i) for i in range(5)]
    files.append(jpeg_file(write_image(tmp_path / "src.dcm", seed=7, size=64), tmp_path / "jpeg.dcm"))
    out = tmp_path / "pacs"
    with storescp(out, free_port, "+xa"):
        outcomes = destination(free_port).send(files)
        wait_for_files(out, len(files))
    assert [o.ok for o in outcomes] == [True] * len(files), outcomes
    got = received(out)
    assert set(got) == {sop_uid(f) for f in files}
    jpeg_uid = sop_uid(files[-1])
    assert got[jpeg_uid].file_meta.TransferSyntaxUID == JPEGLosslessSV1  # sent as stored, not transcoded
    for f in files[:5]:
        assert got[sop_uid(f)].PixelData == pydicom.dcmread(f).PixelData


@pytest.mark.slow
def test_storescp_uncompressed_only_gets_decompressed_jpeg(tmp_path: Path, free_port: int) -> None:
    src = write_image(tmp_path / "src.dcm", seed=11, size=64)
    jpeg = jpeg_file(src, tmp_path / "jpeg.dcm")
    out = tmp_path / "pacs"
    with storescp(out, free_port):  # default: uncompressed transfer syntaxes only
        (outcome,) = destination(free_port).send([jpeg])
        wait_for_files(out, 1)
    assert outcome.ok and "decompressed from JPEG Lossless" in outcome.detail
    (ds,) = received(out).values()
    assert not ds.file_meta.TransferSyntaxUID.is_compressed
    assert np.array_equal(ds.pixel_array, pydicom.dcmread(src).pixel_array)  # lossless round trip


@pytest.mark.slow
def test_storescp_refusing_associations_gives_failed_outcomes(tmp_path: Path, free_port: int) -> None:
    with storescp(tmp_path / "pacs", free_port, "--refuse"):
        outcomes = destination(free_port).send([write_image(tmp_path / "a.dcm")])
    assert not outcomes[0].ok and "association rejected by PACS@127.0.0.1" in outcomes[0].detail


def test_send_outcome_is_immutable() -> None:
    outcome = SendOutcome(Path("a"), True, 0, "stored")
    with pytest.raises(AttributeError):
        outcome.ok = False  # type: ignore[misc]

