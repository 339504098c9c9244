"""The corpus test: every pydicom bundled image plus our own tricky inputs, through `route`, the live node and the pipeline.

The corpus is built here, from pydicom's bundled test files (copied byte for byte, UIDs as they are, so
the files that share a series or a SOP Instance UID keep sharing it) and from inputs made with the
factories: a file without SeriesInstanceUID, two patients under one SeriesInstanceUID, names in
GB18030 / UTF-8 / ISO 2022 IR 149, oblique and invalid PatientOrientation, an invalid StudyDate, gray and
colour cines (FrameTime, FrameTimeVector), OtherPatientIDs, an overlay plane, 1x1..3x3 images, OP/ES/XA
sources and a MONOCHROME1 image.

- ``test_route_agrees_with_the_live_node``: ``dicomnode route`` on the corpus says, file by file and series
  by series, what the live node does with the same files sent by ``dcmsend`` (refused or not; the
  series it files them in; enhance with which rule and model, forward or ignore).
- ``test_every_output_passes_dciodvfy_keeps_modality_and_gray``: every derived object of the offline
  pipeline validates with ``dciodvfy`` and keeps what the source said (Modality, gray, patient bytes,
  cine timing, OtherPatientIDs), never copies an invalid source value, and images below the minimum
  size are skipped with the reason.
"""

from __future__ import annotations

import contextlib
import io
import re
import shutil
import subprocess
import zlib
from collections import Counter
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_charset_files, get_testdata_files
from pydicom.dataelem import RawDataElement
from pydicom.dataset import FileMetaDataset
from pydicom.filereader import _read_file_meta_info, read_preamble
from pydicom.multival import MultiValue
from pydicom.tag import Tag
from pydicom.uid import UID

from dicomnode import cli
from dicomnode.assemble import series_from_files
from dicomnode.config import GatePolicy, parse_config
from dicomnode.domain import Instance, Series
from dicomnode.part10 import read_uids
from dicomnode.pipeline import Pipeline
from dicomnode.resident import ResidentModels
from dicomnode.route import routing_keywords
from dicomnode.server import Server, ServerOptions

from conftest import require_tools
from factories import Patient, ct_dataset, free_port, image_dataset, write
from reliability import RawObject, dcmsend, send_raw, wait_until

MAX_BYTES = 5 * 1024 * 1024
US_MULTIFRAME = UID("1.2.840.10008.5.1.4.1.1.3.1")  # Ultrasound Multi-frame Image Storage

# One rule per modality group to CLAHE, a forward rule and an ignore rule, and an unmatched policy
# that forwards: every decision the node can take appears in the corpus.
RULES: list[dict[str, Any]] = [
    {"name": "radiology", "match": {"Modality": ["CT", "MR", "CR", "DX", "MG", "NM", "PT"]}, "model": "clahe",
     "destinations": ["out"]},
    {"name": "video", "match": {"Modality": ["US", "XA", "ES"]}, "model": "clahe", "destinations": ["out"]},
    {"name": "photo", "match": {"Modality": ["OP", "OT", "XC"]}, "model": "clahe", "destinations": ["out"]},
    {"name": "dose", "match": {"Modality": "RTDOSE"}, "destinations": ["out"]},  # forward untouched
    {"name": "segmentations", "match": {"Modality": "SEG"}},  # ignore
]


def corpus_config(root: Path, port: int = 11112, **node: Any) -> dict[str, Any]:
    return {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "series_quiet_seconds": 2.0, **node},
        "storage": {"root": str(root / "var")},
        "destinations": {"out": {"folder": str(root / "pacs")}},
        "models": {"clahe": {"kind": "clahe"}},
        "rules": RULES,
        "unmatched": {"action": "forward", "destinations": ["out"]},
    }


# ================================================================================================ the corpus
@dataclass(frozen=True)
class CorpusFile:
    path: Path
    origin: str  # "pydicom" or "own"
    note: str  # what it is there for


