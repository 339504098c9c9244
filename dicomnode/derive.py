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
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
from highdicom import ContributingEquipment
from highdicom.sc import SCImage
from pydicom import config as pydicom_config
from pydicom.datadict import dictionary_VM, dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import correct_ambiguous_vr
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.sr.codedict import codes
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from pydicom.valuerep import validate_value

from dicomnode import __version__
from dicomnode.config import DerivePolicy, NodeConfig, NodeSettings
from dicomnode.imaging import LOSSY_METHODS, to_stored
from models.registry import ModelInfo

log = logging.getLogger(__name__)

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

# Patient, study and image identity copied from the source: keyword -> its type in the derived object
# (2: always present, empty when the source lacks it or its value is invalid; 3: copied only when valid).
# Values are copied as the source's raw bytes with its SpecificCharacterSet, so a PACS that matches
# names or IDs byte for byte files the derived series under the same patient.
_IDENTITY: dict[str, int] = {
    "SpecificCharacterSet": 3,
    "PatientName": 2,
    "PatientID": 2,
    "IssuerOfPatientID": 3,
    "OtherPatientIDs": 3,  # (0010,1000), retired but still sent by many modalities
    "PatientBirthDate": 2,
    "PatientSex": 2,
    "PatientAge": 3,
    "PatientSize": 3,
    "PatientWeight": 3,
    "PatientIdentityRemoved": 3,
    "DeidentificationMethod": 3,
    "StudyDate": 2,
    "StudyTime": 2,
    "ReferringPhysicianName": 2,
    "StudyID": 2,
    "AccessionNumber": 2,
    "StudyDescription": 3,
    "BodyPartExamined": 3,
    "RecognizableVisualFeatures": 3,
    "Laterality": 3,  # Type 2C in General Series: see _UNPAIRED_BODY_PARTS
    "ImageLaterality": 3,
    "PatientOrientation": 2,
}
# Identity sequences: copied as decoded elements (their items may be in the source's implicit VR encoding).
_IDENTITY_SEQUENCES: tuple[str, ...] = (
    "IssuerOfPatientIDQualifiersSequence",
    "OtherPatientIDsSequence",
    "DeidentificationMethodCodeSequence",
    "IssuerOfAccessionNumberSequence",
)
# Enumerated values checked beyond the VR (PS3.3): anything else is dropped (Type 3) or emptied (Type 2).
_ENUMERATED: dict[str, frozenset[str]] = {
    "PatientSex": frozenset({"M", "F", "O"}),
    "Laterality": frozenset({"R", "L"}),
    "ImageLaterality": frozenset({"R", "L", "U", "B"}),
    "PatientIdentityRemoved": frozenset({"YES", "NO"}),
    "RecognizableVisualFeatures": frozenset({"YES", "NO"}),
    "BurnedInAnnotation": frozenset({"YES", "NO"}),
}
# Body parts (CID 4031 values) that are not paired: Laterality (Type 2C) must then be absent; for a paired
# or unknown part it is present, empty when unknown (what dciodvfy -new checks).
_UNPAIRED_BODY_PARTS = frozenset(
    "ABDOMEN ABDOMENPELVIS AORTA BLADDER BRAIN CERVIX CHEST CHESTABDOMEN CHESTABDPELVIS COCCYX COLON CSPINE "
    "DUODENUM ESOPHAGUS FACE GALLBLADDER HEAD HEADNECK HEART ILEUM JAW JEJUNUM LARYNX LIVER LSPINE MEDIASTINUM "
    "MOUTH NECK NECKCHEST NOSE PANCREAS PELVIS PENIS PHARYNX PROSTATE RECTUM SKULL SPINE SPLEEN SSPINE STERNUM "
    "STOMACH THYROID TONGUE TRACHEA TSPINE UTERUS VAGINA WHOLEBODY".split())
