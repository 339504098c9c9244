"""Secondary Capture derivation: provenance, deterministic UIDs, output formats, validity."""

from __future__ import annotations

import subprocess
from dataclasses import replace
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from dicomnode import __version__
from dicomnode.config import DerivePolicy
from dicomnode.derive import (
    MF_GRAYSCALE_BYTE_SC,
    MF_GRAYSCALE_WORD_SC,
    MF_TRUE_COLOR_SC,
    SC_IMAGE,
    DeriveError,
    DeriveSettings,
    derive_sc,
    derived_uids,
    read_private,
)
from dicomnode.imaging import to_stored
from models.registry import ModelInfo, build_model

from conftest import require_tools
from factories import decode, sample

SETTINGS = DeriveSettings(policy=DerivePolicy(institution_name="Test Hospital"), config_hash="c" * 64, node_ae_title="ENHANCER")
HQG = ModelInfo(kind="hqgnet", name="HQG-Net", version="2.1", weights_sha256="ab" * 32)




@pytest.fixture(scope="module")
def clahe():
    return build_model("clahe")


def enhanced(ds: Dataset, enhancer) -> list[np.ndarray]:
    return enhancer.enhance(decode(ds).frames)


def gray8_multiframe() -> Dataset:
    """An 8-bit gray multi-frame source (no bundled file has one)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = MF_GRAYSCALE_BYTE_SC
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Doe^Jane"
    ds.PatientID = "P8"
    ds.Modality = "XA"
    ds.SeriesNumber = 3
    ds.Rows, ds.Columns, ds.NumberOfFrames = 16, 24, 3
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = (np.arange(3 * 16 * 24) % 251).astype(np.uint8).tobytes()
    return ds


def test_provenance_of_single_frame_ct(clahe):
    src = sample("CT_small.dcm")
    out = derive_sc(src, enhanced(src, clahe), HQG, SETTINGS, "guid-CT-1")
    assert out.SOPClassUID == SC_IMAGE and out.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert list(out.ImageType)[:2] == ["DERIVED", "SECONDARY"] and out.ConversionType == "WSD"
    # same study and patient, new series
    assert out.StudyInstanceUID == src.StudyInstanceUID
    assert out.SeriesInstanceUID != src.SeriesInstanceUID and out.SOPInstanceUID != src.SOPInstanceUID
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID", "StudyDate"):
        assert out.get(keyword) == src.get(keyword), keyword
    assert out.SeriesNumber == int(src.SeriesNumber) + 1000
    assert out.InstanceNumber == int(src.InstanceNumber)
    assert out.SeriesDescription.endswith(" [enhanced, not for diagnosis]")
    assert out.ContentQualification == "RESEARCH"
    assert out.Rows == src.Rows and out.Columns == src.Columns
    assert out.BitsAllocated == 16 and out.PhotometricInterpretation == "MONOCHROME2"
    # derivation
    assert "HQG-Net" in out.DerivationDescription and "2.1" in out.DerivationDescription
    assert "ab" * 32 in out.DerivationDescription and "guid-CT-1" in out.DerivationDescription
    codes = {(c.CodeValue, c.CodingSchemeDesignator) for c in out.DerivationCodeSequence}
    assert codes == {("113087", "DCM"), ("113086", "DCM")}
    (ref,) = out.SourceImageSequence
    assert ref.ReferencedSOPInstanceUID == src.SOPInstanceUID and ref.ReferencedSOPClassUID == src.SOPClassUID
    assert ref.PurposeOfReferenceCodeSequence[0].CodeValue == "121322"
    (series,) = out.ReferencedSeriesSequence
    assert series.SeriesInstanceUID == src.SeriesInstanceUID
    assert series.ReferencedInstanceSequence[0].ReferencedSOPInstanceUID == src.SOPInstanceUID
    # equipment: acquisition device kept, the node appended last
    processing = out.ContributingEquipmentSequence[-1]
    assert processing.PurposeOfReferenceCodeSequence[0].CodeValue == "109102"
    assert processing.Manufacturer == "dicomnode" and processing.ManufacturerModelName == "HQG-Net"
    assert list(processing.SoftwareVersions) == [f"dicomnode {__version__}", "HQG-Net 2.1", f"weights sha256:{'ab' * 8}"]
    assert "ContributionDateTime" not in processing and "HQG-Net" in processing.ContributionDescription
    # dates come from the source, never the clock: the same source gives the same bytes
    assert out.ContentDate == src.ContentDate and "InstanceCreationDate" not in out and "DateOfSecondaryCapture" not in out
    assert processing.InstitutionName == "Test Hospital" and processing.StationName == "ENHANCER"
    acquisition = [i for i in out.ContributingEquipmentSequence if i.PurposeOfReferenceCodeSequence[0].CodeValue == "109101"]
    assert acquisition and acquisition[0].Manufacturer == src.Manufacturer
    assert read_private(out) == {
        "model_kind": "hqgnet",
        "model_name": "HQG-Net",
        "model_version": "2.1",
        "weights_sha256": "ab" * 32,
        "guidance_id": "guid-CT-1",
        "config_hash": "c" * 64,
        "node_version": __version__,
    }
    assert out.LossyImageCompression == "00"


def test_settings_change_marking(clahe):
    src = sample("MR_small.dcm")
    policy = SETTINGS.policy.model_copy(update={"series_number_offset": 5, "series_description_suffix": " (AI)",
                                                "content_qualification": "PRODUCT"})
    settings = replace(SETTINGS, policy=policy)
    out = derive_sc(src, enhanced(src, clahe), clahe.info, settings, None)
    assert out.SeriesNumber == int(src.SeriesNumber) + 5
    assert out.SeriesDescription.endswith(" (AI)") and out.ContentQualification == "PRODUCT"
    assert [c.CodeValue for c in out.DerivationCodeSequence] == ["113086"]  # CLAHE: contrast only
    assert read_private(out)["weights_sha256"] == ""


def test_long_series_description_fits_lo(clahe):
    src = sample("MR_small.dcm")
    src.SeriesDescription = "x" * 64
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert len(out.SeriesDescription) <= 64 and out.SeriesDescription.endswith("[enhanced, not for diagnosis]")
    assert out.SeriesDescription.isascii()  # no "…": the source may use the default character set


def test_icc_profile_of_colour_source_is_kept(clahe):
    src = sample("SC_rgb_jpeg_dcmtk.dcm")
    icc = Path(pydicom.data.__file__).parent / "test_files" / "crayons.icc"
    if not icc.is_file():
        pytest.skip("crayons.icc not bundled with this pydicom")
    src.ICCProfile = icc.read_bytes()
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert out.ICCProfile == src.ICCProfile
    gray = sample("CT_small.dcm")
    gray.ICCProfile = icc.read_bytes()
    assert "ICCProfile" not in derive_sc(gray, enhanced(gray, clahe), clahe.info, SETTINGS, None)


def test_lossy_source_stays_lossy_with_method_and_ratio(clahe):
    src = sample("SC_rgb_jpeg_dcmtk.dcm")  # JPEG baseline
    src.LossyImageCompressionRatio = "8.5"
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert out.LossyImageCompression == "01"
    methods = out["LossyImageCompressionMethod"].value
    assert "ISO_10918_1" in ([methods] if isinstance(methods, str) else list(methods))
    assert str(out.LossyImageCompressionRatio) == "8.5"


def test_laterality_and_burned_in_annotation_carried(clahe):
    src = sample("CT_small.dcm")
    src.Laterality = "L"
    src.ImageLaterality = "L"
    src.BurnedInAnnotation = "YES"
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert out.Laterality == "L" and out.ImageLaterality == "L" and out.BurnedInAnnotation == "YES"


def test_derived_uids_are_deterministic_and_model_specific():
    src = sample("CT_small.dcm")
    series, sop = derived_uids(src, HQG, "g1")
    assert (series, sop) == derived_uids(src, HQG, "g1")
    assert series != sop and pydicom.uid.UID(series).is_valid and pydicom.uid.UID(sop).is_valid
    other_weights = replace(HQG, weights_sha256="cd" * 32)
    assert derived_uids(src, other_weights, "g1")[0] != series
    assert derived_uids(src, HQG, "g2")[0] != series
    assert derived_uids(src, replace(HQG, version="2.2"), "g1")[0] != series
    sibling = sample("CT_small.dcm")
    sibling.SOPInstanceUID = generate_uid()
    sib_series, sib_sop = derived_uids(sibling, HQG, "g1")
    assert sib_series == series and sib_sop != sop  # one derived series per source series


def test_reprocessing_gives_same_uids(clahe):
    src = sample("MR_small.dcm")
    a = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    b = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert (a.SeriesInstanceUID, a.SOPInstanceUID) == (b.SeriesInstanceUID, b.SOPInstanceUID)
    assert a.PixelData == b.PixelData


@pytest.mark.parametrize(
    "name, sop_class, bits, photometric, nframes",
    [
        ("image_dfl.dcm", SC_IMAGE, 8, "MONOCHROME2", 1),
        ("CT_small.dcm", SC_IMAGE, 16, "MONOCHROME2", 1),
        ("SC_rgb_jpeg_dcmtk.dcm", SC_IMAGE, 8, "RGB", 1),
        ("examples_palette.dcm", SC_IMAGE, 8, "RGB", 1),
        ("JPEG2000.dcm", SC_IMAGE, 16, "MONOCHROME2", 1),  # NumberOfFrames 1 -> single-frame SC
        ("SC_rgb_rle_2frame.dcm", MF_TRUE_COLOR_SC, 8, "RGB", 2),
        ("rtdose.dcm", MF_GRAYSCALE_WORD_SC, 16, "MONOCHROME2", 15),
    ],
)
def test_output_formats_round_trip(tmp_path: Path, clahe, name, sop_class, bits, photometric, nframes):
    src = sample(name)
    frames = enhanced(src, clahe)
    out = derive_sc(src, frames, clahe.info, SETTINGS, None)
    path = tmp_path / "out.dcm"
    out.save_as(path, enforce_file_format=True)
    back = pydicom.dcmread(path)
    assert back.SOPClassUID == sop_class and back.BitsAllocated == bits and back.PhotometricInterpretation == photometric
    assert (back.Rows, back.Columns) == (src.Rows, src.Columns)
    assert int(back.get("NumberOfFrames", 1)) == nframes
    stored = np.stack([to_stored(f, bits) for f in frames])
    np.testing.assert_array_equal(back.pixel_array, stored if nframes > 1 else stored[0])


def test_gray8_multiframe_is_byte_sc(clahe):
    src = gray8_multiframe()
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert out.SOPClassUID == MF_GRAYSCALE_BYTE_SC and out.NumberOfFrames == 3 and out.BitsAllocated == 8
    assert out.PresentationLUTShape == "IDENTITY" and list(out.PageNumberVector) == [1, 2, 3]


def test_wrong_frames_are_refused(clahe):
    src = sample("CT_small.dcm")
    with pytest.raises(DeriveError, match="shape"):
        derive_sc(src, [np.zeros((64, 64), np.float32)], clahe.info, SETTINGS, None)
    with pytest.raises(DeriveError, match="frames"):
        derive_sc(src, [np.zeros((128, 128), np.float32)] * 2, clahe.info, SETTINGS, None)
    with pytest.raises(DeriveError, match="no frames"):
        derive_sc(src, [], clahe.info, SETTINGS, None)
    no_study = sample("CT_small.dcm")
    del no_study.StudyInstanceUID
    with pytest.raises(DeriveError, match="lacks StudyInstanceUID"):
        derive_sc(no_study, [np.zeros((128, 128), np.float32)], clahe.info, SETTINGS, None)
    with pytest.raises(DeriveError, match="NaN"):
        derive_sc(src, [np.full((128, 128), np.nan, np.float32)], clahe.info, SETTINGS, None)


def test_from_config_reads_derive_section():
    from dicomnode.config import parse_config

    config = parse_config(
        {
            "node": {"ae_title": "NODE7"},
            "destinations": {"out": {"folder": "out"}},
            "models": {"c": {"kind": "clahe"}},
            "rules": [{"name": "all", "match": {}, "model": "c", "destinations": ["out"]}],
            "derive": {"series_number_offset": 42, "institution_name": "Somewhere"},
        },
        Path("/tmp"),
    )
    settings = DeriveSettings.from_config(config)
    assert settings.policy.series_number_offset == 42 and settings.node_ae_title == "NODE7"
    assert settings.policy.institution_name == "Somewhere" and settings.config_hash == config.config_hash


def _validate(path: Path) -> list[str]:
    result = subprocess.run(["dciodvfy", "-new", str(path)], capture_output=True, text=True)
    return [line for line in (result.stdout + result.stderr).splitlines() if line.startswith("Error")]


@pytest.mark.parametrize(
    "name",
    [
        "image_dfl.dcm",  # gray 8-bit
        "CT_small.dcm",  # gray 16-bit
        "SC_rgb_jpeg_dcmtk.dcm",  # RGB from JPEG YBR
        "examples_palette.dcm",  # palette -> RGB
        "SC_rgb_rle_2frame.dcm",  # multi-frame true colour
        "examples_ybr_color.dcm",  # multi-frame true colour cine (FrameTime)
        "rtdose.dcm",  # multi-frame word
        "gray8-multiframe",  # multi-frame byte
    ],
)
def test_outputs_validate_and_render(tmp_path: Path, clahe, name):
    require_tools("dciodvfy", "dcmj2pnm")
    src = gray8_multiframe() if name == "gray8-multiframe" else sample(name)
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, "g")
    path = tmp_path / "out.dcm"
    out.save_as(path, enforce_file_format=True)
    assert _validate(path) == [], path.read_bytes()[:0]
    png = tmp_path / "out.png"
    subprocess.run(["dcmj2pnm", "+on", str(path), str(png)], check=True, capture_output=True)
    assert png.stat().st_size > 100


# ------------------------------------------------------------------ identity, values, timing, overlays


def _with_name_from(charset_file: str, tmp_path: Path) -> Path:
    """CT_small carrying the patient name bytes and character set of one of pydicom's charset files."""
    names = pydicom.dcmread(pydicom.data.get_charset_files(charset_file)[0])
    src = sample("CT_small.dcm")
    src[0x00080005] = names[0x00080005]
    src[0x00100010] = names.get_item(0x00100010)  # the raw element: its bytes exactly
    src.set_original_encoding(False, True, src._character_set)  # so pydicom writes those bytes as they are
    path = tmp_path / f"src-{charset_file}"
    src.save_as(path, enforce_file_format=True)
    assert bytes(pydicom.dcmread(path).get_item(0x00100010).value) == bytes(names.get_item(0x00100010).value)
    return path