def _pixels(shape: tuple[int, ...], seed: int, dtype: type = np.uint8) -> np.ndarray:
    """Structured, deterministic pixels (a gradient, a disc and noise), so CLAHE has something to do."""
    rng = np.random.default_rng(seed)
    rows, cols = shape[-3:-1] if len(shape) >= 3 and shape[-1] == 3 else shape[-2:]
    yy, xx = np.mgrid[0:rows, 0:cols]
    base = 0.5 * xx / max(cols - 1, 1) + 0.3 * (((yy - rows / 2) ** 2 + (xx - cols / 2) ** 2) < (min(rows, cols) / 3) ** 2)
    top = 255 if dtype == np.uint8 else 4095
    img = np.clip(base + rng.normal(0, 0.05, size=base.shape), 0, 1) * top
    out = np.broadcast_to(img[..., None] if len(shape) >= 3 and shape[-1] == 3 else img, shape).copy()
    if len(shape) >= 3 and shape[-1] == 3:
        out[..., 1] *= 0.8
        out[..., 2] *= 0.6
    return out.round().astype(dtype)


def write_raw(ds: pydicom.Dataset, path: Path, raw: dict[str, tuple[str, bytes]]) -> Path:
    """Write ``ds`` with the elements in ``raw`` (keyword -> (VR, bytes)) holding exactly those bytes.

    pydicom re-encodes raw elements of a dataset it did not read (it decodes them with the character
    set and encodes them again, which drops a trailing '=' or ESC ( B), so the file is written, read
    back and written again with the raw elements in place: same encoding and character set, bytes kept.
    """
    write(ds, path)
    again = pydicom.dcmread(path)
    for keyword, (vr, value) in raw.items():
        tag = Tag(keyword)
        again[tag] = RawDataElement(tag, vr, len(value), value, 0, False, True)
    again.save_as(path, enforce_file_format=True)
    return path


def _multiframe(frames: np.ndarray, *, series: str, modality: str, sop_class: UID, **attrs: Any) -> pydicom.Dataset:
    """A multi-frame image (``frames``: (N, H, W) uint8 gray or (N, H, W, 3) uint8 RGB)."""
    ds = image_dataset(frames[0], study="corpus-cine", series=series, modality=modality)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = sop_class
    ds.NumberOfFrames = len(frames)
    ds.PixelData = np.ascontiguousarray(frames).tobytes()
    ds.ImageType = ["ORIGINAL", "PRIMARY"]
    del ds.ConversionType
    for key, value in attrs.items():
        setattr(ds, key, value)
    return ds


def _overlay(ds: pydicom.Dataset) -> pydicom.Dataset:
    """Add overlay plane 6000: a rectangle outline, 1 bit per pixel packed little-endian bit order."""
    rows, cols = int(ds.Rows), int(ds.Columns)
    mask = np.zeros((rows, cols), dtype=np.uint8)
    mask[4:-4, 4], mask[4:-4, -5], mask[4, 4:-4], mask[-5, 4:-4] = 1, 1, 1, 1
    packed = np.packbits(mask.ravel(), bitorder="little").tobytes()
    if len(packed) % 2:
        packed += b"\x00"
    ds.add_new(0x60000010, "US", rows)  # OverlayRows
    ds.add_new(0x60000011, "US", cols)  # OverlayColumns
    ds.add_new(0x60000040, "CS", "G")  # OverlayType
    ds.add_new(0x60000050, "SS", [1, 1])  # OverlayOrigin
    ds.add_new(0x60000100, "US", 1)  # OverlayBitsAllocated
    ds.add_new(0x60000102, "US", 0)  # OverlayBitPosition
    ds.add_new(0x60003000, "OW", packed)  # OverlayData
    return ds


def _charset_name(name: str, series: str, folder: Path, note: str) -> CorpusFile | None:
    """A gray image whose PatientName/SpecificCharacterSet are the raw bytes of pydicom's charset file ``name``."""
    found = get_charset_files(name)
    if not found:
        return None
    src = pydicom.dcmread(found[0], stop_before_pixels=True)
    raw_name = src.get_item("PatientName").value
    charset = src.SpecificCharacterSet
    ds = image_dataset(_pixels((32, 32), zlib.crc32(series.encode())), study="corpus-charset", series=series,
                       patient=Patient(name="X", patient_id=f"PID-{series}"))
    ds.SpecificCharacterSet = charset
    return CorpusFile(write_raw(ds, folder / f"own__{series}.dcm", {"PatientName": ("PN", raw_name)}), "own", note)