# PatientOrientation (C.7.6.1.1.1): two values, each one or more of A P R L H F for a biped (so an
# oblique "L\PF" is valid); quadruped terms combine likewise.
_ORIENTATION = re.compile(r"^(?:[APRLHF]+|(?:LE|RT|D|V|CR|CD|R|M|L|PR|DI|PA|PL)+)$")
# Bump when the way frames become stored pixels changes (bit depth, rounding, photometric rules): the
# UIDs of derived objects depend on it, so a different image never reuses an existing UID.
PIXEL_ENCODING = "stored-v2: gray 8/16-bit MONOCHROME2 by source depth, colour 8-bit RGB, round-half-even"


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
    identity = [*_model_identity(model, guidance_id), PIXEL_ENCODING]
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


def _values(value: Any) -> list[Any]:
    if value is None or value == "":
        return []
    return list(value) if isinstance(value, (list, tuple, MultiValue)) else [value]


def _vm_ok(vm: str, n: int) -> bool:
    """Does a value multiplicity ``n`` satisfy the dictionary's VM ("1", "2", "1-n", "2-2n", "1-3", ...)?"""
    if vm.isdigit():
        return n == int(vm)
    low, _, high = vm.partition("-")
    if not low.isdigit() or n < int(low):
        return False
    if high == "n":
        return True
    if high.endswith("n"):
        return n % int(high[:-1] or 1) == 0
    return not high.isdigit() or n <= int(high)


def invalid_value(keyword: str, elem: DataElement) -> str | None:
    """Why ``elem`` may not be copied into a derived object (None when it is valid for its VR, VM and values).

    The reason names the attribute and the rule, never the value (it may be patient data).
    """
    values = _values(elem.value)
    if not values:
        return None
    try:
        vm = dictionary_VM(elem.tag)
    except KeyError:
        vm = "1-n"
    if not _vm_ok(vm, len(values)):
        return f"{len(values)} values where the standard allows {vm}"
    for value in values:
        try:
            validate_value(elem.VR, str(value) if elem.VR in ("PN", "DS", "IS") else value, pydicom_config.RAISE)
        except (ValueError, TypeError) as exc:
            return f"not a valid {elem.VR} value ({type(exc).__name__})"
    allowed = _ENUMERATED.get(keyword)
    if allowed is not None and any(str(v) not in allowed for v in values):
        return f"not one of {', '.join(sorted(allowed))}"
    if keyword == "PatientOrientation" and not all(_ORIENTATION.match(str(v)) for v in values):
        return "not a patient direction (letters A P R L H F, or quadruped terms)"
    return None


def _decoded(source: Dataset, tag: int) -> tuple[DataElement, RawDataElement | None]:
    """The element decoded (for checks) and, when still undecoded in ``source``, its raw form (for copying)."""
    item = source.get_item(tag)
    if isinstance(item, RawDataElement):
        return convert_raw_data_element(item, encoding=source._character_set, ds=source), item
    return item, None


def _raw_copy(raw: RawDataElement, vr: str) -> RawDataElement:
    """The source's bytes under an explicit VR: text values are the same bytes in every little- or big-endian syntax."""
    return RawDataElement(raw.tag, vr, len(raw.value or b""), raw.value or b"", 0, True, True)