@pytest.mark.parametrize("charset_file", ["chrX2.dcm", "chrX1.dcm", "chrI2.dcm", "chrKoreanMulti.dcm", "chrH32.dcm",
                                          "chrGerm.dcm", "chrArab.dcm"])
def test_identity_is_copied_byte_for_byte_with_its_character_set(tmp_path: Path, clahe, charset_file: str):
    """GB18030 and UTF-8 names ending in '=', ISO 2022 names ending in ESC ( B: the PACS sees the same bytes."""
    path = _with_name_from(charset_file, tmp_path)
    src = pydicom.dcmread(path)
    raw_name = bytes(src.get_item(0x00100010).value)
    out = derive_sc(src, enhanced(pydicom.dcmread(path), clahe), clahe.info, SETTINGS, None)
    written = tmp_path / "out.dcm"
    out.save_as(written, enforce_file_format=True)
    back = pydicom.dcmread(written)
    assert bytes(back.get_item(0x00100010).value) == raw_name
    assert back.SpecificCharacterSet == src.SpecificCharacterSet
    assert str(back.PatientName) == str(pydicom.dcmread(path).PatientName)


def test_invalid_source_values_are_dropped_not_copied(clahe, caplog):
    src = sample("CT_small.dcm")
    src.StudyDate = "1997.04.24"  # Type 2: kept present, emptied
    src.PatientOrientation = ["A", "F", "X"]  # three values where two are allowed
    src.PatientAge = "45"  # Type 3: dropped
    src.PatientSex = "Q"
    with caplog.at_level("INFO", logger="dicomnode.derive"):
        out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert "StudyDate" in out and out.StudyDate in ("", None)  # Type 2: present, empty
    assert out.PatientOrientation in ("", None) and "PatientAge" not in out and out.PatientSex in ("", None)
    assert "ContentDate" not in out or out.ContentDate != "1997.04.24"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "dicomnode.derive")
    assert "StudyDate not copied" in text and "PatientOrientation not copied" in text
    assert "1997.04.24" not in text  # the reason names the attribute, never the value


