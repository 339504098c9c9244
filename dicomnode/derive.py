"""Enhanced frames -> a Secondary Capture instance with full provenance, one per source instance.

Why Secondary Capture: every PACS and viewer stores and shows it, and it states plainly that the
pixels were produced by software, not acquired. The derived series lives in the source study
(same patient/study identity, new SeriesInstanceUID, SeriesNumber + offset) and says, in standard
attributes first and a private block second, exactly what was done: DerivationDescription and
DerivationCodeSequence (CID 7203), SourceImageSequence (purpose 121322) and ReferencedSeriesSequence
back to the source, a ContributingEquipmentSequence item for the node (109102 Processing
Equipment) naming model, model version and weights hash, and the non-diagnostic marking from the
configuration. See docs/provenance.md for the attribute-by-attribute table.

UIDs are derived deterministically from the source UIDs and everything that decides the pixels
(model kind, version, weights, guidance, model options), so reprocessing the same series the same
way re-sends the same objects (PACS replaces rather than duplicates) while any change gives a new
series, never a different image under an existing UID.

Single frames use highdicom's ``SCImage`` (SC Image Storage); multi-frame sources become
Multi-frame Grayscale Byte/Word or True Color SC built with pydicom, which highdicom does not do.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__
from dicomnode.config import DerivePolicy, NodeConfig, NodeSettings
from dicomnode.imaging import LOSSY_METHODS, to_stored
from models.registry import ModelInfo

SC_IMAGE = UID("1.2.840.10008.5.1.4.1.1.7")
MF_GRAYSCALE_BYTE_SC = UID("1.2.840.10008.5.1.4.1.1.7.2")
MF_GRAYSCALE_WORD_SC = UID("1.2.840.10008.5.1.4.1.1.7.3")
MF_TRUE_COLOR_SC = UID("1.2.840.10008.5.1.4.1.1.7.4")

PRIVATE_GROUP = 0x0011
PRIVATE_CREATOR = "DICOMNODE 1.0"
# Element offsets in the private block (group 0x0011, block reserved by PRIVATE_CREATOR).
PRIVATE_ELEMENTS: dict[str, tuple[int, str]] = {
    "model_kind": (0x01, "LO"),
    "model_name": (0x02, "LO"),
    "model_version": (0x03, "LO"),
    "weights_sha256": (0x04, "LO"),
    "guidance_id": (0x05, "LO"),
    "config_hash": (0x06, "LO"),
    "node_version": (0x07, "LO"),
}

# Copied verbatim from the source when present: patient, study and patient-study identity.
_PATIENT_STUDY_KEYWORDS: tuple[str, ...] = (
    "SpecificCharacterSet",
    "PatientName",
    "PatientID",
    "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "PatientBirthDate",
    "PatientSex",
    "PatientAge",
    "PatientSize",
    "PatientWeight",
    "PatientIdentityRemoved",
    "DeidentificationMethod",
    "DeidentificationMethodCodeSequence",
    "StudyInstanceUID",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "IssuerOfAccessionNumberSequence",
    "StudyDescription",
    "PatientOrientation",
    "Laterality",
    "ImageLaterality",
    "BodyPartExamined",
    "RecognizableVisualFeatures",
)
# Type 2 attributes of the modules above: present even when empty.
_TYPE2_KEYWORDS: tuple[str, ...] = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
    "PatientOrientation",
)


class DeriveError(ValueError):
    """The derived object cannot be built from this source and these frames."""


@dataclass(frozen=True)
class DeriveSettings:
    """How derived objects are labelled: the ``derive`` section of the config plus the node's identity."""

    policy: DerivePolicy = field(default_factory=DerivePolicy)
    node_ae_title: str = NodeSettings.model_fields["ae_title"].default
    config_hash: str = ""

    @classmethod
    def from_config(cls, config: NodeConfig) -> DeriveSettings:
        return cls(policy=config.derive, node_ae_title=str(config.node.ae_title), config_hash=str(config.config_hash))