def _copy_identity(source: Dataset, ds: Dataset) -> None:
    """Patient, study and image identity from the source: raw bytes when valid, dropped or emptied (logged) when not."""
    sop = str(source.get("SOPInstanceUID", "?"))
    for keyword, kind in _IDENTITY.items():
        tag = tag_for_keyword(keyword)
        assert tag is not None
        if keyword in ds:
            del ds[keyword]
        if tag not in source:
            if kind == 2:
                setattr(ds, keyword, None)
            continue
        try:
            elem, raw = _decoded(source, tag)
            problem = invalid_value(keyword, elem)
        except Exception as exc:  # undecodable bytes in an odd character set: treat as invalid
            elem, raw, problem = None, None, f"cannot be decoded ({type(exc).__name__})"
        if problem is not None:
            log.info("source %s: %s not copied to the derived object: %s", sop, keyword, problem)
            if kind == 2:
                setattr(ds, keyword, None)
            continue
        assert elem is not None
        if raw is not None and elem.VR not in ("SQ", "UN"):
            ds[tag] = _raw_copy(raw, str(elem.VR or dictionary_VR(tag)))
        else:
            ds[tag] = copy.deepcopy(elem)
    body_part = str(ds.get("BodyPartExamined", "") or "").upper()
    unpaired = body_part in _UNPAIRED_BODY_PARTS or bool(ds.get("ImageLaterality"))
    if "Laterality" not in ds and not unpaired:
        ds.Laterality = None  # a paired or unknown body part: laterality unknown, stated as empty
    elif "Laterality" in ds and not ds.Laterality and unpaired:
        del ds.Laterality  # an empty source value for an unpaired part: absent, as the condition requires
    if str(ds.get("PatientIdentityRemoved", "")) == "YES" and not ds.get("DeidentificationMethod") \
            and not ds.get("DeidentificationMethodCodeSequence"):
        # Type 1C once identity is declared removed; keep the (privacy-relevant) flag and say what is known
        ds.DeidentificationMethod = "not stated by the source"
    for keyword in _IDENTITY_SEQUENCES:
        if keyword in source:
            try:
                ds[keyword] = copy.deepcopy(source[keyword])
            except Exception as exc:  # a malformed sequence is optional identity: leave it out
                log.info("source %s: %s not copied: %s", sop, keyword, type(exc).__name__)


def _source_value(source: Dataset, keyword: str) -> Any:
    """A source attribute's value when it is valid for its VR (else None, logged): never copy an invalid value."""
    if keyword not in source:
        return None
    try:
        elem = source[keyword]
        problem = invalid_value(keyword, elem)
    except Exception as exc:
        problem, elem = f"cannot be decoded ({type(exc).__name__})", None
    if problem is not None or elem is None:
        log.info("source %s: %s not used: %s", source.get("SOPInstanceUID", "?"), keyword, problem)
        return None
    return elem.value if not (elem.value == "" or elem.value is None) else None


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


def _aspect_ratio(source: Dataset) -> list[int] | None:
    """Pixel Aspect Ratio (vertical, horizontal) for the derived object when the source's pixels are not square.

    Only called when the source has no Pixel Spacing (which, copied, keeps the ratio). A viewer otherwise takes
    the ratio from Imager/Nominal Scanned Pixel Spacing, an enhanced object's Pixel Measures, or Pixel Aspect
    Ratio (PS3.3 C.7.6.3.1.7); the derived object carries none of those, so without this its picture is shown
    stretched or squashed beside the source's.
    """
    def shared_spacing() -> Any:
        shared = source.get("SharedFunctionalGroupsSequence")
        measures = shared[0].get("PixelMeasuresSequence") if shared else None
        return measures[0].get("PixelSpacing") if measures else None

    for read in (lambda: source.get("ImagerPixelSpacing"), lambda: source.get("NominalScannedPixelSpacing"),
                 shared_spacing, lambda: source.get("PixelAspectRatio")):
        try:  # an invalid value is skipped, as a viewer skips it
            values = _values(read())
            vertical, horizontal = (float(values[0]), float(values[1])) if len(values) == 2 else (0.0, 0.0)
        except Exception:
            continue
        if vertical > 0 and horizontal > 0 and np.isfinite(vertical / horizontal):
            ratio = Fraction(vertical / horizontal).limit_denominator(1000)
            return None if ratio == 1 else [ratio.numerator, ratio.denominator]
    return None