def test_oblique_orientation_and_modality_are_kept(clahe):
    src = sample("CT_small.dcm")
    src.PatientOrientation = ["L", "PF"]
    src.Modality = "XA"
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert list(out.PatientOrientation) == ["L", "PF"] and out.Modality == "XA"


def test_laterality_follows_the_body_part():
    clahe = build_model("clahe")
    src = sample("CT_small.dcm")
    for keyword in ("Laterality", "ImageLaterality"):
        if keyword in src:
            del src[keyword]
    src.BodyPartExamined = "HEAD"  # unpaired: no Laterality at all
    assert "Laterality" not in derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    src.BodyPartExamined = "KNEE"  # paired, side unknown: present and empty
    paired = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert "Laterality" in paired and paired.Laterality in ("", None)
    src.Laterality = "R"
    assert derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None).Laterality == "R"


@pytest.mark.parametrize("timing", ["FrameTime", "FrameTimeVector"])
def test_gray_cine_keeps_its_timing(clahe, timing: str):
    src = gray8_multiframe()
    if timing == "FrameTime":
        src.FrameTime = "33.3"
    else:
        src.FrameTimeVector = ["0", "33.3", "40"]
    src.RecommendedDisplayFrameRate = 30
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert out.FrameIncrementPointer == pydicom.datadict.tag_for_keyword(timing)
    assert out[timing].value == src[timing].value and out.RecommendedDisplayFrameRate == 30
    assert "PageNumberVector" not in out


