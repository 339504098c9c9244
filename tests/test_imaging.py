"""Pixel decoding: every photometric interpretation, bit depth and transfer syntax -> [0, 1] frames."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.imaging import PixelDecodeError, iter_frames, pixel_info, to_stored

from conftest import require_tools
from factories import decode, read_ascii_pnm, sample


def gray_dataset(pixels: np.ndarray, **attrs) -> Dataset:
    """A minimal native single-frame gray dataset around ``pixels``."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    bits = pixels.dtype.itemsize * 8
    ds.BitsAllocated = bits
    ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 1 if pixels.dtype.kind == "i" else 0
    if pixels.ndim == 3:
        ds.NumberOfFrames = pixels.shape[0]
    for key, value in attrs.items():
        setattr(ds, key, value)
    ds.PixelData = pixels.tobytes()
    return ds


@pytest.mark.parametrize(
    "name, nframes, shape, color, out_bits",
    [
        ("CT_small.dcm", 1, (128, 128), False, 16),  # 16-bit signed, rescale
        ("MR_small.dcm", 1, (64, 64), False, 16),  # window centre/width
        ("image_dfl.dcm", 1, (512, 512), False, 8),  # deflated, 8-bit gray
        ("JPEGLSNearLossless_08.dcm", 1, (45, 10), False, 8),  # JPEG-LS lossy 8-bit
        ("JPEGLSNearLossless_16.dcm", 1, (50, 10), False, 16),  # JPEG-LS lossy 16-bit
        ("JPGExtended.dcm", 1, (1024, 256), False, 16),  # JPEG extended 12-bit
        ("JPEG2000.dcm", 1, (1024, 256), False, 16),  # JPEG 2000 lossy
        ("693_J2KI.dcm", 1, (512, 512), False, 16),  # JPEG 2000 lossy CT
        ("examples_overlay.dcm", 1, (300, 484), False, 16),  # 12 stored in 16
        ("rtdose.dcm", 15, (10, 10), False, 16),  # 32-bit multi-frame
        ("ExplVR_BigEnd.dcm", 1, (60, 80, 3), True, 8),  # big endian RGB
        ("SC_rgb_jpeg_gdcm.dcm", 1, (100, 100, 3), True, 8),  # JPEG lossless RGB
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 1, (100, 100, 3), True, 8),  # JPEG baseline YBR_FULL_422
        ("SC_rgb_jls_lossy_line.dcm", 1, (100, 100, 3), True, 8),  # JPEG-LS RGB
        ("SC_rgb_gdcm_KY.dcm", 1, (100, 100, 3), True, 8),  # JPEG 2000 RGB
        ("examples_jpeg2k.dcm", 1, (480, 640, 3), True, 8),  # JPEG 2000 YBR_RCT
        ("SC_rgb_rle_16bit_2frame.dcm", 2, (100, 100, 3), True, 8),  # RLE 16-bit RGB multi-frame
        ("SC_ybr_full_422_uncompressed.dcm", 1, (100, 100, 3), True, 8),  # native YBR_FULL_422
        ("examples_palette.dcm", 1, (350, 800, 3), True, 8),  # PALETTE COLOR -> RGB
        ("examples_ybr_color.dcm", 30, (240, 320, 3), True, 8),  # US multi-frame JPEG YBR
    ],
)
def test_decode_shapes_and_range(name, nframes, shape, color, out_bits):
    ds = sample(name)
    info = pixel_info(ds)
    img = decode(ds)
    assert len(img.frames) == nframes
    assert info.color is color and info.out_bits == out_bits
    for frame in img.frames:
        assert frame.shape == shape and frame.dtype == np.float32
        assert 0.0 <= float(frame.min()) and float(frame.max()) <= 1.0
    assert float(np.ptp(img.frames[0])) > 0.1  # not a blank image


def test_lossless_transfer_syntaxes_decode_identically():
    reference = decode(sample("MR_small.dcm")).frames[0]
    for name in (
        "MR_small_RLE.dcm",
        "MR_small_bigendian.dcm",
        "MR_small_implicit.dcm",
        "MR_small_jp2klossless.dcm",
        "MR_small_jpeg_ls_lossless.dcm",
    ):
        np.testing.assert_array_equal(decode(sample(name)).frames[0], reference, err_msg=name)