def _single_frame(
    source: Dataset, stored: np.ndarray, color: bool, bits: int, series_uid: str, sop_uid: str, series_number: int,
    instance_number: int, settings: DeriveSettings,
) -> Dataset:
    spacing = _pixel_spacing(source)
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
        # highdicom takes single letters only; the source's (validated, possibly oblique "L\\PF") value or
        # an empty one replaces this placeholder when the identity is copied
        patient_orientation=("A", "F"),
        pixel_spacing=spacing,
        transfer_syntax_uid=ExplicitVRLittleEndian,
    )
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
    _cine(source, ds, nframes)
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
    ds.BurnedInAnnotation = str(_source_value(source, "BurnedInAnnotation") or "YES")  # Type 1 here: unknown = assume text
    spacing = _pixel_spacing(source)
    if spacing is not None:
        ds.PixelSpacing = [f"{v:.6g}" for v in spacing]
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in stored)  # no stacked copy of all frames
    if len(data) % 2:
        data += b"\x00"
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def _cine(source: Dataset, ds: Dataset, nframes: int) -> None:
    """Frame timing for every multi-frame source (gray or colour cine plays at its pace), else page order."""
    vector = _source_value(source, "FrameTimeVector")
    frame_time = _source_value(source, "FrameTime")
    if vector is not None and len(_values(vector)) == nframes:
        ds.FrameIncrementPointer = 0x00181065  # FrameTimeVector: variable frame rate
        ds.FrameTimeVector = source.FrameTimeVector
    elif frame_time is not None and float(frame_time) > 0:
        ds.FrameIncrementPointer = 0x00181063  # FrameTime: cine loops (ultrasound, XA, endoscopy video)
        ds.FrameTime = source.FrameTime
    else:
        ds.FrameIncrementPointer = 0x00182001  # PageNumberVector
        ds.PageNumberVector = list(range(1, nframes + 1))
        return
    for keyword in ("RecommendedDisplayFrameRate", "CineRate", "StartTrim", "StopTrim", "ActualFrameDuration",
                    "PreferredPlaybackSequencing"):
        if _source_value(source, keyword) is not None:
            ds[keyword] = copy.deepcopy(source[keyword])


def _overlays(source: Dataset, ds: Dataset, rows: int, columns: int) -> None:
    """Overlay planes (60xx groups with their own OverlayData) carried over: the geometry is unchanged.

    Overlays stored in unused bits of the source's pixel data cannot survive new pixel values and
    are not carried; neither are overlays on multi-frame sources (the multi-frame SC IODs have no
    Overlay Plane module).
    """
    for group in range(0x6000, 0x6020, 2):
        if (group << 16 | 0x3000) not in source:
            continue
        try:
            if int(source[group << 16 | 0x0010].value) != rows or int(source[group << 16 | 0x0011].value) != columns:
                continue
            for elem in source.group_dataset(group):
                ds.add(copy.deepcopy(elem))
        except Exception as exc:  # an incomplete overlay is dropped, not fatal
            log.info("source %s: overlay group %04X not carried over: %s", source.get("SOPInstanceUID", "?"), group,
                     type(exc).__name__)


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
        date = _source_value(source, date_kw)
        if date is not None:
            ds.ContentDate = date
            when = _source_value(source, time_kw)
            if when is not None:
                ds.ContentTime = when
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
    modality = _source_value(source, "Modality")
    ds.Modality = str(modality) if modality is not None else "OT"  # hanging protocols and worklists filter by it
    if len(stored) == 1:
        _overlays(source, ds, _rows, _columns)
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
    burned = _source_value(source, "BurnedInAnnotation")
    if burned is not None:
        ds.BurnedInAnnotation = burned
    if "PixelSpacing" not in ds:
        aspect = _aspect_ratio(source)
        if aspect is not None:
            ds.PixelAspectRatio = aspect
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
    # The copied identity elements are the source's raw bytes in its character set: declaring that
    # encoding as the dataset's own makes pydicom write them as they are instead of decoding and
    # re-encoding them (which drops a trailing "=" or "ESC ( B").
    correct_ambiguous_vr(ds, True)  # pydicom resolves "OB or OW" and "US or SS" only when it re-encodes
    ds.set_original_encoding(False, True, ds._character_set)
    return ds
