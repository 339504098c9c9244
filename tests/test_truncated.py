"""Truncated pixel data is refused before decoding, for every decoder (issue: "A truncated JPEG becomes
a clean enhanced image").

The JPEG and JPEG-LS decoders turn a frame that was cut short into a whole image with the rest filled
flat; :func:`dicomnode.imaging.check_pixel_data` finds the cut from the codestream's own structure.
Inputs are pydicom's bundled files and images encoded here, re-encapsulated with one frame cut: to a
seventh of its bytes, to 90 %, without its end marker, and the last frame of multi-frame objects; in
every fragment layout (Basic Offset Table or none, several fragments per frame, Extended Offset Table).
"""

from __future__ import annotations

import copy
import shutil
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.uid import (
    HTJ2K,
    UID,
    HTJ2KLossless,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLSLossless,
    RLELossless,
)

from dicomnode.imaging import PixelDecodeError, check_pixel_data, iter_frames, pixel_info

from factories import bundled, free_port, image_dataset, sample


def nframes(ds: Dataset) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def encoded_frames(ds: Dataset) -> list[bytes]:
    return list(generate_frames(ds.PixelData, number_of_frames=nframes(ds)))


def relabel(name: str, syntax: str) -> Callable[[], Dataset]:
    """A bundled file's codestream under another transfer syntax of the same family that decodes it."""
    def build() -> Dataset:
        ds = sample(name)
        ds.file_meta.TransferSyntaxUID = UID(syntax)
        return ds
    return build


def encoded(syntax: str, frames: int, color: bool) -> Callable[[], Dataset]:
    """A smooth multi-frame image with noise, compressed here by pydicom (pyjpegls, openjpeg, RLE)."""
    def build() -> Dataset:
        rng = np.random.default_rng(0)
        yy, xx = np.mgrid[0:40, 0:56]
        if color:
            base = np.stack([xx * 4, yy * 5, 255 - xx * 3], axis=-1)
            arr = np.stack([base + rng.integers(0, 9, base.shape) for _ in range(frames)]).astype(np.uint8)
        else:
            base = xx * 40 + yy * 30
            arr = np.stack([base + rng.integers(0, 200, base.shape) for _ in range(frames)]).astype(np.uint16)
        ds = image_dataset(arr[0], study="truncated", series=syntax)
        ds.NumberOfFrames = frames
        ds.compress(syntax, arr)
        return ds
    return build


# (id, dataset builder): every transfer syntax the issue names, single- and multi-frame
SINGLE = [
    ("jpeg-baseline-ybr", lambda: sample("SC_rgb_jpeg_dcmtk.dcm")),
    ("jpeg-baseline-422", lambda: sample("SC_rgb_dcmtk_+eb+cy+np.dcm")),
    ("jpeg-extended-12bit", lambda: sample("JPGExtended.dcm")),
    ("jpeg-lossless-sv1", lambda: sample("SC_rgb_jpeg_gdcm.dcm")),
    ("jpeg-lossless-p14", relabel("SC_rgb_jpeg_gdcm.dcm", JPEGLossless)),
    ("jpegls-lossless", lambda: sample("MR_small_jpeg_ls_lossless.dcm")),
    ("jpegls-near-lossless-rgb", lambda: sample("SC_rgb_jls_lossy_line.dcm")),
    ("jpegls-near-lossless-16", lambda: sample("JPEGLSNearLossless_16.dcm")),
    ("j2k-lossless", lambda: sample("MR_small_jp2klossless.dcm")),
    ("j2k-lossless-ybr-rct", lambda: sample("examples_jpeg2k.dcm")),
    ("j2k", lambda: sample("JPEG2000.dcm")),
    ("j2k-rgb", lambda: sample("SC_rgb_gdcm_KY.dcm")),
    ("htj2k-lossless", relabel("MR_small_jp2klossless.dcm", HTJ2KLossless)),
    ("htj2k", relabel("JPEG2000.dcm", HTJ2K)),
    ("rle-rgb", lambda: sample("SC_rgb_rle.dcm")),
    ("rle-16bit", lambda: sample("MR_small_RLE.dcm")),
]
MULTI = [
    ("jpeg-baseline-us-30", lambda: sample("examples_ybr_color.dcm")),
    ("jpegls-lossless-4", encoded(JPEGLSLossless, 4, color=False)),
    ("jpegls-lossless-rgb-3", encoded(JPEGLSLossless, 3, color=True)),
    ("j2k-lossless-4", encoded(JPEG2000Lossless, 4, color=False)),
    ("j2k-lossless-rgb-3", encoded(JPEG2000Lossless, 3, color=True)),
    ("rle-rgb-2", lambda: sample("SC_rgb_rle_2frame.dcm")),
    ("rle-dose-15", lambda: sample("rtdose_rle.dcm")),
    ("rle-encoded-4", encoded(RLELossless, 4, color=False)),
]
LAYOUTS = ["bot", "no-bot", "3-fragments-bot", "3-fragments-no-bot", "extended"]