def test_ybr_jpeg_matches_rgb_rendition_of_same_picture():
    """pydicom 3 hands back RGB for YBR data although the dataset still says YBR."""
    ds = sample("SC_rgb_dcmtk_+eb+cy+np.dcm")
    assert ds.PhotometricInterpretation == "YBR_FULL_422"
    ybr = decode(ds).frames[0]
    rgb = decode(sample("SC_rgb_rle.dcm")).frames[0]
    assert float(np.abs(ybr - rgb).mean()) < 0.02  # JPEG loss only; no channel swap or YCbCr values
    uncompressed = decode(sample("SC_ybr_full_422_uncompressed.dcm")).frames[0]
    assert float(np.abs(uncompressed - rgb).mean()) < 0.02


def test_palette_colour_is_looked_up():
    ds = sample("examples_palette.dcm")
    frame = decode(ds).frames[0]
    index = ds.pixel_array  # raw palette indices
    red = np.frombuffer(ds.RedPaletteColorLookupTableData, dtype="<u2").astype(np.float64) / 65535.0
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    y, x = np.unravel_index(np.argmax(index), index.shape)
    expected = red[min(max(int(index[y, x]) - first, 0), red.size - 1)]
    assert frame[y, x, 0] == pytest.approx(expected, abs=1e-3)


def test_window_centre_width_is_applied_after_rescale():
    pixels = np.array([[0, 1000, 1040, 1080, 2000]], dtype=np.uint16)
    ds = gray_dataset(pixels, RescaleSlope=1, RescaleIntercept=-1024, WindowCenter=40, WindowWidth=81)
    frame = decode(ds).frames[0]
    # modality values -1024, -24, 16, 56, 976; LINEAR: (x - (c - 0.5)) / (w - 1) + 0.5, clipped
    np.testing.assert_allclose(frame[0], [0.0, 0.0, 0.20625, 0.70625, 1.0], atol=1e-6)


def test_signed_pixels_and_min_max_without_window():
    pixels = np.array([[-1000, 0, 1000]], dtype=np.int16)
    frame = decode(gray_dataset(pixels)).frames[0]
    np.testing.assert_allclose(frame[0], [0.0, 0.5, 1.0], atol=1e-6)


def test_voi_lut_sequence_is_used():
    pixels = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11, WindowCenter=1000, WindowWidth=10)
    lut = Dataset()
    lut.LUTDescriptor = [4, 0, 16]
    lut.LUTData = [0, 4000, 1000, 2000]  # deliberately non-monotonic: only a LUT gives this order
    ds.VOILUTSequence = [lut]
    frame = decode(ds).frames[0]
    np.testing.assert_allclose(frame[0], [0.0, 1.0, 0.25, 0.5], atol=1e-6)
    assert decode(ds).voi == ["voi-lut"]


def test_monochrome1_is_inverted():
    pixels = np.array([[0, 64, 255]], dtype=np.uint8)
    m2 = decode(gray_dataset(pixels)).frames[0]
    ds1 = gray_dataset(pixels)
    ds1.PhotometricInterpretation = "MONOCHROME1"
    m1 = decode(ds1).frames[0]
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m1[0, 0] == pytest.approx(1.0)


def test_eight_bit_gray_keeps_full_range_without_a_voi_and_applies_one_it_has():
    """8-bit gray with no window is shown over its full stored range; one with a window or VOI LUT is shown
    through it, as a viewer does (it was ignored: an inverting VOI LUT reached PACS as the negative)."""
    pixels = np.array([[0, 100, 128, 255]], dtype=np.uint8)
    plain = decode(gray_dataset(pixels))
    np.testing.assert_allclose(plain.frames[0][0], pixels[0] / 255.0, atol=1e-6)
    assert plain.voi == ["full-range"]
    windowed = decode(gray_dataset(pixels, WindowCenter=128, WindowWidth=2))
    np.testing.assert_allclose(windowed.frames[0][0], [0.0, 0.0, 1.0, 1.0], atol=1e-6)  # width 2: a threshold
    assert windowed.voi == ["window"]
    lut = Dataset()
    lut.LUTDescriptor = [256, 0, 8]
    lut.LUTData = list(range(255, -1, -1))  # inverting
    inverted = decode(gray_dataset(pixels, VOILUTSequence=[lut])).frames[0]
    np.testing.assert_allclose(inverted[0], 1.0 - pixels[0] / 255.0, atol=1e-6)