def own_inputs(folder: Path) -> list[CorpusFile]:
    """Our tricky inputs (see the module docstring); every file in its own series unless said otherwise."""
    out: list[CorpusFile] = []

    def add(ds: pydicom.Dataset, name: str, note: str) -> None:
        out.append(CorpusFile(write(ds, folder / f"own__{name}.dcm"), "own", note))

    alice, bob = Patient(), Patient(name="Testpatient^Bob", patient_id="PID-000002", birth_date="19800202")

    ds = ct_dataset("corpus-ct", "no-series", 0)
    del ds.SeriesInstanceUID
    add(ds, "no_series_uid", "no SeriesInstanceUID: refused (0xC210) by the node, skipped by route")

    for i, who in enumerate((alice, alice, bob)):
        add(ct_dataset("corpus-ct", "shared", i, patient=who), f"shared_series_{i}_{who.patient_id}",
            "two patients under one SeriesInstanceUID (and StudyInstanceUID): two series, two jobs")

    for name, series, note in (
        ("chrX2.dcm", "name_gb18030", "PatientName in GB18030 ending in '='"),
        ("chrX1.dcm", "name_utf8", "PatientName in ISO_IR 192 (UTF-8) ending in '='"),
        ("chrKoreanMulti.dcm", "name_ir149", "PatientName in ISO 2022 IR 149 ending in ESC ( B"),
    ):
        made = _charset_name(name, series, folder, note)
        if made is not None:
            out.append(made)

    add(image_dataset(_pixels((32, 32), 1), study="corpus", series="oblique", PatientOrientation=["L", "PF"]),
        "oblique_orientation", "oblique PatientOrientation L\\PF (valid: copied)")
    bad = image_dataset(_pixels((32, 32), 2), study="corpus", series="invalid")
    out.append(CorpusFile(write_raw(bad, folder / "own__invalid_values.dcm",
                                    {"StudyDate": ("DA", b"1997.04.24"), "PatientOrientation": ("CS", b"A\\F\\X ")}),
                          "own", "invalid StudyDate 1997.04.24 and PatientOrientation A\\F\\X (not copied)"))

    gray_frames = np.stack([_pixels((48, 64), 10 + i) for i in range(5)])
    add(_multiframe(gray_frames, series="us-cine-ft", modality="US", sop_class=US_MULTIFRAME, FrameTime="33.3",
                    FrameIncrementPointer=Tag("FrameTime")),
        "us_gray_cine_frametime", "grayscale 8-bit multi-frame US, FrameTime 33.3")
    add(_multiframe(gray_frames, series="us-cine-ftv", modality="US", sop_class=US_MULTIFRAME,
                    FrameTimeVector=["0", "33.3", "33.3", "40", "33.3"], FrameIncrementPointer=Tag("FrameTimeVector")),
        "us_gray_cine_frametimevector", "grayscale 8-bit multi-frame US, FrameTimeVector")
    color_frames = np.stack([_pixels((48, 64, 3), 20 + i) for i in range(4)])
    add(_multiframe(color_frames, series="us-cine-rgb", modality="US", sop_class=US_MULTIFRAME, FrameTime="40",
                    FrameIncrementPointer=Tag("FrameTime")),
        "us_color_cine_frametime", "colour (RGB) multi-frame US, FrameTime 40")

    add(image_dataset(_pixels((32, 32), 3), study="corpus", series="other-ids", OtherPatientIDs=["OLD-0001", "OLD-0002"]),
        "other_patient_ids", "OtherPatientIDs (0010,1000) with two values")
    add(_overlay(image_dataset(_pixels((32, 32), 4), study="corpus", series="overlay")),
        "overlay_plane", "overlay plane in group 6000")
    for n in (1, 2, 3):
        add(image_dataset(_pixels((n, n), 5 + n), study="corpus", series=f"tiny-{n}"), f"tiny_{n}x{n}",
            f"{n}x{n} pixels: below derive.min_size, skipped with the reason")

    op = image_dataset(_pixels((64, 64, 3), 30), study="corpus", series="op", modality="OP", ImageLaterality="R")
    add(op, "modality_op_rgb", "Modality OP, 8-bit RGB")
    es = image_dataset(_pixels((64, 64, 3), 31), study="corpus", series="es", modality="ES")
    add(es, "modality_es_rgb", "Modality ES, 8-bit RGB")
    xa = image_dataset(_pixels((64, 64), 32), study="corpus", series="xa", modality="XA")
    add(xa, "modality_xa_gray", "Modality XA, 8-bit gray")
    mono1 = image_dataset(_pixels((64, 64), 33, np.uint16), study="corpus", series="mono1", modality="DX",
                          PhotometricInterpretation="MONOCHROME1")
    mono1.BitsStored, mono1.HighBit = 12, 11
    add(mono1, "monochrome1", "MONOCHROME1 DX (12 bits stored)")
    return out