def _model_identity(model: ModelInfo, guidance_id: str | None) -> list[str]:
    """Everything that decides the derived pixels: a change in any of them gives new UIDs."""
    options = json.dumps(dict(model.options), sort_keys=True, default=str)
    return [model.kind, model.version, model.weights_sha256 or "", guidance_id or "", options]


def derived_uids(source: Dataset, model: ModelInfo, guidance_id: str | None) -> tuple[str, str]:
    """(SeriesInstanceUID, SOPInstanceUID) of the derived instance, the same on every run.

    The series UID depends only on the source series and the model identity, so all instances of
    one source series land in one derived series; the SOP UID adds the source SOPInstanceUID.
    """
    try:
        series = str(source.SeriesInstanceUID)
        sop = str(source.SOPInstanceUID)
    except AttributeError as exc:
        raise DeriveError(f"source lacks a UID needed for provenance: {exc}") from None
    identity = _model_identity(model, guidance_id)
    series_uid = generate_uid(entropy_srcs=["dicomnode-derived-series", series, *identity])
    sop_uid = generate_uid(entropy_srcs=["dicomnode-derived-instance", series, sop, *identity])
    return str(series_uid), str(sop_uid)


def _code_item(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def derivation_codes(model: ModelInfo) -> list[Dataset]:
    """CID 7203 codes for what the model does; no AI-specific code exists in that group."""
    chosen = [getattr(codes.cid7203, name) for name in model.derivation]
    return [_code_item(c.value, c.scheme_designator, c.meaning) for c in chosen]


def _lo(text: str, limit: int = 64) -> str:
    """Trim to a VR length limit (LO: 64 characters); plain ASCII so any character set can hold it."""
    return text if len(text) <= limit else text[: limit - 3].rstrip() + "..."


def _series_description(source: Dataset, suffix: str) -> str:
    base = str(source.get("SeriesDescription", "") or source.get("Modality", "") or "series")
    room = 64 - len(suffix)
    if room <= 0:
        return suffix[:64]
    if len(base) > room:
        base = base[: max(room - 3, 0)].rstrip() + "..."
    return base + suffix


def _software_versions(model: ModelInfo) -> list[str]:
    weights = f"weights sha256:{model.weights_sha256[:16]}" if model.weights_sha256 else "weights none"
    return [f"dicomnode {__version__}", _lo(f"{model.name} {model.version}"), weights]


def _derivation_description(model: ModelInfo, guidance_id: str | None, settings: DeriveSettings) -> str:
    parts = [f"Enhanced by {model.name} version {model.version} (kind {model.kind})"]
    if model.weights_sha256:
        parts.append(f"weights sha256 {model.weights_sha256}")
    if guidance_id:
        parts.append(f"guidance {guidance_id}")
    parts.append(f"dicomnode {__version__} at {settings.node_ae_title}")
    parts.append("not for primary diagnosis")
    return "; ".join(parts)[:1024]  # ST limit


def _copy_identity(source: Dataset, ds: Dataset) -> None:
    for keyword in _PATIENT_STUDY_KEYWORDS:
        if keyword in source:
            ds[keyword] = copy.deepcopy(source[keyword])
    for keyword in _TYPE2_KEYWORDS:
        if keyword not in ds:
            setattr(ds, keyword, None)
    if "Laterality" not in ds and "ImageLaterality" not in ds:
        ds.Laterality = None  # Type 2C in General Series: empty = unknown, never guessed


def _lossy(source: Dataset) -> tuple[str, list[str], list[str]] | None:
    """("01", ratios, methods) when the source pixels went through lossy compression, else None."""
    ts = str(source.file_meta.get("TransferSyntaxUID", "")) if hasattr(source, "file_meta") else ""
    stated = str(source.get("LossyImageCompression", "") or "")
    if stated != "01" and ts not in LOSSY_METHODS:
        return None
    ratios = [str(r) for r in _as_list(source.get("LossyImageCompressionRatio"))]
    methods = [str(m) for m in _as_list(source.get("LossyImageCompressionMethod"))]
    if ts in LOSSY_METHODS and stated != "01":
        # lossy transfer syntax without the flag: JPEG 2000/JPEG-LS may be lossless, but the
        # decoded pixels cannot be shown to be, so the conservative answer is "lossy".
        methods.append(LOSSY_METHODS[ts])
    return "01", ratios, methods


def _as_list(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return list(value)
    return [value]


def _processing_equipment(model: ModelInfo, settings: DeriveSettings) -> ContributingEquipment:
    return ContributingEquipment(
        manufacturer=settings.policy.manufacturer,
        purpose_of_reference=codes.DCM.ProcessingEquipment,
        manufacturer_model_name=_lo(model.name),
        software_versions=_software_versions(model),
        institution_name=settings.policy.institution_name,
        station_name=settings.node_ae_title[:16],
        contribution_description=f"Image enhancement by {model.name} {model.version}"[:1024],
    )


def _equipment_sequence(source: Dataset, model: ModelInfo, settings: DeriveSettings) -> list[Dataset]:
    items: list[Dataset] = []
    # keep what earlier processing recorded, then the acquisition device, then us
    for item in source.get("ContributingEquipmentSequence", []) or []:
        items.append(copy.deepcopy(item))
    try:
        items.append(ContributingEquipment.for_image_acquisition(source))
    except Exception:  # the source names no acquisition manufacturer: nothing to record
        pass
    items.append(_processing_equipment(model, settings))
    return items


def _add_private_block(ds: Dataset, model: ModelInfo, settings: DeriveSettings, guidance_id: str | None) -> None:
    block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR, create=True)
    values = {
        "model_kind": model.kind,
        "model_name": model.name,
        "model_version": model.version,
        "weights_sha256": model.weights_sha256 or "",
        "guidance_id": guidance_id or "",
        "config_hash": settings.config_hash,
        "node_version": __version__,
    }
    for key, (offset, vr) in PRIVATE_ELEMENTS.items():
        block.add_new(offset, vr, _lo(values[key]))


def read_private(ds: Dataset) -> dict[str, str]:
    """The node's private provenance block as a dict (empty when absent)."""
    try:
        block = ds.private_block(PRIVATE_GROUP, PRIVATE_CREATOR)
    except KeyError:
        return {}
    out: dict[str, str] = {}
    for key, (offset, _vr) in PRIVATE_ELEMENTS.items():
        if block.get_tag(offset) in ds:
            out[key] = str(block[offset].value or "")
    return out


def _validate_frames(source: Dataset, frames: Sequence[np.ndarray]) -> tuple[bool, int, int]:
    if not frames:
        raise DeriveError("no frames to store")
    first = np.asarray(frames[0])
    color = first.ndim == 3
    rows, columns = int(source.get("Rows", first.shape[0])), int(source.get("Columns", first.shape[1]))
    for i, frame in enumerate(frames):
        shape = np.shape(frame)
        expected = (rows, columns, 3) if color else (rows, columns)
        if tuple(shape) != expected:
            raise DeriveError(f"frame {i} has shape {tuple(shape)}, expected {expected} (the source's Rows x Columns)")
    nframes = int(source.get("NumberOfFrames", 1) or 1)
    if len(frames) != nframes:
        raise DeriveError(f"got {len(frames)} frames for a source with {nframes}")
    return color, rows, columns


def _out_bits(source: Dataset, color: bool) -> int:
    if color:
        return 8
    return 8 if int(source.get("BitsStored", source.get("BitsAllocated", 8)) or 8) <= 8 else 16


def _pixel_spacing(source: Dataset) -> tuple[float, float] | None:
    spacing = source.get("PixelSpacing")
    if spacing is None or len(spacing) != 2:
        return None
    try:
        return float(spacing[0]), float(spacing[1])
    except (TypeError, ValueError):
        return None


def _single_frame(
    source: Dataset, stored: np.ndarray, color: bool, bits: int, series_uid: str, sop_uid: str, series_number: int,
    instance_number: int, settings: DeriveSettings,
) -> Dataset:
    spacing = _pixel_spacing(source)
    orientation = source.get("PatientOrientation")
    orientation = tuple(orientation) if orientation is not None and len(orientation) == 2 else ("", "")
    sc = SCImage(
        pixel_array=stored,
        photometric_interpretation="RGB" if color else "MONOCHROME2",
        bits_allocated=bits,
        coordinate_system="PATIENT",
        study_instance_uid=str(source.StudyInstanceUID),
        series_instance_uid=series_uid,
        series_number=series_number,
        sop_instance_uid=sop_uid,
        instance_number=instance_number,
        manufacturer=settings.policy.manufacturer,
        patient_orientation=orientation if all(orientation) else ("A", "F"),  # replaced below
        pixel_spacing=spacing,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
    if not all(orientation):
        sc.PatientOrientation = None  # Type 2: unknown orientation stays empty rather than invented
    return sc


def _multi_frame(
    source: Dataset, stored: list[np.ndarray], color: bool, bits: int, series_uid: str, sop_uid: str,
    series_number: int, instance_number: int, settings: DeriveSettings,
) -> Dataset:
    if color:
        sop_class = MF_TRUE_COLOR_SC
    else:
        sop_class = MF_GRAYSCALE_BYTE_SC if bits == 8 else MF_GRAYSCALE_WORD_SC
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = str(source.StudyInstanceUID)
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.InstanceNumber = instance_number
    ds.Modality = "OT"
    ds.Manufacturer = settings.policy.manufacturer
    ds.ConversionType = "WSD"
    nframes = len(stored)
    ds.NumberOfFrames = nframes
    frame_time = source.get("FrameTime")
    if frame_time not in (None, "") and color:
        ds.FrameIncrementPointer = 0x00181063  # FrameTime: cine loops (ultrasound, endoscopy video)
        ds.FrameTime = frame_time
    else:
        ds.FrameIncrementPointer = 0x00182001  # PageNumberVector
        ds.PageNumberVector = list(range(1, nframes + 1))
    rows, columns = stored[0].shape[:2]
    ds.Rows, ds.Columns = rows, columns
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    if color:
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
    else:
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.PresentationLUTShape = "IDENTITY"
        ds.RescaleIntercept = 0  # required (identity) for both grayscale multi-frame SC classes
        ds.RescaleSlope = 1
        ds.RescaleType = "US"
    ds.BurnedInAnnotation = str(source.get("BurnedInAnnotation", "") or "YES")
    spacing = _pixel_spacing(source)
    if spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in stored)  # no stacked copy of all frames
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def _stamp(ds: Dataset, source: Dataset) -> None:
    """Dates and times taken from the source, never from the clock.

    A derived object is a pure function of its source and of what processed it, so a redo after a
    crash, ``dicomnode enhance`` and the live node produce the same bytes under the same UID (a PACS
    never receives two different objects under one UID). The content date is the source's; when the
    processing happened is in the ledger and the log, not in the object.
    """
    for keyword in ("InstanceCreationDate", "InstanceCreationTime", "DateOfSecondaryCapture", "TimeOfSecondaryCapture"):
        if keyword in ds:
            del ds[keyword]
    for date_kw, time_kw in (("ContentDate", "ContentTime"), ("AcquisitionDate", "AcquisitionTime"),
                             ("SeriesDate", "SeriesTime"), ("StudyDate", "StudyTime")):
        if source.get(date_kw):
            ds.ContentDate = source[date_kw].value
            if source.get(time_kw):
                ds.ContentTime = source[time_kw].value
            elif "ContentTime" in ds:
                del ds.ContentTime
            return
    for keyword in ("ContentDate", "ContentTime"):
        if keyword in ds:
            del ds[keyword]


def derive_sc(
    source: Dataset,
    frames: list[np.ndarray],
    model: ModelInfo,
    settings: DeriveSettings,
    guidance_id: str | None,
) -> Dataset:
    """Build the derived SC instance for ``source`` from its enhanced frames (float32 [0, 1]).

    ``source`` needs its header only (pixel data may already be dropped). Frames must have the
    source's Rows x Columns; gray frames are stored 8-bit for 8-bit sources and 16-bit otherwise,
    colour frames as 8-bit RGB.
    """
    missing = [k for k in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID") if not source.get(k)]
    if missing:
        raise DeriveError(f"source lacks {', '.join(missing)}, needed for the derived object's identity and references")
    color, _rows, _columns = _validate_frames(source, frames)
    bits = _out_bits(source, color)
    try:
        stored = [to_stored(f, bits) for f in frames]
    except ValueError as exc:
        raise DeriveError(str(exc)) from None
    series_uid, sop_uid = derived_uids(source, model, guidance_id)
    try:
        source_series_number = int(source.get("SeriesNumber", 0) or 0)
    except (TypeError, ValueError):
        source_series_number = 0
    series_number = min(source_series_number + settings.policy.series_number_offset, 2**31 - 1)
    try:
        instance_number = int(source.get("InstanceNumber", 1) or 1)
    except (TypeError, ValueError):
        instance_number = 1

    if len(stored) == 1:
        ds = _single_frame(source, stored[0], color, bits, series_uid, sop_uid, series_number, instance_number, settings)
        ds.ConversionType = "WSD"
        if "ContributingEquipmentSequence" in ds:
            del ds.ContributingEquipmentSequence  # replaced below with the full chain
    else:
        ds = _multi_frame(
            source, stored, color, bits, series_uid, sop_uid, series_number, instance_number, settings
        )

    _copy_identity(source, ds)
    ds.ImageType = ["DERIVED", "SECONDARY", "ENHANCED"]
    ds.SeriesDescription = _series_description(source, settings.policy.series_description_suffix)
    ds.ContentQualification = settings.policy.content_qualification
    ds.Manufacturer = settings.policy.manufacturer
    ds.ManufacturerModelName = "dicomnode"
    ds.SoftwareVersions = _software_versions(model)
    ds.StationName = settings.node_ae_title[:16]
    if settings.policy.institution_name:
        ds.InstitutionName = _lo(settings.policy.institution_name)
    ds.SecondaryCaptureDeviceManufacturer = settings.policy.manufacturer
    ds.SecondaryCaptureDeviceManufacturerModelName = _lo(model.name)
    ds.SecondaryCaptureDeviceSoftwareVersions = _software_versions(model)
    if "BurnedInAnnotation" in source:
        ds.BurnedInAnnotation = source.BurnedInAnnotation
    if color and "ICCProfile" in source:
        # enhancement keeps the source's colour space, so its profile still describes the pixels
        ds.ICCProfile = source.ICCProfile
        if "ColorSpace" in source:
            ds.ColorSpace = source.ColorSpace
    if not color and bits == 16:
        # stored values are already display values: the identity window shows them as computed
        ds.WindowCenter = 32768
        ds.WindowWidth = 65536
        ds.WindowCenterWidthExplanation = "identity: enhanced display values"

    lossy = _lossy(source)
    if lossy is not None:
        ds.LossyImageCompression = "01"
        if lossy[1]:
            ds.LossyImageCompressionRatio = lossy[1]
        if lossy[2]:
            ds.LossyImageCompressionMethod = lossy[2]
    else:
        ds.LossyImageCompression = "00"

    ds.DerivationDescription = _derivation_description(model, guidance_id, settings)
    ds.DerivationCodeSequence = DicomSequence(derivation_codes(model))
    ref = Dataset()
    ref.ReferencedSOPClassUID = source.SOPClassUID
    ref.ReferencedSOPInstanceUID = source.SOPInstanceUID
    ref.PurposeOfReferenceCodeSequence = DicomSequence(
        [_code_item("121322", "DCM", "Source image for image processing operation")]
    )
    ds.SourceImageSequence = DicomSequence([ref])
    instance = Dataset()
    instance.ReferencedSOPClassUID = source.SOPClassUID
    instance.ReferencedSOPInstanceUID = source.SOPInstanceUID
    series = Dataset()
    series.SeriesInstanceUID = source.SeriesInstanceUID
    series.ReferencedInstanceSequence = DicomSequence([instance])
    ds.ReferencedSeriesSequence = DicomSequence([series])
    ds.ContributingEquipmentSequence = DicomSequence(_equipment_sequence(source, model, settings))
    _stamp(ds, source)
    _add_private_block(ds, model, settings, guidance_id)
    return ds