def test_other_patient_ids_and_overlays_are_carried(clahe):
    src = sample("CT_small.dcm")
    src.OtherPatientIDs = ["OLD-1", "OLD-2"]
    src.add_new(0x60000010, "US", src.Rows)
    src.add_new(0x60000011, "US", src.Columns)
    src.add_new(0x60000040, "CS", "G")
    src.add_new(0x60000050, "SS", [1, 1])
    src.add_new(0x60000100, "US", 1)
    src.add_new(0x60000102, "US", 0)
    bits = np.zeros(src.Rows * src.Columns, dtype=np.uint8)
    bits[:200] = 1
    src.add_new(0x60003000, "OW", np.packbits(bits, bitorder="little").tobytes())
    out = derive_sc(src, enhanced(src, clahe), clahe.info, SETTINGS, None)
    assert list(out.OtherPatientIDs) == ["OLD-1", "OLD-2"]
    assert out[0x60003000].value == src[0x60003000].value and out[0x60000010].value == src.Rows


def test_pixel_encoding_and_every_model_option_change_the_uids():
    src = sample("CT_small.dcm")
    base = ModelInfo(kind="clahe", name="CLAHE", version="1", options={"clip_limit": 0.01, "max_side": 512})
    uids = derived_uids(src, base, None)
    assert derived_uids(src, base, None) == uids  # an unchanged rerun keeps them
    for change in ({"clip_limit": 0.05, "max_side": 512}, {"clip_limit": 0.01, "max_side": 1024},
                   {"clip_limit": 0.01, "max_side": 512, "color_mode": "luminance"}):
        other = derived_uids(src, replace(base, options=change), None)
        assert other[0] != uids[0] and other[1] != uids[1], change