def pydicom_images(folder: Path) -> list[CorpusFile]:
    """Every bundled pydicom test file that pydicom reads and that holds an image, at most 5 MB, copied as is."""
    root = Path(pydicom.data.__file__).parent / "test_files"
    out = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file() or path.stat().st_size > MAX_BYTES:
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=False)
        except Exception:  # noqa: BLE001 - not DICOM (dumps, JSON, ICC profiles) or not readable: not corpus
            continue
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            continue
        try:
            rel = path.relative_to(root).as_posix()
        except ValueError:  # an external data folder (pydicom-data downloads)
            rel = path.name
        target = folder / ("pydicom__" + rel.replace("/", "__"))
        shutil.copyfile(path, target)
        out.append(CorpusFile(target, "pydicom", f"pydicom test file {rel}"))
    return out


def build_corpus(folder: Path) -> list[CorpusFile]:
    folder.mkdir(parents=True, exist_ok=True)
    return [*pydicom_images(folder), *own_inputs(folder)]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> list[CorpusFile]:
    return build_corpus(tmp_path_factory.mktemp("corpus"))


def test_corpus_holds_the_listed_inputs(corpus: list[CorpusFile]) -> None:
    names = {c.path.name for c in corpus}
    assert sum(c.origin == "pydicom" for c in corpus) >= 50, "pydicom's bundled images are missing"
    for expected in ("own__no_series_uid.dcm", "own__invalid_values.dcm", "own__us_gray_cine_frametime.dcm",
                     "own__overlay_plane.dcm", "own__tiny_1x1.dcm", "own__monochrome1.dcm", "own__name_gb18030.dcm"):
        assert expected in names
    gb = pydicom.dcmread(next(c.path for c in corpus if c.path.name == "own__name_gb18030.dcm"))
    assert gb.get_item("PatientName").value.endswith(b"=")


# ================================================================================================ route vs live node
@dataclass
class RoutedSeries:
    """One series as `dicomnode route` prints it."""

    series_uid: str
    count: int
    action: str
    rule: str | None
    model: str | None
    files: set[str] | None = None  # file names, printed only when a rule matched


_SERIES_LINE = re.compile(r"^Series (\S+) \(Modality .*, (\d+) instances?\)$")
_SKIPPED_LINE = re.compile(r"^skipped (.+?): (.*)$")


def run_route(config_file: Path, files: list[Path]) -> tuple[list[RoutedSeries], dict[str, str], str]:
    """`dicomnode route` (the CLI entry, in-process): its series, the files it says the node would refuse, its text."""
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        rc = cli.main(["route", "--config", str(config_file), *map(str, files)])
    text = buffer.getvalue()
    assert rc == 0, text
    series: list[RoutedSeries] = []
    refused: dict[str, str] = {}
    for line in text.splitlines():
        if m := _SERIES_LINE.match(line):
            series.append(RoutedSeries(m[1], int(m[2]), "?", None, None))
        elif m := _SKIPPED_LINE.match(line):
            refused[Path(m[1]).name] = m[2]
        elif line.startswith("  ") and series:
            body, current = line.strip(), series[-1]
            if body.startswith(("rule ", "no rule matched")):
                rule = re.match(r"rule '([^']+)'", body)
                model = re.search(r"enhance with model '([^']+)'", body)
                current.rule = rule[1] if rule else None
                current.model = model[1] if model else None
                current.action = "enhance" if model else "forward" if "forward untouched" in body else "ignore"
            elif body.startswith(("matched ", "not matched (left alone): ")):
                names = body.split(": ", 1)[1] if ": " in body else ""
                current.files = (current.files or set()) | {n.strip() for n in names.split(", ") if n.strip()}
    return series, refused, text


def dcmsend_report(text: str) -> dict[str, str]:
    """File name -> DIMSE status ("0x0000", "0xc210", ... or "<not sent>") from dcmsend's +crf report."""
    statuses: dict[str, str] = {}
    for block in text.split("\n\n"):
        name = re.search(r"^Filename\s+: (.+)$", block, re.M)
        status = re.search(r"^DIMSE Status\s+: (\S+(?: sent>)?)", block, re.M)
        if name and status:
            statuses[Path(name[1].strip()).name] = status[1].lower()
    return statuses