def test_multiframe_is_decoded_frame_by_frame_with_per_frame_values():
    pixels = np.stack([np.full((4, 5), v, dtype=np.uint16) for v in (100, 200, 300)])
    pixels[:, 0, 0] = 0
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11)
    frames = list(iter_frames(ds))
    assert len(frames) == 3
    for frame, voi in frames:
        assert frame.shape == (4, 5) and voi == "minmax"
        assert frame[0, 0] == 0.0 and frame[1, 1] == 1.0


def test_enhanced_multiframe_uses_per_frame_functional_groups():
    pixels = np.stack([np.array([[0, 100, 200]], dtype=np.uint16)] * 2)
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11)
    shared = Dataset()
    rescale = Dataset()
    rescale.RescaleSlope = 2
    rescale.RescaleIntercept = 0
    rescale.RescaleType = "US"
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center, width in ((200, 401), (100, 201)):
        group, voi = Dataset(), Dataset()
        voi.WindowCenter = center
        voi.WindowWidth = width
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    first, second = (frame for frame, _ in iter_frames(ds))
    # modality values 0, 200, 400 (slope 2 from the shared group), each frame its own window
    np.testing.assert_allclose(first[0], [0.00125, 0.50125, 1.0], atol=1e-6)
    np.testing.assert_allclose(second[0], [0.0025, 1.0, 1.0], atol=1e-6)


def test_jpeg_ybr_from_img2dcm(tmp_path: Path):
    require_tools("img2dcm")
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:48, 0:64]
    rgb = np.stack([xx * 4, yy * 5, 255 - xx * 3], axis=-1).astype(np.uint8)
    rgb = np.clip(rgb.astype(int) + rng.integers(-5, 6, rgb.shape), 0, 255).astype(np.uint8)
    jpg = tmp_path / "in.jpg"
    Image.fromarray(rgb).save(jpg, quality=95)
    out = tmp_path / "out.dcm"
    subprocess.run(["img2dcm", str(jpg), str(out)], check=True, capture_output=True)
    ds = pydicom.dcmread(out)
    assert ds.PhotometricInterpretation.startswith("YBR")
    frame = decode(ds).frames[0]
    reference = np.asarray(Image.open(jpg).convert("RGB"), dtype=np.float32) / 255.0
    assert frame.shape == (48, 64, 3)
    assert float(np.abs(frame - reference).mean()) < 0.01


@pytest.mark.parametrize(
    "name, reason",
    [
        ("rtplan.dcm", "no PixelData"),
        ("MR_truncated.dcm", "less than expected"),
        ("liver_1frame.dcm", "1-bit"),
    ],
)
def test_undecodable_instances_name_the_reason(name, reason):
    with pytest.raises(PixelDecodeError, match=reason):
        decode(sample(name))


def test_unsupported_transfer_syntax():
    ds = sample("MR_small.dcm")
    ds.file_meta.TransferSyntaxUID = "1.2.3.4.5"
    with pytest.raises(PixelDecodeError, match="unsupported transfer syntax 1.2.3.4.5"):
        pixel_info(ds)


def test_missing_frames_are_reported():
    pixels = np.zeros((2, 4, 4), dtype=np.uint8)
    ds = gray_dataset(pixels)
    ds.NumberOfFrames = 3
    with pytest.raises(PixelDecodeError):
        decode(ds)


