"""Test factories: DICOM datasets and series, the node's settings objects, free ports. One place for each.

Datasets get deterministic UIDs from seed strings (reruns are identical) and the patient module of
:class:`Patient`, so privacy tests can look for those exact values in logs and outputs.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    CTImageStorage,
    ExplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from dicomnode.config import NodeSettings, StorageConfig
from dicomnode.observe import Observer
from dicomnode.receive import Receiver
from dicomnode.spool import Spool

UID_ROOT = "1.2.826.0.1.3680043.10.1234."  # test-only UIDs, deterministic from a seed string


def uid(seed: str) -> str:
    return generate_uid(prefix=UID_ROOT, entropy_srcs=[seed])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bundled(name: str) -> Path:
    """A file bundled with pydicom (skips when the installed pydicom lacks it)."""
    from pydicom.data import get_testdata_file

    path = get_testdata_file(name, download=False)
    if path is None:
        pytest.skip(f"pydicom test file {name} is not installed")
    return Path(path)


@dataclass(frozen=True)
class Patient:
    name: str = "Testpatient^Alice"
    patient_id: str = "PID-000001"
    birth_date: str = "19700101"


def ct_dataset(study: str, series: str, index: int, *, patient: Patient = Patient(), rows: int = 16,
               cols: int = 16, modality: str = "CT", pixels: np.ndarray | None = None) -> Dataset:
    """A small but complete CT image; UIDs derived from (study, series, index) so reruns are identical."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid(f"{study}/{series}/{index}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(f"{study}")
    ds.SeriesInstanceUID = uid(f"{study}/{series}")
    ds.FrameOfReferenceUID = uid(f"{study}/for")
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = "O"
    ds.StudyDate = "20240101"
    ds.StudyTime = "120000"
    ds.AccessionNumber = "ACC1"
    ds.ReferringPhysicianName = ""
    ds.StudyID = "1"
    ds.Modality = modality
    ds.Manufacturer = "test"
    ds.SeriesNumber = 1
    ds.InstanceNumber = index + 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.ImagePositionPatient = [0, 0, float(index)]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [1, 1]
    ds.SliceThickness = 1
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.WindowCenter, ds.WindowWidth = 40, 400
    if pixels is None:
        rng = np.random.default_rng(abs(hash((study, series, index))) % 2**32)
        pixels = rng.integers(0, 4096, size=(rows, cols), dtype=np.uint16)
    ds.PixelData = pixels.astype(np.uint16).tobytes()
    return ds


def write_series(folder: Path, study: str, series: str, count: int, **kwargs: Any) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        ds = ct_dataset(study, series, i, **kwargs)
        path = folder / f"{series}_{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def sop_uids(folder: Path) -> list[str]:
    """SOPInstanceUID of every DICOM file under ``folder`` (duplicates kept, so callers can count them)."""
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                out.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            except Exception:  # noqa: BLE001 - temp files of a peer mid-write are not results
                continue
    return out