def dataset_bytes(path: Path) -> RawObject | None:
    """What an SCU that does not parse the dataset would send: the bytes after the file meta, under the
    dataset's own SOP Class/Instance UIDs (the file meta's when the dataset lacks them); None without either."""
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception:  # noqa: BLE001 - unreadable: nothing a sender could name in a C-STORE
        return None
    meta = getattr(ds, "file_meta", None) or FileMetaDataset()
    sop_class = str(ds.get("SOPClassUID") or meta.get("MediaStorageSOPClassUID") or "")
    sop_uid = str(ds.get("SOPInstanceUID") or meta.get("MediaStorageSOPInstanceUID") or "")
    syntax = str(meta.get("TransferSyntaxUID") or "")
    if not (sop_class and sop_uid and syntax):
        return None
    with path.open("rb") as fh:
        read_preamble(fh, False)
        _read_file_meta_info(fh)  # leaves fh at the first byte of the dataset
        body = fh.read()
    return RawObject(sop_class, sop_uid, syntax, body)


@dataclass
class NodeVerdicts:
    status: dict[str, str]  # file name -> "0x0000" (stored), a failure status, or "unsendable"
    sender: dict[str, str]  # file name -> "dcmsend" or "raw C-STORE" (dcmsend could not send it)


def send_corpus(port: int, files: list[Path], work: Path) -> NodeVerdicts:
    """Send every file with dcmsend (-nh: go on after a refusal); what dcmsend cannot read or send goes as raw bytes.

    dcmsend skips files it cannot parse (no SOP Class UID, a truncated element, a VR dcmtk rejects) and loses
    the rest of an association the peer aborts: those files then go as their bytes over pynetdicom, so the
    node judges every file that has a SOP Class and Instance UID to name in a C-STORE.
    """
    report = work / "dcmsend_report.txt"
    out = dcmsend(port, files, extra=["-nh", "-nuc", "+crf", str(report)], timeout=300)
    statuses = dcmsend_report(report.read_text()) if report.is_file() else {}
    # dcmsend names its C-STORE after the file's meta header; where that header contradicts the data set
    # (pydicom's rtdose_rle*: meta class and instance "31") the node answers 0xA900 and quarantines it, the
    # right answer to that request. The data set itself is then judged as sent under its own UIDs.
    named_wrong = {name for name, status in statuses.items() if status == "0xa900"}
    sender = {name: "dcmsend" for name, status in statuses.items() if status != "<not sent>" and name not in named_wrong}
    again = [p for p in files if p.name not in sender]
    unsendable = {p.name for p in again if dataset_bytes(p) is None}
    raw = [p for p in again if p.name not in unsendable]
    if raw:
        results = send_raw(port, [o for o in map(dataset_bytes, raw) if o is not None], work / "raw")
        for path, status in zip(raw, results):
            statuses[path.name] = "<no answer>" if status is None else f"0x{status:04x}"
            sender[path.name] = "raw C-STORE" + (" (dcmsend's request got 0xA900)" if path.name in named_wrong else "")
    for name in unsendable:
        statuses[name] = "unsendable"
        sender[name] = "none (no SOP Class/Instance UID to send it under)"
    missing = [p.name for p in files if p.name not in statuses]
    assert not missing, f"no verdict for {missing}; dcmsend said:\n{out.stderr[-4000:]}"
    return NodeVerdicts(statuses, sender)


@dataclass
class LedgerSeries:
    series_uid: str
    sop_uids: set[str]
    decisions: set[tuple[str | None, str | None, str | None]]  # (action, rule, model) of its jobs
    jobs: list[int]


def ledger_series(ledger: Any) -> dict[tuple[str, str, str], LedgerSeries]:
    """The node's jobs per series key (patient, study, series); follow-up jobs of one series are merged."""
    out: dict[tuple[str, str, str], LedgerSeries] = {}
    for job in ledger.jobs():
        key = (job.patient_key, job.study_uid, job.series_uid)
        entry = out.setdefault(key, LedgerSeries(job.series_uid, set(), set(), []))
        entry.sop_uids |= {i.sop_uid for i in ledger.instances(job.id)}
        entry.decisions.add((job.action, job.rule, job.model))
        entry.jobs.append(job.id)
    return out


SETTLED = {"derived", "done", "failed", "gated"}  # the decision is recorded