def test_unsupported_photometric_interpretation():
    ds = gray_dataset(np.zeros((4, 4), dtype=np.uint8))
    ds.PhotometricInterpretation = "HSV"
    with pytest.raises(PixelDecodeError, match="PhotometricInterpretation 'HSV'"):
        decode(ds)


def test_to_stored_bit_depths():
    frame = np.array([[0.0, 0.5, 1.0, 1.5, -0.2]], dtype=np.float32)
    np.testing.assert_array_equal(to_stored(frame, 8)[0], [0, 128, 255, 255, 0])
    np.testing.assert_array_equal(to_stored(frame, 16)[0], [0, 32768, 65535, 65535, 0])
    assert to_stored(frame, 16).dtype == np.uint16
    with pytest.raises(ValueError, match="NaN"):
        to_stored(np.array([[np.nan]], dtype=np.float32), 8)
    with pytest.raises(ValueError):
        to_stored(frame, 12)


def test_pixel_padding_takes_no_part_in_the_stretch_and_shows_black():
    """A 12-bit frame without a window, its surround stored as Pixel Padding Value: the real pixels span
    the whole display range (not squeezed by the padding) and the padding is black, MONOCHROME1 too."""
    pixels = np.full((6, 6), 0, dtype=np.uint16)  # padding 0 around...
    pixels[1:5, 1:5] = np.arange(16, dtype=np.uint16).reshape(4, 4) * 10 + 3000  # ...an image at 3000-3150
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11, PixelPaddingValue=0)
    frame, voi = next(iter_frames(ds))
    assert voi == "minmax"
    assert frame[1, 1] == 0.0 and frame[4, 4] == pytest.approx(1.0) and frame[0, 0] == 0.0
    inner = frame[1:5, 1:5]
    assert float(inner.max() - inner.min()) == pytest.approx(1.0)  # without the padding rule: 0.05
    ds.PhotometricInterpretation = "MONOCHROME1"
    inverted, _ = next(iter_frames(ds))
    assert inverted[0, 0] == 0.0 and inverted[1, 1] == pytest.approx(1.0)

    ranged = pixels.copy()
    ranged[0, :] = 5  # a padding range 0-10 (Pixel Padding Range Limit)
    ds2 = gray_dataset(ranged, BitsStored=12, HighBit=11, PixelPaddingValue=0, PixelPaddingRangeLimit=10)
    frame2, _ = next(iter_frames(ds2))
    assert float(frame2[0].max()) == 0.0 and frame2[4, 4] == pytest.approx(1.0) and frame2[1, 1] == 0.0
    plain, _ = next(iter_frames(gray_dataset(pixels, BitsStored=12, HighBit=11)))  # no padding declared: as before
    assert plain[0, 0] == 0.0 and float(plain[1:5, 1:5].min()) > 0.9


@pytest.mark.parametrize("limit", [None, 63526])  # a single value, and a range -2000..-2010 stated as US too
def test_pixel_padding_value_stated_as_us_on_a_signed_image_is_its_negative(tmp_path: Path, limit: int | None):
    """Many CT scanners write Pixel Padding Value -2000 as US 63536 (the VR follows Pixel Representation): on a
    signed image that is the two's-complement -2000, so the padding takes no part in the min-max stretch."""
    pixels = np.full((6, 6), -2000, dtype=np.int16)
    pixels[0, 0] = -2010 if limit is not None else -2000
    pixels[1:5, 1:5] = np.arange(16, dtype=np.int16).reshape(4, 4) * 10 - 100  # the image: -100..50 HU
    ds = gray_dataset(pixels)
    ds["PixelPaddingValue"] = pydicom.DataElement(0x00280120, "US", 63536)
    if limit is not None:
        ds["PixelPaddingRangeLimit"] = pydicom.DataElement(0x00280121, "US", limit)
    path = tmp_path / "padded.dcm"
    ds.save_as(path, enforce_file_format=True)  # explicit VR: read back as US 63536, not resolved to SS
    back = pydicom.dcmread(path)
    assert back.PixelPaddingValue == 63536
    frame, voi = next(iter_frames(back))
    assert voi == "minmax"
    inner = frame[1:5, 1:5]
    assert float(inner.min()) == 0.0 and float(inner.max()) == pytest.approx(1.0)  # before: squeezed into 0.95-1
    assert float(frame[0].max()) == 0.0 and frame[0, 0] == 0.0