def image_dataset(pixels: np.ndarray, *, study: str = "study", series: str = "series", index: int = 0,
                  modality: str = "OT", patient: Patient = Patient(), description: str = "", **attrs: Any) -> Dataset:
    """A Secondary Capture image holding ``pixels`` (uint8/uint16 gray (H, W) or uint8 RGB (H, W, 3))."""
    arr = np.asarray(pixels)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid(f"{study}/{series}/{index}")
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = uid(study)
    ds.SeriesInstanceUID = uid(f"{study}/{series}")
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = patient.name, patient.patient_id, patient.birth_date, "O"
    ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber, ds.ReferringPhysicianName = "20240101", "120000", "1", "ACC1", ""
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = modality, 1, index + 1
    ds.ConversionType = "WSD"
    ds.PatientOrientation = ""
    if description:
        ds.SeriesDescription = description
    ds.Rows, ds.Columns = arr.shape[:2]
    bits = 16 if arr.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if arr.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.PixelData = np.ascontiguousarray(arr).tobytes()
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def write(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


class StoreCounts(Observer):
    """An observer that keeps what the receiver reports: each C-STORE's status and the bytes read."""

    def __init__(self) -> None:
        self.statuses: list[int] = []
        self.bytes = 0

    def stored(self, status: int, seconds: float) -> None:
        self.statuses.append(status)

    def received_bytes(self, count: int) -> None:
        self.bytes += count


def start_receiver(root: Path, *, storage: Mapping[str, Any] | None = None, **node: Any) -> tuple[Receiver, Spool]:
    """A receiving SCP on loopback over a fresh spool at ``root`` (``node.*`` and ``storage.*`` settings as in the config)."""
    spool = Spool(root)
    settings = NodeSettings(**{"host": "127.0.0.1", "port": free_port(), **node})
    receiver = Receiver(spool, settings, StorageConfig(root=root, **(storage or {})))
    receiver.start()
    return receiver, spool


def node_settings(**node: Any) -> NodeSettings:
    return NodeSettings(**node)


def config_data(root: Path, port: int, destinations: Mapping[str, Any], **sections: Any) -> dict[str, Any]:
    """A minimal valid config mapping: loopback node, storage at ``root``, CLAHE for CT unless overridden."""
    names = list(destinations)
    data: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "series_quiet_seconds": 1.0},
        "storage": {"root": str(root)},
        "destinations": dict(destinations),
        "models": {"clahe": {"kind": "clahe"}},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": names}],
    }
    data.update(sections)
    return data


def read(path: Path) -> Dataset:
    return pydicom.dcmread(path)


@dataclass
class Decoded:
    frames: list[np.ndarray]
    voi: list[str]


def decode(ds: Dataset) -> Decoded:
    """Every frame of ``ds`` as the node decodes it (float [0, 1]) and the VOI transform used per frame."""
    from dicomnode.imaging import iter_frames, pixel_info

    pairs = list(iter_frames(ds, pixel_info(ds)))
    return Decoded([f for f, _ in pairs], [v for _, v in pairs])


def sample(name: str) -> Dataset:
    """A file bundled with pydicom, read (skips when the installed pydicom lacks it)."""
    return pydicom.dcmread(bundled(name))


def sample_series(name: str, folder: Path, count: int, *, description: str | None = None) -> list[Path]:
    """``count`` instances of a file bundled with pydicom in one new series (fresh Series/SOP UIDs)."""
    from pydicom.uid import generate_uid

    ds = sample(name)
    ds.SeriesInstanceUID = generate_uid()
    if description is not None:
        ds.SeriesDescription = description
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(count):
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        path = folder / f"{Path(name).stem}_{i}.dcm"
        ds.save_as(path)
        out.append(path)
    return out


@contextmanager
def node_with_admin_service(config_path: Path) -> Iterator[tuple[Any, Any]]:
    """The node of ``config_path`` started in-process with its admin service (HTTP API, metrics, page):
    yields (server, admin); stopped on exit."""
    from dicomnode.admin.metrics import Metrics
    from dicomnode.admin.service import AdminService
    from dicomnode.config import load_config
    from dicomnode.server import Server, ServerOptions

    config = load_config(config_path)
    metrics = Metrics()
    admin = AdminService(config.admin, metrics)
    server = Server(config, observer=metrics, addons=[admin], config_path=config_path,
                    options=ServerOptions(drain_seconds=5, dispatch_poll_seconds=0.1))
    server.start()
    try:
        yield server, admin
    finally:
        server.stop()


def read_ascii_pnm(path: Path) -> np.ndarray:
    """An ASCII PGM/PPM (as dcmj2pnm +opw writes it) as float [0, 1], (H, W) or (H, W, 3)."""
    tokens = [t for line in path.read_text().splitlines() for t in line.split("#")[0].split()]
    magic, width, height, maxval = tokens[0], int(tokens[1]), int(tokens[2]), int(tokens[3])
    channels = 3 if magic == "P3" else 1
    values = np.array(tokens[4:4 + width * height * channels], dtype=np.float64) / maxval
    return values.reshape((height, width, 3) if channels == 3 else (height, width))