@pytest.mark.slow
def test_route_agrees_with_the_live_node(corpus: list[CorpusFile], tmp_path: Path) -> None:
    require_tools("dcmsend")
    files = [c.path for c in corpus]
    names = [p.name for p in files]
    assert len(set(names)) == len(names)
    data = corpus_config(tmp_path, free_port())
    config_file = tmp_path / "node.yaml"
    config_file.write_text(yaml.safe_dump(data))
    routed, route_refused, route_text = run_route(config_file, files)

    server = Server(parse_config(data, tmp_path), options=ServerOptions(drain_seconds=10))
    server.start()
    try:
        verdicts = send_corpus(server.port, files, tmp_path)
        ledger = server.spool.ledger
        wait_until(lambda: bool(ledger.jobs()) and all(j.state in SETTLED for j in ledger.jobs()), 300,
                   what="every job processed")
        live = ledger_series(ledger)
    finally:
        assert server.stop()

    # the spec of two inputs, whatever route says: a file without SeriesInstanceUID is refused with 0xC210,
    # two patients under one SeriesInstanceUID are two series (two jobs)
    assert verdicts.status["own__no_series_uid.dcm"] == "0xc210", verdicts.status["own__no_series_uid.dcm"]
    shared = read_uids(next(p for p in files if p.name.startswith("own__shared_series_")))["SeriesInstanceUID"]
    assert sorted(len(e.sop_uids) for e in live.values() if e.series_uid == shared) == [1, 2]

    problems: list[str] = []
    # 1. refused by route <=> refused by the node (any status other than Success, or no way to send it at all)
    node_refused = {name: s for name, s in verdicts.status.items() if s != "0x0000"}
    for name in names:
        if (name in route_refused) != (name in node_refused):
            problems.append(
                f"{name}: route {'refuses: ' + route_refused[name] if name in route_refused else 'accepts'}; the node "
                f"{'refused with ' + node_refused[name] if name in node_refused else 'stored it'} "
                f"(sent by {verdicts.sender[name]})")

    # 2. the series and the decision of each: route's series (multiset) == the ledger's series keys
    sop_of = {}
    for path in files:
        if path.name not in route_refused:
            sop_of[path.name] = read_uids(path)["SOPInstanceUID"]
    route_view = Counter((s.series_uid, s.count, s.action, s.rule, s.model) for s in routed)
    live_view: Counter = Counter()
    for entry in live.values():
        if len(entry.decisions) != 1:
            problems.append(f"series {entry.series_uid}: jobs {entry.jobs} decided differently: {sorted(map(str, entry.decisions))}")
        action, rule, model = sorted(entry.decisions, key=str)[0]
        live_view[(entry.series_uid, len(entry.sop_uids), action, rule, model)] += 1
    for key in sorted(set(route_view) | set(live_view), key=str):
        if route_view[key] != live_view[key]:
            uid, count, action, rule, model = key
            problems.append(f"series {uid} ({count} instances, {action}, rule {rule}, model {model}): "
                            f"route shows it {route_view[key]}x, the node has it {live_view[key]}x")
    # 3. where route names the files, they are exactly the instances of one of the node's series
    for s in routed:
        if s.files is None:
            continue
        uids = {sop_of[name] for name in s.files}
        if not any(e.series_uid == s.series_uid and e.sop_uids == uids for e in live.values()):
            problems.append(f"series {s.series_uid}: route groups {sorted(s.files)}, no node series has exactly those instances")
    assert not problems, "route and the live node disagree:\n" + "\n".join(problems) + "\n\nroute said:\n" + route_text


def test_route_shows_one_instance_per_sop_instance_uid_as_the_node_holds(tmp_path: Path) -> None:
    """Two files of one SOPInstanceUID in a series: the node keeps the later one, and route says so."""
    first = write(image_dataset(_pixels((32, 32), 1), series="dup", modality="OT"), tmp_path / "a.dcm")
    second = write(image_dataset(_pixels((32, 32), 2), series="dup", modality="OT"), tmp_path / "b.dcm")
    config_file = tmp_path / "node.yaml"
    config_file.write_text(yaml.safe_dump(corpus_config(tmp_path)))
    routed, refused, text = run_route(config_file, [first, second])
    assert [(s.count, s.files) for s in routed] == [(1, {"b.dcm"})] and not refused, text
    assert f"replaced {first}: a later file has the same SOPInstanceUID" in text


# ================================================================================================ derived outputs
_DA = re.compile(r"^\d{8}$")
_DIRECTION = re.compile(r"^(?:[APRLHF]+|(?:LE|RT|D|V|CR|CD|R|M|L|PR|DI|PA|PL)+)$")  # PS3.3 C.7.6.1.1.1