def test_modality_lut_sequence_is_applied_before_the_window():
    """A sender that maps stored values through a Modality LUT Sequence (not rescale) states its window in
    the LUT's output units: decoding without the LUT windowed raw values and sent a wrong image."""
    from pydicom.sequence import Sequence

    pixels = np.array([[0, 1, 2, 3]], dtype=np.uint16)
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11, WindowCenter=2000, WindowWidth=1001)
    item = Dataset()
    item.LUTDescriptor = [4, 0, 16]
    item.ModalityLUTType = "US"
    item.LUTData = [1500, 2500, 2000, 1000]  # not monotonic: only a real lookup gets this right
    ds.ModalityLUTSequence = Sequence([item])
    frame, voi = next(iter_frames(ds))
    assert voi == "window"
    np.testing.assert_allclose(frame[0], [0.0, 1.0, 0.5, 0.0], atol=2e-3)


def test_presentation_lut_shape_inverse_displays_inverted():
    """MONOCHROME2 with Presentation LUT Shape INVERSE is shown inverted by viewers, so it is decoded
    inverted (the enhanced series would otherwise be a negative of what the reader saw); MONOCHROME1
    with INVERSE is one inversion (how DX and MG state MONOCHROME1)."""
    pixels = np.array([[0, 64, 255]], dtype=np.uint8)
    plain = decode(gray_dataset(pixels)).frames[0]
    inverse = decode(gray_dataset(pixels, PresentationLUTShape="INVERSE")).frames[0]
    np.testing.assert_allclose(inverse, 1.0 - plain, atol=1e-6)
    identity = decode(gray_dataset(pixels, PresentationLUTShape="IDENTITY")).frames[0]
    np.testing.assert_allclose(identity, plain, atol=1e-6)
    ds1 = gray_dataset(pixels, PresentationLUTShape="INVERSE")
    ds1.PhotometricInterpretation = "MONOCHROME1"
    np.testing.assert_allclose(decode(ds1).frames[0], 1.0 - plain, atol=1e-6)


def test_high_bit_other_than_bits_stored_minus_one_is_refused():
    """12 bits stored in bits 4-15 (HighBit 15): the decoder keeps the low 12 bits, which would be a wrong
    image; DCMTK shifts them down. PS3.3 requires HighBit = BitsStored - 1, so the instance is refused."""
    values = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 64) << 4
    ds = gray_dataset(values, BitsStored=12, HighBit=15)
    with pytest.raises(PixelDecodeError, match="HighBit 15 is not BitsStored - 1"):
        decode(ds)


def _voi_lut_item(first: int, data: list[int], bits: int, descriptor_vr: str = "US") -> Dataset:
    item = Dataset()
    item.LUTDescriptor = [len(data), first, bits]
    item["LUTDescriptor"].VR = descriptor_vr
    item.LUTData = data
    item["LUTData"].VR = "US"
    return item