CUTS: dict[str, Callable[[bytes], bytes]] = {
    "seventh": lambda f: f[: len(f) // 7],
    "ninety-percent": lambda f: f[: len(f) * 9 // 10],
    # JPEG EOI / JPEG 2000 EOC after the padding (0x00, or 0xFF as in JPGExtended.dcm); RLE: its last bytes
    "end-marker-dropped": lambda f: f.rstrip(b"\x00").removesuffix(b"\xff")[:-2],
}


def rebuilt(ds: Dataset, frames: list[bytes], layout: str = "bot") -> Dataset:
    """``ds`` with ``frames`` encapsulated again in ``layout``."""
    out = copy.deepcopy(ds)
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in out:
            del out[keyword]
    if layout == "extended":
        out.PixelData, out.ExtendedOffsetTable, out.ExtendedOffsetTableLengths = encapsulate_extended(frames)
    else:
        out.PixelData = encapsulate(frames, fragments_per_frame=3 if layout.startswith("3-") else 1,
                                    has_bot=not layout.endswith("no-bot"))
    out.NumberOfFrames = len(frames)
    return out


def decode_all(ds: Dataset) -> list[np.ndarray]:
    return [frame for frame, _voi in iter_frames(ds, pixel_info(ds))]


def layouts_for(ds: Dataset) -> list[str]:
    # RLE: "each frame shall be encoded in one and only one fragment" (PS3.5 A.4.2)
    return [lay for lay in LAYOUTS if not (ds.file_meta.TransferSyntaxUID == RLELossless and lay.startswith("3-"))]


@pytest.mark.parametrize("build", [b for _, b in SINGLE], ids=[i for i, _ in SINGLE])
def test_single_frame_cut_is_refused(build) -> None:
    ds = build()
    [frame] = encoded_frames(ds)
    intact = decode_all(rebuilt(ds, [frame]))
    assert len(intact) == 1 and intact[0].shape[:2] == (ds.Rows, ds.Columns)
    for cut, how in CUTS.items():
        with pytest.raises(PixelDecodeError, match="frame 0") as err:
            decode_all(rebuilt(ds, [how(frame)]))
        assert "truncated" in str(err.value) or "RLE" in str(err.value), (cut, str(err.value))


@pytest.mark.parametrize("build", [b for _, b in MULTI], ids=[i for i, _ in MULTI])
def test_multi_frame_with_last_frame_cut_is_refused_in_every_layout(build) -> None:
    ds = build()
    frames = encoded_frames(ds)
    assert len(frames) == nframes(ds) > 1
    rle = ds.file_meta.TransferSyntaxUID == RLELossless
    for layout in layouts_for(ds):
        intact = decode_all(rebuilt(ds, frames, layout))
        assert len(intact) == len(frames), layout
        for cut, how in CUTS.items():
            bad = rebuilt(ds, [*frames[:-1], how(frames[-1])], layout)
            with pytest.raises(PixelDecodeError, match=f"frame {len(frames) - 1}"):
                decode_all(bad)
            if not rle or cut == "seventh":  # RLE segments carry no length: a short last one is the decoder's find
                with pytest.raises(PixelDecodeError, match=f"frame {len(frames) - 1}"):
                    next(iter_frames(bad))  # before any frame is decoded
        # the whole last frame missing (the Extended Offset Table still lists it)
        missing = rebuilt(ds, frames[:-1], layout)
        missing.NumberOfFrames = len(frames)
        if layout == "extended":
            missing.ExtendedOffsetTable, missing.ExtendedOffsetTableLengths = encapsulate_extended(frames)[1:]
        with pytest.raises(PixelDecodeError):
            check_pixel_data(missing)


def test_a_cut_first_frame_of_a_multi_frame_us_is_refused() -> None:
    ds = sample("examples_ybr_color.dcm")
    frames = encoded_frames(ds)
    with pytest.raises(PixelDecodeError, match="frame 0 is truncated"):
        check_pixel_data(rebuilt(ds, [frames[0][: len(frames[0]) // 7], *frames[1:]], "no-bot"))


def test_cut_pixel_data_element_is_refused() -> None:
    """The file itself ends inside the last fragment: the item claims more bytes than there are."""
    ds = sample("SC_rgb_jpeg_dcmtk.dcm")
    data = bytes(ds.PixelData)
    ds.PixelData = data[: len(data) - 300]
    with pytest.raises(PixelDecodeError, match="item at byte .* declares .* remain"):
        decode_all(ds)


def test_j2k_hole_inside_the_codestream_is_refused() -> None:
    """EOC intact, bytes missing inside a tile-part: its declared length (Psot) runs past the EOC."""
    ds = sample("MR_small_jp2klossless.dcm")
    [frame] = encoded_frames(ds)
    holed = frame[: len(frame) // 2] + frame[-200:]
    with pytest.raises(PixelDecodeError, match="tile-part 0 .* declares"):
        check_pixel_data(rebuilt(ds, [holed]))


def _jp2(codestream: bytes, rows: int, columns: int, components: int, bits: int) -> bytes:
    def box(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">L", 8 + len(payload)) + kind + payload

    ihdr = box(b"ihdr", struct.pack(">LLHBBBB", rows, columns, components, bits - 1, 7, 0, 0))
    colr = box(b"colr", struct.pack(">BBBL", 1, 0, 0, 17 if components == 1 else 16))
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 " + b"\0\0\0\0" + b"jp2 ")
            + box(b"jp2h", ihdr + colr) + box(b"jp2c", codestream))


def test_jp2_wrapped_codestream_is_checked_inside_its_box() -> None:
    ds = sample("MR_small_jp2klossless.dcm")
    [frame] = encoded_frames(ds)
    wrapped = _jp2(frame.rstrip(b"\0"), ds.Rows, ds.Columns, 1, ds.BitsStored)
    check_pixel_data(rebuilt(ds, [wrapped]))  # intact: accepted
    for how in CUTS.values():
        with pytest.raises(PixelDecodeError, match="frame 0"):
            check_pixel_data(rebuilt(ds, [how(wrapped)]))


@pytest.mark.parametrize(
    "name, change, reason",
    [
        ("SC_rgb_jpeg_dcmtk.dcm", {"Rows": 90}, r"JPEG codestream is 100x100 .* header says 90x100"),
        ("MR_small_jpeg_ls_lossless.dcm", {"Columns": 32}, r"JPEG-LS codestream is 64x64 .* says 64x32"),
        ("JPEG2000.dcm", {"Rows": 512}, r"JPEG 2000 image is 1024x256 .* says 512x256"),
        ("SC_rgb_gdcm_KY.dcm", {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"},
         "JPEG 2000 codestream has 3 components, SamplesPerPixel is 1"),
        ("SC_rgb_jpeg_gdcm.dcm", {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"},
         "JPEG codestream has 3 components, SamplesPerPixel is 1"),
        ("SC_rgb_rle.dcm", {"SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2"},
         "RLE header lists 3 segments, SamplesPerPixel 1 x BitsAllocated 8 needs 1"),
    ],
)
def test_codestream_header_must_agree_with_the_dataset(name: str, change: dict, reason: str) -> None:
    ds = sample(name)
    for keyword, value in change.items():
        setattr(ds, keyword, value)
    with pytest.raises(PixelDecodeError, match=reason):
        decode_all(ds)


def test_jpeg_without_a_scan_is_refused() -> None:
    ds = sample("SC_rgb_jpeg_dcmtk.dcm")
    [frame] = encoded_frames(ds)
    sos = frame.index(b"\xff\xda")
    with pytest.raises(PixelDecodeError, match="no SOS marker"):
        check_pixel_data(rebuilt(ds, [frame[:sos] + b"\xff\xd9"]))


def test_more_or_fewer_codestreams_than_frames_are_refused() -> None:
    ds = sample("examples_ybr_color.dcm")
    frames = encoded_frames(ds)
    claims_fewer = rebuilt(ds, frames, "bot")
    claims_fewer.NumberOfFrames = 29
    with pytest.raises(PixelDecodeError, match="Basic Offset Table lists 30 frames, NumberOfFrames is 29"):
        check_pixel_data(claims_fewer)
    frame_missing = rebuilt(ds, frames[:-1], "3-fragments-no-bot")
    frame_missing.NumberOfFrames = 30
    with pytest.raises(PixelDecodeError, match="29 codestreams start in the 87 fragments, NumberOfFrames is 30"):
        check_pixel_data(frame_missing)


def test_native_and_deflated_pixel_data_must_hold_every_frame() -> None:
    with pytest.raises(PixelDecodeError, match="truncated: 8130 bytes, less than expected .* frame 0 is cut short"):
        decode_all(sample("MR_truncated.dcm"))
    dose = sample("rtdose.dcm")  # 15 frames, 32-bit native
    decode_all(dose)
    dose.PixelData = dose.PixelData[:-10]
    with pytest.raises(PixelDecodeError, match="frame 14 is cut short"):
        check_pixel_data(dose)
    deflated = sample("image_dfl.dcm")  # pydicom inflates the dataset on reading
    decode_all(deflated)
    deflated.PixelData = deflated.PixelData[: len(deflated.PixelData) // 7]
    with pytest.raises(PixelDecodeError, match="truncated"):
        decode_all(deflated)


def test_every_intact_bundled_compressed_file_passes_the_check() -> None:
    """No false alarm on the encoders pydicom collected (dcmtk, gdcm, padding with 0x00 or 0xFF)."""
    skip = {"JPEG2000-embedded-sequence-delimiter.dcm",  # an invalid SIZ: no decoder takes it either
            "JPEG-lossy.dcm"}  # undecodable by every plugin
    checked = 0
    for path in sorted((Path(pydicom.data.__file__).parent / "test_files").glob("*.dcm")):  # no download
        try:
            ds = pydicom.dcmread(path)
            if not ds.file_meta.TransferSyntaxUID.is_encapsulated or path.name in skip:
                continue
            info = pixel_info(ds)
        except Exception:  # noqa: BLE001 - not an image the node takes
            continue
        check_pixel_data(ds, info)
        checked += 1
    assert checked >= 30


def test_decoded_frame_with_the_wrong_sample_count_is_refused(monkeypatch) -> None:
    """After decoding, a frame must hold Rows x Columns x SamplesPerPixel samples."""
    import dicomnode.imaging as imaging

    class Wrong:
        def iter_array(self, ds, **kwargs):
            yield np.zeros((ds.Rows, ds.Columns, 3), np.uint16), {}

    ds = sample("MR_small.dcm")
    info = pixel_info(ds)
    monkeypatch.setattr(imaging, "get_decoder", lambda uid: Wrong())
    with pytest.raises(PixelDecodeError, match="decoded frame 0 holds 12288 samples, header says 64x64x1"):
        next(iter_frames(ds, info))


# ------------------------------------------------------------------------------------- the pipeline
def _series_pair(folder: Path) -> tuple[Path, Path]:
    """Two instances of one series from the bundled JPEG: one intact, one with its fragment cut to 1/7."""
    ds = sample("SC_rgb_jpeg_dcmtk.dcm")
    [frame] = encoded_frames(ds)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, data in enumerate([frame, frame[: len(frame) // 7]]):
        out = rebuilt(ds, [data])
        del out.NumberOfFrames
        out.SOPInstanceUID = out.file_meta.MediaStorageSOPInstanceUID = f"1.2.826.0.1.3680043.10.1234.77.{i + 1}"
        out.InstanceNumber = i + 1
        path = folder / f"{'intact' if i == 0 else 'truncated'}.dcm"
        out.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths[0], paths[1]


def test_pipeline_fails_the_truncated_instance_and_writes_the_intact_one(tmp_path: Path) -> None:
    from dicomnode.assemble import series_from_files
    from dicomnode.pipeline import Pipeline
    from dicomnode.resident import ResidentModels
    from models.registry import build_model

    intact, truncated = _series_pair(tmp_path / "in")
    [series], skipped = series_from_files([intact, truncated], ["Modality"])
    assert not skipped
    models = ResidentModels.single("clahe", build_model("clahe"))
    out = tmp_path / "out"
    outcome = Pipeline(None, models).run(series, out, model="clahe")
    assert [p for p, _ in outcome.failed] == [truncated]
    [(_, reason)] = outcome.failed
    assert "frame 0 is truncated" in reason and "EOI" in reason
    assert len(outcome.outputs) == 1 and outcome.error is None
    written = sorted(out.rglob("*.dcm"))  # (an output the quality gate holds back is written under out/gated/)
    assert written == sorted(outcome.outputs)
    refs = {str(i.ReferencedSOPInstanceUID) for i in pydicom.dcmread(written[0]).SourceImageSequence}
    assert refs == {"1.2.826.0.1.3680043.10.1234.77.1"}  # derived from the intact instance only


# ------------------------------------------------------------------------------------- the live node
@pytest.mark.slow
def test_live_node_fails_a_truncated_jpeg_quarantines_it_and_sends_nothing(tmp_path: Path) -> None:
    """Over real C-STORE: the node accepts the bytes, the job fails with the truncation named, the
    source goes to quarantine with its reason and nothing derived reaches the PACS."""
    if shutil.which("storescp") is None:
        pytest.skip("needs storescp (dcmtk)")
    from dicomnode.spool import Spool

    from reliability import LedgerView, NodeProcess, StoreSCP, node_config, raw_object, send_raw, wait_until

    ds = sample("examples_ybr_color.dcm")  # a 30-frame US whose last frame is cut to 90 %
    frames = encoded_frames(ds)
    bad = rebuilt(ds, [*frames[:-1], frames[-1][: len(frames[-1]) * 9 // 10]], "bot")
    rules = [{"name": "us", "match": {"Modality": "US"}, "model": "clahe", "destinations": ["pacs"]}]
    with StoreSCP(tmp_path / "pacs") as pacs:
        cfg = node_config(tmp_path / "var", free_port(),
                          {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}}, rules=rules)
        ledger = LedgerView(tmp_path / "var")
        with NodeProcess(tmp_path, cfg) as node:
            assert send_raw(node.port, [raw_object(bad)], tmp_path / "send") == [0]
            wait_until(lambda: ledger.settled() and ledger.jobs().get("failed") == 1, 30, 0.2, "the job failed")
        [job] = ledger.job_records()
        assert job.state == "failed" and "frame 29 is truncated" in job.error
        quarantine = Spool(tmp_path / "var").quarantine_dir
        reasons = [p.read_text() for p in quarantine.glob("*.reason.txt")]
        assert len(reasons) == 1 and f"{bad.SOPInstanceUID}.dcm" in reasons[0] and "truncated" in reasons[0]
        assert not ledger.deliveries()
    assert not [p for p in (tmp_path / "pacs").iterdir() if p.is_file()]


def test_bundled_multi_frame_us_is_the_one_from_the_issue() -> None:
    """Guard: the live test's input is the 30-frame JPEG baseline US (so "frame 29" is its last)."""
    ds = pydicom.dcmread(bundled("examples_ybr_color.dcm"), stop_before_pixels=True)
    assert ds.Modality == "US" and int(ds.NumberOfFrames) == 30
    assert ds.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.50"