def raw_value(ds: pydicom.Dataset, keyword: str) -> bytes | None:
    """The element's bytes as stored (trailing space/NUL padding removed); None when absent.

    ``ds`` must be freshly read and the element not accessed by keyword before (it is then still raw).
    """
    elem = ds.get_item(Tag(keyword))
    if elem is None:
        return None
    value = elem.value
    if value is None or value == "":  # pydicom decodes empty elements of some odd files as it reads them
        return b""
    assert isinstance(value, bytes), f"{keyword} was decoded before its raw bytes were read"
    return value.rstrip(b" \x00")


def valid_date(raw: bytes) -> bool:
    text = raw.decode("ascii", "replace")
    if not _DA.match(text):
        return False
    try:
        date(int(text[:4]), int(text[4:6]), int(text[6:]))
    except ValueError:
        return False
    return True


def valid_orientation(raw: bytes) -> bool:
    values = raw.decode("ascii", "replace").split("\\")
    return len(values) == 2 and all(_DIRECTION.match(v) for v in values)


def charset(ds: pydicom.Dataset) -> list[str]:
    value = ds.get("SpecificCharacterSet")
    if value is None or value == "":
        return []
    return [str(v).strip() for v in (value if isinstance(value, (list, tuple, MultiValue)) else [value])]


def dciodvfy_errors(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True, errors="replace", timeout=60)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


def check_output(out_path: Path, src_path: Path) -> list[str]:
    """Every way ``out_path`` breaks the spec for a derived object of ``src_path`` (empty: none)."""
    problems = [f"dciodvfy: {line}" for line in dciodvfy_errors(out_path)]
    src = pydicom.dcmread(src_path, stop_before_pixels=True)
    out = pydicom.dcmread(out_path, stop_before_pixels=True)
    raw_src = {k: raw_value(src, k) for k in ("PatientName", "PatientID", "OtherPatientIDs", "StudyDate", "PatientOrientation")}
    raw_out = {k: raw_value(out, k) for k in raw_src}

    for keyword in ("PatientName", "PatientID"):
        if (raw_out[keyword] or b"") != (raw_src[keyword] or b""):
            problems.append(f"{keyword} bytes {raw_out[keyword]!r} != source {raw_src[keyword]!r}")
    if charset(out) != charset(src):
        problems.append(f"SpecificCharacterSet {charset(out)} != source {charset(src)}")
    if raw_src["OtherPatientIDs"] and raw_out["OtherPatientIDs"] != raw_src["OtherPatientIDs"]:
        problems.append(f"OtherPatientIDs {raw_out['OtherPatientIDs']!r} != source {raw_src['OtherPatientIDs']!r}")
    for keyword, valid in (("StudyDate", valid_date), ("PatientOrientation", valid_orientation)):
        value = raw_src[keyword]
        if not value:
            continue
        if not valid(value) and raw_out[keyword]:
            problems.append(f"invalid source {keyword} {value!r} copied as {raw_out[keyword]!r} (must be absent or empty)")
        elif valid(value) and raw_out[keyword] != value:
            problems.append(f"valid source {keyword} {value!r} not kept: {raw_out[keyword]!r}")

    if str(out.get("Modality", "")) != str(src.get("Modality", "")):
        problems.append(f"Modality {out.get('Modality')!r} != source {src.get('Modality')!r}")
    src_pi, out_pi = str(src.get("PhotometricInterpretation", "")), str(out.get("PhotometricInterpretation", ""))
    if src_pi in ("MONOCHROME1", "MONOCHROME2") and out_pi != "MONOCHROME2":
        problems.append(f"gray source ({src_pi}) gave PhotometricInterpretation {out_pi}")
    if int(src.get("NumberOfFrames", 1) or 1) > 1:
        if "FrameTime" in src and ("FrameTime" not in out or float(out.FrameTime) != float(src.FrameTime)):
            problems.append(f"cine FrameTime {out.get('FrameTime')!r} != source {src.FrameTime!r}")
        if "FrameTimeVector" in src and [float(v) for v in out.get("FrameTimeVector") or []] != [
                float(v) for v in src.FrameTimeVector]:
            problems.append(f"cine FrameTimeVector {out.get('FrameTimeVector')!r} != source {list(src.FrameTimeVector)!r}")
    return problems