def test_eight_bit_voi_lut_with_more_than_256_entries_is_looked_up_by_full_index():
    """An 8-bit-output VOI LUT over a 12-bit input range (2048 entries): pydicom's lookup indexes it with
    uint8 indices, which wrap every 256 entries and gave a sawtooth instead of the LUT's ramp."""
    pixels = np.array([[0, 512, 1024, 1536, 2047]], dtype=np.uint16)
    ds = gray_dataset(pixels, BitsStored=12, HighBit=11, RescaleSlope=1, RescaleIntercept=-1024)
    ds.VOILUTSequence = [_voi_lut_item(-1024, [i // 8 for i in range(2048)], 8, "SS")]
    frame, voi = next(iter_frames(ds))
    assert voi == "voi-lut"
    np.testing.assert_allclose(frame[0], [0.0, 64 / 255, 128 / 255, 192 / 255, 1.0], atol=1e-6)


@pytest.mark.parametrize("signed", [False, True])
def test_voi_lut_first_value_mapped_stored_as_us_for_a_signed_input(signed):
    """A first-value-mapped of -1024 sent as US 64512 (the descriptor is US or SS) for an input that can be
    negative means -1024, as DCMTK reads it; taken as 64512 every pixel fell below the table: a black image."""
    modality = np.array([[-1024, -512, 0, 512, 1023]])
    if signed:
        ds = gray_dataset(modality.astype(np.int16))
    else:  # unsigned pixels, a negative intercept: the LUT's input (modality values) is still signed
        ds = gray_dataset((modality + 1024).astype(np.uint16), RescaleSlope=1, RescaleIntercept=-1024)
    ds.VOILUTSequence = [_voi_lut_item(64512, [i * 32 for i in range(2048)], 16)]
    frame, _ = next(iter_frames(ds))
    np.testing.assert_allclose(frame[0], (modality[0] + 1024) / 2047, atol=1e-6)  # table entry index / last index


def test_palette_full_scale_is_decided_over_the_whole_palette_not_the_frame():
    """A 16-bit palette that starts dark (cubic): a frame using only its first entries has looked-up values
    <= 255, and judging 8 vs 16 bits from those stretched the near-black frame to near-white."""
    cubic = np.rint((np.arange(256) / 255.0) ** 3 * 65535).astype("<u2")
    ds = gray_dataset(np.arange(40, dtype=np.uint8).reshape(5, 8))
    ds.PhotometricInterpretation = "PALETTE COLOR"
    for colour in ("Red", "Green", "Blue"):
        setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
        setattr(ds, f"{colour}PaletteColorLookupTableData", cubic.tobytes())
    frame = decode(ds).frames[0]
    expected = cubic[:40].astype(np.float32).reshape(5, 8) / 65535.0
    for channel in range(3):
        np.testing.assert_allclose(frame[..., channel], expected, atol=1e-6)
    assert float(frame.max()) < 0.004  # a near-black frame stays near-black


# --- agreement with DCMTK's renderer (dcmj2pnm), the reference viewer pipeline --------------------------------


def _ramp(dtype: str = "u2", scale: int = 64) -> np.ndarray:
    yy, xx = np.mgrid[0:24, 0:32]
    return (xx * scale + yy * 3).astype(dtype)


def _dcmtk_case(name: str) -> tuple[Dataset, list[str]]:
    """(dataset, dcmj2pnm VOI options) for each compared case: bundled files and the risky constructions."""
    if name.endswith(".dcm"):
        ds = sample(name)
        window = "WindowCenter" in ds and "WindowWidth" in ds
        return ds, (["+Wi", "1"] if window else [] if pixel_info(ds).color else ["+Wm"])
    ramp = _ramp()
    if name == "signed12_garbage_high_bits_rescale_window":
        stored = (ramp.astype(np.int64) % 4096 - 2048) & 0xFFF  # 12-bit two's complement, not sign-extended
        stored |= (np.arange(stored.size).reshape(stored.shape) % 16) << 12  # overlay-like garbage above
        return gray_dataset(stored.astype(np.uint16), BitsStored=12, HighBit=11, PixelRepresentation=1,
                            RescaleSlope="0.5", RescaleIntercept="-100", WindowCenter=-300, WindowWidth=800), ["+Wi", "1"]
    if name == "two_windows_first_used":
        return gray_dataset(ramp.astype(np.int16) - 500, WindowCenter=[200, 1000], WindowWidth=[600, 4000]), ["+Wi", "1"]
    if name == "sigmoid":
        return gray_dataset(ramp, WindowCenter=1000, WindowWidth=900, VOILUTFunction="SIGMOID"), ["+Wi", "1"]
    if name == "monochrome1_window":
        return gray_dataset(ramp, PhotometricInterpretation="MONOCHROME1", WindowCenter=1000, WindowWidth=1500), ["+Wi", "1"]
    if name == "presentation_lut_inverse_minmax":
        return gray_dataset(ramp, BitsStored=12, HighBit=11, PresentationLUTShape="INVERSE"), ["+Wm"]
    if name == "uint32_minmax":
        return gray_dataset(ramp.astype(np.uint32) * 100000), ["+Wm"]
    if name == "eight_bit_window":
        return gray_dataset((ramp // 8).astype(np.uint8), WindowCenter=100, WindowWidth=80), ["+Wi", "1"]
    if name == "eight_bit_lut_2048_entries":
        ds = gray_dataset(ramp, RescaleSlope=1, RescaleIntercept=-1024)
        ds.VOILUTSequence = [_voi_lut_item(-1024, [i // 8 for i in range(2048)], 8, "SS")]
        return ds, ["+Wl", "1"]
    if name == "lut_first_value_as_us":
        ds = gray_dataset(ramp, RescaleSlope=1, RescaleIntercept=-1024)
        ds.VOILUTSequence = [_voi_lut_item(64512, [i * 32 for i in range(2048)], 16)]
        return ds, ["+Wl", "1"]
    if name == "palette16_dark_frame":
        ds = gray_dataset((ramp % 41).astype(np.uint8))
        ds.PhotometricInterpretation = "PALETTE COLOR"
        cubic = np.rint((np.arange(256) / 255.0) ** 3 * 65535).astype("<u2")
        for colour in ("Red", "Green", "Blue"):
            setattr(ds, f"{colour}PaletteColorLookupTableDescriptor", [256, 0, 16])
            setattr(ds, f"{colour}PaletteColorLookupTableData", cubic.tobytes())
        return ds, []
    if name in ("rgb_planar1", "ybr_full_planar1"):
        yy, xx = np.mgrid[0:24, 0:32]
        planes = np.stack([xx * 8, yy * 10, 255 - xx * 6]).astype(np.uint8)  # (3, H, W): planar configuration 1
        ds = gray_dataset(planes[0])
        ds.SamplesPerPixel = 3
        ds.PlanarConfiguration = 1
        ds.PhotometricInterpretation = "RGB" if name == "rgb_planar1" else "YBR_FULL"
        ds.PixelData = planes.tobytes()
        return ds, []
    raise AssertionError(name)


@pytest.mark.parametrize("name", [
    "CT_small.dcm", "MR_small.dcm", "MR_small_RLE.dcm", "JPGExtended.dcm", "rtdose_rle_1frame.dcm",
    "examples_overlay.dcm", "SC_rgb_rle.dcm", "SC_ybr_full_422_uncompressed.dcm", "examples_palette.dcm",
    "SC_rgb_dcmtk_+eb+cy+np.dcm",
    "signed12_garbage_high_bits_rescale_window", "two_windows_first_used", "sigmoid", "monochrome1_window",
    "presentation_lut_inverse_minmax", "uint32_minmax", "eight_bit_window", "eight_bit_lut_2048_entries",
    "lut_first_value_as_us", "palette16_dark_frame", "rgb_planar1", "ybr_full_planar1",
])
def test_first_frame_agrees_with_dcmj2pnm(name, tmp_path: Path):
    """The decoded first frame is what DCMTK's renderer shows (overlays off, the first window or VOI LUT, or a
    min-max window where the file has none) to within rounding and JPEG decoder differences."""
    require_tools("dcmj2pnm")
    ds, voi_options = _dcmtk_case(name)
    source = tmp_path / "in.dcm"
    ds.save_as(source, enforce_file_format=True)
    rendered = tmp_path / "out.pnm"
    subprocess.run(["dcmj2pnm", "--no-overlays", "--write-16-bit-pnm", "--frame", "1", *voi_options,
                    str(source), str(rendered)], check=True, capture_output=True)
    reference = read_ascii_pnm(rendered)
    frame, _ = next(iter_frames(pydicom.dcmread(source)))
    assert frame.shape == reference.shape
    difference = np.abs(frame.astype(np.float64) - reference)
    assert float(difference.max()) < 0.015 and float(difference.mean()) < 0.003, (
        f"{name}: max {difference.max():.4f}, mean {difference.mean():.5f} from dcmj2pnm")