def by_sop_occurrence(series: Series) -> list[Series]:
    """``series`` split so that no part holds one SOPInstanceUID twice (the k-th file of each UID in part k):
    every file is enhanced, none overwrites another's output (derived UIDs follow the source UIDs)."""
    parts: list[list[Instance]] = []
    seen: Counter = Counter()
    for inst in series.instances:
        sop = read_uids(inst.path)["SOPInstanceUID"]
        if seen[sop] == len(parts):
            parts.append([])
        parts[seen[sop]].append(inst)
        seen[sop] += 1
    return [replace(series, instances=tuple(p)) for p in parts]


@pytest.mark.slow
def test_every_output_passes_dciodvfy_keeps_modality_and_gray(corpus: list[CorpusFile], tmp_path: Path) -> None:
    require_tools("dciodvfy")
    config = parse_config(corpus_config(tmp_path), tmp_path)
    series, _refused = series_from_files([c.path for c in corpus], routing_keywords(config))
    pipeline = Pipeline(config, ResidentModels.load(config))
    out_root = tmp_path / "out"
    produced: dict[Path, Series] = {}  # output file -> the (part of a) series it came from
    outcomes = []
    for i, whole in enumerate(series):
        for k, part in enumerate(by_sop_occurrence(whole)):
            outcome = pipeline.run(part, out_root / f"{i:03d}-{k}", gate_policy=GatePolicy(enabled=False))
            outcomes.append((part, outcome))
            produced.update({Path(p).resolve(): part for p in outcome.outputs if outcome.action == "enhance"})

    failures: dict[str, list[str]] = {}
    found = sorted(p.resolve() for p in out_root.rglob("*") if p.is_file())
    assert found, "the pipeline wrote nothing"
    for path in found:
        part = produced.get(path)
        if part is None:
            failures.setdefault(path.name, []).append("an output file no outcome lists")
            continue
        out = pydicom.dcmread(path, stop_before_pixels=True)
        refs = out.get("SourceImageSequence") or []
        ref = str(refs[0].ReferencedSOPInstanceUID) if refs else ""
        sources = [i.path for i in part.instances if read_uids(i.path)["SOPInstanceUID"] == ref]
        if len(sources) != 1:
            failures.setdefault(path.name, []).append(f"SourceImageSequence names {ref!r}: {len(sources)} sources match")
            continue
        problems = check_output(path, sources[0])
        if problems:
            failures.setdefault(f"{sources[0].name} -> {path.name}", []).extend(problems)

    not_enhanced: list[str] = []
    small_seen: set[str] = set()
    own = {c.path.name for c in corpus if c.origin == "own"}
    for part, outcome in outcomes:
        if outcome.action != "enhance":
            continue
        skipped = {Path(p).name: reason for p, reason in outcome.skipped}
        failed = {Path(p).name: reason for p, reason in outcome.failed}
        for inst in part.instances:
            head = pydicom.dcmread(inst.path, stop_before_pixels=True)
            name = inst.path.name
            if min(int(head.get("Rows", 0) or 0), int(head.get("Columns", 0) or 0)) < config.derive.min_size:
                small_seen.add(name)
                if "minimum size" not in skipped.get(name, ""):
                    failures.setdefault(name, []).append(
                        f"{head.get('Rows')}x{head.get('Columns')} pixels: not skipped for the minimum size "
                        f"({skipped.get(name, 'not in outcome.skipped')})")
            elif name in failed:
                if failed[name].startswith(("derive:", "encode:", "write:")) or name in own:  # our inputs are all sound
                    failures.setdefault(name, []).append(f"no output: {failed[name]}")
                else:
                    not_enhanced.append(f"{name}: {failed[name]}")
    for n in (1, 2, 3):
        if f"own__tiny_{n}x{n}.dcm" not in small_seen:
            failures.setdefault(f"own__tiny_{n}x{n}.dcm", []).append("never reached the pipeline's minimum-size check")
    message = "\n".join(f"{name}:\n    " + "\n    ".join(problems) for name, problems in sorted(failures.items()))
    errors = sorted({p for problems in failures.values() for p in problems if p.startswith("dciodvfy: ")})
    assert not failures, (
        f"{len(failures)} of {len(found)} outputs (or sources) break the spec:\n{message}\n\n"
        f"dciodvfy errors (deduplicated):\n  " + "\n  ".join(errors) +
        "\n\nnot enhanced for reasons of the input (not counted here):\n  " + "\n  ".join(not_enhanced))
