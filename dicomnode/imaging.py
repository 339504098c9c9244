"""DICOM pixel data <-> the float32 [0, 1] frames every enhancer takes.

Decoding does all the DICOM value handling so that models never see it: decompression (pydicom
with the pylibjpeg plugins: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate),
colour spaces (YBR is returned as RGB by pydicom 3 while the dataset still says YBR; PALETTE COLOR
is expanded through its LUT), MONOCHROME1 (or Presentation LUT Shape INVERSE) inversion, and for gray
data the modality transform (rescale, or a Modality LUT Sequence) followed by the VOI transform a viewer
would apply (window centre/width, a VOI LUT, or, when the sender gave neither, a per-frame min-max
stretch with pixel padding left out; 8-bit gray without either is shown over its full stored range).
The result is what a reader would see on screen, which is what the enhancement models were trained on.

Before the first frame is decoded, :func:`check_pixel_data` checks from the encoded bytes alone that
every frame is complete (each codestream's start, end and header against the dataset): the JPEG and
JPEG-LS decoders return a frame that was cut short as a whole image with the rest filled flat.

What decoding would cost is known from the header alone (:func:`decoded_frame_bytes`), so a frame or a
series over the node's budget is refused before the decoder allocates anything
(:func:`check_decode_budget`): a small JPEG whose header claims 65535 x 65535 pixels is never decoded.

Frames are decoded one at a time (:func:`iter_frames`) so a large multi-frame instance never has to
be held as float32 all at once. :func:`to_stored` maps enhanced frames back to the stored values
of the derived object: 8-bit RGB for colour, 8-bit gray for 8-bit sources and 16-bit gray for
deeper ones.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_modality_lut, get_decoder
from pydicom.uid import UID

# Transfer syntaxes whose pixel data went through lossy compression, with the DICOM method name.
LOSSY_METHODS: dict[str, str] = {
    "1.2.840.10008.1.2.4.50": "ISO_10918_1",  # JPEG baseline
    "1.2.840.10008.1.2.4.51": "ISO_10918_1",  # JPEG extended
    "1.2.840.10008.1.2.4.81": "ISO_14495_1",  # JPEG-LS near-lossless
    "1.2.840.10008.1.2.4.91": "ISO_15444_1",  # JPEG 2000 (may be lossy)
    "1.2.840.10008.1.2.4.93": "ISO_15444_1",  # JPEG 2000 Part 2 (may be lossy)
    "1.2.840.10008.1.2.4.203": "ISO_15444_15",  # HTJ2K (may be lossy)
}


RLE_LOSSLESS = "1.2.840.10008.1.2.5"
JPEG_LS = ("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81")

# Encapsulated syntaxes whose frames are checked for completeness before decoding, by codestream family.
_JPEG_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # baseline, extended
    "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",  # lossless
})
_JPEG_LS_SYNTAXES = frozenset({"1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"})
_J2K_SYNTAXES = frozenset({
    "1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.92", "1.2.840.10008.1.2.4.93",
    "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202", "1.2.840.10008.1.2.4.203",  # HTJ2K
})
# JPEG start-of-frame markers (SOF0-SOF15 less DHT C4, JPG C8 and DAC CC); JPEG-LS has SOF55 (F7) only.
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
_JPEG_LS_SOF = frozenset({0xF7})


class PixelDecodeError(ValueError):
    """The pixel data of an instance cannot be turned into frames; the message says why."""


@dataclass
class PixelInfo:
    """What the header says about the pixels: enough to decode them and to encode the result."""

    rows: int
    columns: int
    number_of_frames: int
    samples_per_pixel: int
    bits_allocated: int
    bits_stored: int
    pixel_representation: int
    photometric: str  # as the source states it
    transfer_syntax: str
    color: bool  # frames are (H, W, 3) RGB
    out_bits: int  # 8 or 16: the stored depth of the derived object


def _int(ds: Dataset, keyword: str, default: int | None = None) -> int:
    value = ds.get(keyword, default)
    if value is None or value == "":
        if default is None:
            raise PixelDecodeError(f"{keyword} is missing")
        return default
    try:
        return int(value)
    except (TypeError, ValueError):
        raise PixelDecodeError(f"{keyword} has an invalid value {value!r}") from None


def pixel_info(ds: Dataset) -> PixelInfo:
    """Check the header and say how the pixels will be decoded; PixelDecodeError if they cannot be."""
    if "PixelData" not in ds:
        if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds:
            raise PixelDecodeError("float pixel data (FloatPixelData/DoubleFloatPixelData) is not supported")
        raise PixelDecodeError("the instance has no PixelData")
    meta = getattr(ds, "file_meta", None)
    ts = meta.get("TransferSyntaxUID") if meta is not None else None
    if not ts:
        raise PixelDecodeError("the transfer syntax is unknown (no TransferSyntaxUID in the file meta)")
    ts = UID(str(ts))
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise PixelDecodeError(f"unsupported transfer syntax {ts} ({ts.name})") from None
    if not decoder.is_available:
        raise PixelDecodeError(f"no decoder plugin installed for transfer syntax {ts.name} ({ts})")

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if not photometric:
        raise PixelDecodeError("PhotometricInterpretation is missing")
    spp = _int(ds, "SamplesPerPixel", 1)
    bits_allocated = _int(ds, "BitsAllocated")
    bits_stored = _int(ds, "BitsStored", bits_allocated)
    rows, columns = _int(ds, "Rows"), _int(ds, "Columns")
    if rows < 1 or columns < 1:
        raise PixelDecodeError(f"image size {rows}x{columns} is empty")
    nframes = _int(ds, "NumberOfFrames", 1) if ds.get("NumberOfFrames") not in (None, "") else 1
    if nframes < 1:
        raise PixelDecodeError(f"NumberOfFrames is {nframes}")
    if bits_allocated == 1:
        raise PixelDecodeError("1-bit (binary/segmentation) pixel data is not an image to enhance")
    high_bit = _int(ds, "HighBit", bits_stored - 1)
    if high_bit != bits_stored - 1:
        # PS3.3 C.7.6.3.1 requires BitsStored - 1; the decoder keeps the low BitsStored bits, so values stored
        # higher up would be read from the wrong bits (a viewer such as DCMTK shifts them down)
        raise PixelDecodeError(f"HighBit {high_bit} is not BitsStored - 1 ({bits_stored - 1}): "
                               "the pixel values would be read from the wrong bits")

    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        if spp != 1:
            raise PixelDecodeError(f"{photometric} with SamplesPerPixel {spp}")
        color = False
    elif photometric == "PALETTE COLOR":
        if spp != 1:
            raise PixelDecodeError(f"PALETTE COLOR with SamplesPerPixel {spp}")
        if "RedPaletteColorLookupTableDescriptor" not in ds and "PaletteColorLookupTableUID" not in ds:
            raise PixelDecodeError("PALETTE COLOR without palette lookup tables")
        color = True
    elif photometric in ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420"):
        if spp != 3:
            raise PixelDecodeError(f"{photometric} with SamplesPerPixel {spp}")
        color = True
    else:
        raise PixelDecodeError(f"unsupported PhotometricInterpretation {photometric!r}")
    out_bits = 8 if color or bits_stored <= 8 else 16
    return PixelInfo(
        rows=rows,
        columns=columns,
        number_of_frames=nframes,
        samples_per_pixel=spp,
        bits_allocated=bits_allocated,
        bits_stored=bits_stored,
        pixel_representation=_int(ds, "PixelRepresentation", 0),
        photometric=photometric,
        transfer_syntax=str(ts),
        color=color,
        out_bits=out_bits,
    )


class DecodeBudgetExceeded(PixelDecodeError):
    """Decoding the instance would take more memory or work than the node's budget allows (not decoded)."""


def _size(n: int) -> str:
    """Bytes as a short human figure (binary units)."""
    value = float(n)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def decoded_frame_bytes(info: PixelInfo) -> int:
    """Memory one frame takes once decoded, from the header alone: the decoder's output (rows x columns x
    samples x bytes per sample; a palette expanded to 16-bit RGB) plus the float32 working copy the model
    takes (three channels for colour)."""
    pixels = info.rows * info.columns
    raw = pixels * info.samples_per_pixel * ((info.bits_allocated + 7) // 8)
    if info.photometric == "PALETTE COLOR":
        raw += pixels * 3 * 2
    return raw + pixels * (3 if info.color else 1) * 4


def check_decode_budget(info: PixelInfo, max_frame_bytes: int, max_series_bytes: int, series_so_far: int = 0) -> int:
    """DecodeBudgetExceeded unless one frame and the series (``series_so_far`` plus this instance) stay within
    their budgets; returns this instance's decoded bytes (all frames). Nothing is decoded to find out."""
    frame = decoded_frame_bytes(info)
    shape = (f"{info.rows}x{info.columns} (rows x columns), {info.samples_per_pixel} sample(s) of "
             f"{info.bits_allocated} bits")
    if frame > max_frame_bytes:
        raise DecodeBudgetExceeded(
            f"decoded size over budget: one frame of {shape} takes {_size(frame)} decoded with its float32 working copy, "
            f"more than node.max_decoded_frame_bytes {_size(max_frame_bytes)}; not decoded")
    total = frame * info.number_of_frames
    if series_so_far + total > max_series_bytes:
        raise DecodeBudgetExceeded(
            f"decoded size over budget: {info.number_of_frames} frame(s) of {shape} take {_size(total)} decoded, with "
            f"{_size(series_so_far)} before it in the series more than node.max_decoded_series_bytes "
            f"{_size(max_series_bytes)}; not decoded")
    return total


def _frame_item(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """The functional-group item (enhanced multi-frame objects) that applies to frame ``index``."""
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if per_frame and index < len(per_frame):
        group = per_frame[index]
        if sequence in group and group[sequence].value:
            return group[sequence].value[0]
    shared = ds.get("SharedFunctionalGroupsSequence")
    if shared:
        group = shared[0]
        if sequence in group and group[sequence].value:
            return group[sequence].value[0]
    return None


def _number(value: Any) -> float | None:
    """First value of a possibly multi-valued DS/IS element as float, None when absent or invalid."""
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple, pydicom.multival.MultiValue)):
        if not value:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if np.isfinite(number) else None


def _modality_values(raw: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    """Stored values -> modality values (PS3.3 C.11.1): the Modality LUT Sequence when the sender gave one
    (its output is what the window and VOI LUT are expressed in), else rescale slope and intercept."""
    if ds.get("ModalityLUTSequence"):
        try:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float64)
        except Exception as exc:  # a LUT that cannot be applied must not be silently skipped
            raise PixelDecodeError(f"cannot apply the Modality LUT Sequence: {exc}") from exc
    slope, intercept = _rescale(ds, index)
    return raw.astype(np.float64) * slope + intercept


def _rescale(ds: Dataset, index: int) -> tuple[float, float]:
    item = _frame_item(ds, index, "PixelValueTransformationSequence") or ds
    slope = _number(item.get("RescaleSlope"))
    intercept = _number(item.get("RescaleIntercept"))
    return (slope if slope not in (None, 0.0) else 1.0), (intercept if intercept is not None else 0.0)


def _window(ds: Dataset, index: int) -> tuple[float, float, str] | None:
    item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    center = _number(item.get("WindowCenter"))
    width = _number(item.get("WindowWidth"))
    if center is None or width is None or width <= 0:
        return None
    function = str(item.get("VOILUTFunction", "LINEAR") or "LINEAR").upper()
    return center, width, function


def _apply_window(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2 windowing onto [0, 1]."""
    if function == "SIGMOID":
        return (1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))).astype(np.float32)
    if function == "LINEAR_EXACT":
        out = (values - center) / width + 0.5
    else:  # LINEAR (the default); width 1 is a threshold
        if width <= 1:
            return (values >= center).astype(np.float32)
        out = (values - (center - 0.5)) / (width - 1) + 0.5
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def _minmax(values: np.ndarray, padding: np.ndarray | None = None, fill: float = 0.0) -> np.ndarray:
    """Stretch the image's own range onto [0, 1]; padding pixels (outside the image) take no part and are set
    to ``fill`` (1 where the frame is inverted for display afterwards, so they show black either way)."""
    real = values if padding is None or not padding.any() else values[~padding]
    if real.size == 0:
        return np.zeros(values.shape, dtype=np.float32)
    lo, hi = float(real.min()), float(real.max())
    if hi - lo <= 0:
        out = np.zeros(values.shape, dtype=np.float32)
    else:
        out = np.clip((values - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)
    if padding is not None:
        out[padding] = fill
    return out


def displays_inverted(ds: Dataset, photometric: str) -> bool:
    """Whether a viewer shows low stored values bright: MONOCHROME1, or MONOCHROME2 with Presentation LUT
    Shape INVERSE (PS3.3 C.11.6). MONOCHROME1 with INVERSE is one inversion, not two: that is how the DX
    and MG IODs require MONOCHROME1 to be stated."""
    if photometric == "MONOCHROME1":
        return True
    shape = str(ds.get("PresentationLUTShape", "") or "").strip().upper()
    return photometric == "MONOCHROME2" and shape == "INVERSE"


def _padding_mask(raw: np.ndarray, ds: Dataset) -> np.ndarray | None:
    """Pixels whose stored value is Pixel Padding Value (up to Pixel Padding Range Limit, either order):
    PS3.3 C.7.5.1.1.2, values that are not part of the image. None when the sender declared no padding."""
    signed = int(ds.get("PixelRepresentation", 0) or 0) == 1
    bits = min(int(ds.get("BitsAllocated", 16) or 16), 16)  # a US/SS value holds 16 bits at most

    def as_stored(v: float | None) -> float | None:
        # the VR follows PixelRepresentation: for a signed image a US value with the sign bit set is the
        # two's-complement negative (63536 is -2000), else it never matched the decoded (signed) pixels
        for width in (bits, 16):
            if v is not None and signed and 1 << (width - 1) <= v < 1 << width:
                return v - (1 << width)
        return v

    value = as_stored(_number(ds.get("PixelPaddingValue")))
    if value is None:
        return None
    limit = as_stored(_number(ds.get("PixelPaddingRangeLimit")))
    if limit is None:
        return raw == value
    lo, hi = min(value, limit), max(value, limit)
    return (raw >= lo) & (raw <= hi)


def _lut_input_signed(ds: Dataset, info: PixelInfo, index: int) -> bool:
    """Whether the VOI LUT's input (the modality values) can be negative, from the stored value range and the
    rescale (DCMTK decides the same way), not from the values one frame happens to hold."""
    if ds.get("ModalityLUTSequence"):
        return False  # its output is unsigned
    bits = info.bits_stored
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if info.pixel_representation else (0, (1 << bits) - 1)
    slope, intercept = _rescale(ds, index)
    return min(slope * lo + intercept, slope * hi + intercept) < 0


def _voi_lut_table(item: Dataset, little_endian: bool, signed_input: bool) -> tuple[np.ndarray, int]:
    """(LUT entries, first value mapped) of a VOI LUT item; ValueError or similar when it is unusable.

    The first value mapped is US or SS (PS3.3 C.11.2.1.1); a sender's US 64512 for a signed input means -1024,
    which is how DCMTK reads it. Without that, every pixel fell below the table and the image was black.
    """
    descriptor = [int(v) for v in item.LUTDescriptor]
    entries = (descriptor[0] & 0xFFFF) or 65536  # 0 means 2^16
    first = descriptor[1]
    if signed_input and first >= 0x8000:
        first -= 0x10000
    data = item.LUTData
    if isinstance(data, (bytes, bytearray, memoryview)):  # OW: 16-bit words in the dataset's byte order
        table = np.frombuffer(bytes(data), dtype="<u2" if little_endian else ">u2").astype(np.int64)
    else:
        table = np.atleast_1d(np.asarray(data, dtype=np.int64))
    if table.size < entries:
        raise ValueError(f"the VOI LUT holds {table.size} entries, its descriptor says {entries}")
    return table[:entries], first


def _gray_to_unit(raw: np.ndarray, ds: Dataset, info: PixelInfo, index: int) -> tuple[np.ndarray, str]:
    """Stored gray values -> displayed intensity in [0, 1] (before the display inversion, see displays_inverted)."""
    voi_item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    has_lut = bool("VOILUTSequence" in voi_item and voi_item.VOILUTSequence)
    window = _window(ds, index)
    # 8-bit gray without a VOI is display-ready (US, endoscopy, SC): the full stored range is the display range.
    # With a window or VOI LUT a viewer applies it, 8-bit or not (ignoring it showed an inverting LUT's negative).
    full_range = info.bits_stored <= 8 and info.pixel_representation == 0
    if full_range and not has_lut and window is None:
        return (raw.astype(np.float32) / float((1 << info.bits_stored) - 1)), "full-range"
    modality = _modality_values(raw, ds, index)
    if has_lut:
        try:
            # looked up here: pydicom indexes an 8-bit table with uint8 indices, which wrap past 256 entries
            table, first = _voi_lut_table(voi_item.VOILUTSequence[0], UID(info.transfer_syntax).is_little_endian,
                                          _lut_input_signed(ds, info, index))
        except Exception:  # a broken LUT falls back to the other transforms below
            table = None
        if table is not None and int(table.max()) > int(table.min()):
            mapped = table[np.clip(np.rint(modality) - first, 0, table.size - 1).astype(np.intp)]
            lo, hi = float(table.min()), float(table.max())
            return np.clip((mapped - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), "voi-lut"
    if window is not None:
        return _apply_window(modality, *window), "window"
    if full_range:  # its VOI LUT was unusable
        return (raw.astype(np.float32) / float((1 << info.bits_stored) - 1)), "full-range"
    # no window from the sender: the image's own range, without the padding a CT/MR-style sender may put
    # around it (a -2000 surround would otherwise squeeze the real pixels into the top of the range)
    fill = 1.0 if displays_inverted(ds, info.photometric) else 0.0
    return _minmax(modality, _padding_mask(raw, ds), fill), "minmax"


def _unpadded_end(data: bytes | memoryview) -> int:
    """Length of ``data`` less trailing padding: fragments are even length, encoders pad with 0x00 or 0xFF."""
    end = len(data)
    while end and data[end - 1] in (0x00, 0xFF):
        end -= 1
    return end


def _fragments(data: bytes) -> tuple[list[int], list[tuple[int, memoryview]]]:
    """(Basic Offset Table, [(offset of the item from the first fragment item, fragment bytes)]).

    Parsed here rather than by pydicom, whose fragment reader returns a short fragment as it is when
    an item claims more bytes than the pixel data holds.
    """
    view = memoryview(data)
    items: list[tuple[int, memoryview]] = []
    pos = 0
    while pos < len(view):
        if pos + 8 > len(view):
            raise PixelDecodeError(f"encapsulated pixel data is truncated: {len(view) - pos} bytes left at byte {pos}, "
                                   "too few for an item header")
        group, elem, length = struct.unpack_from("<HHL", view, pos)
        if (group, elem) == (0xFFFE, 0xE0DD):  # sequence delimiter
            break
        if (group, elem) != (0xFFFE, 0xE000):
            raise PixelDecodeError(f"encapsulated pixel data is corrupt: tag ({group:04X},{elem:04X}) at byte {pos} "
                                   "where an item should start")
        if length == 0xFFFFFFFF or pos + 8 + length > len(view):
            raise PixelDecodeError(f"encapsulated pixel data is truncated: the item at byte {pos} declares {length} bytes, "
                                   f"{len(view) - pos - 8} remain")
        items.append((pos, view[pos + 8:pos + 8 + length]))
        pos += 8 + length
    if not items:
        raise PixelDecodeError("encapsulated pixel data has no Basic Offset Table item")
    bot = items[0][1]
    if len(bot) % 4:
        raise PixelDecodeError(f"the Basic Offset Table is {len(bot)} bytes, not a multiple of 4")
    first = items[1][0] if len(items) > 1 else 0
    offsets = list(struct.unpack(f"<{len(bot) // 4}L", bot))
    return offsets, [(start - first, frag) for start, frag in items[1:]]


def _starts_codestream(fragment: memoryview, family: str) -> bool:
    if family in ("jpeg", "jpeg-ls"):
        return bytes(fragment[:2]) == b"\xff\xd8"
    if family == "j2k":
        return bytes(fragment[:4]) == b"\xff\x4f\xff\x51" or bytes(fragment[4:8]) == b"jP  "
    return False


def _encapsulated_frames(ds: Dataset, nframes: int, family: str | None) -> list[bytes | memoryview]:
    """The encoded bytes of each frame: by the Extended or Basic Offset Table, else by fragment count
    and (several fragments per frame) by where a codestream starts."""
    offsets, fragments = _fragments(ds.PixelData)
    if not fragments:
        raise PixelDecodeError("encapsulated pixel data holds no fragments")
    where = {start: i for i, (start, _) in enumerate(fragments)}
    eot, eot_lengths = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
    if eot and eot_lengths:
        if len(eot) % 8 or len(eot_lengths) != len(eot):
            raise PixelDecodeError("the Extended Offset Table and its lengths do not match")
        starts = struct.unpack(f"<{len(eot) // 8}Q", eot)
        lengths = struct.unpack(f"<{len(eot_lengths) // 8}Q", eot_lengths)
        if len(starts) != nframes:
            raise PixelDecodeError(f"the Extended Offset Table lists {len(starts)} frames, NumberOfFrames is {nframes}")
        frames: list[bytes | memoryview] = []
        for index, (start, length) in enumerate(zip(starts, lengths, strict=True)):
            if start not in where:
                raise PixelDecodeError(f"frame {index}: the Extended Offset Table points at byte {start}, "
                                       "which does not start a fragment")
            fragment = fragments[where[start]][1]
            if length > len(fragment):
                raise PixelDecodeError(f"frame {index} is truncated: the Extended Offset Table gives {length} bytes, "
                                       f"its fragment holds {len(fragment)}")
            frames.append(fragment[:length])
        return frames
    if offsets:
        if len(offsets) != nframes:
            raise PixelDecodeError(f"the Basic Offset Table lists {len(offsets)} frames, NumberOfFrames is {nframes}")
        if offsets[0] != 0 or any(b <= a for a, b in zip(offsets, offsets[1:])) or any(o not in where for o in offsets):
            raise PixelDecodeError("the Basic Offset Table does not point at the fragments' starts in order")
        bounds = [where[o] for o in offsets] + [len(fragments)]
    elif len(fragments) == nframes:
        bounds = list(range(nframes + 1))
    elif nframes == 1:
        bounds = [0, len(fragments)]
    elif len(fragments) < nframes or family is None or family == "rle":
        raise PixelDecodeError(f"encapsulated pixel data holds {len(fragments)} fragments for {nframes} frames "
                               "and no offset table")
    else:  # no offset table, several fragments per frame: a frame starts where a codestream starts
        bounds = [i for i, (_, frag) in enumerate(fragments) if _starts_codestream(frag, family)] + [len(fragments)]
        if bounds[0] != 0 or len(bounds) - 1 != nframes:
            raise PixelDecodeError(f"{len(bounds) - 1} codestreams start in the {len(fragments)} fragments, "
                                   f"NumberOfFrames is {nframes}")
    return [fragments[a][1] if b == a + 1 else b"".join(f for _, f in fragments[a:b])
            for a, b in zip(bounds, bounds[1:])]


def _check_jpeg(frame: bytes | memoryview, index: int, info: PixelInfo, *, ls: bool) -> None:
    """SOI ... EOI with a complete header whose SOF agrees with the dataset: decoders fill a cut frame silently."""
    what = "JPEG-LS" if ls else "JPEG"
    end = _unpadded_end(frame)
    if end < 4 or bytes(frame[:2]) != b"\xff\xd8":
        raise PixelDecodeError(f"frame {index}: the {what} codestream does not start with an SOI marker (FF D8)")
    if bytes(frame[end - 2:end]) != b"\xff\xd9":
        raise PixelDecodeError(f"frame {index} is truncated: its {what} codestream ({end} bytes) does not end "
                               "with an EOI marker (FF D9)")
    sofs = _JPEG_LS_SOF if ls else _JPEG_SOF
    pos, sof_seen = 2, False
    while True:
        if frame[pos] != 0xFF:
            raise PixelDecodeError(f"frame {index}: the {what} header is corrupt: no marker at byte {pos}")
        marker = frame[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:  # TEM, RSTn: no length
            pos += 2
            continue
        if marker in (0xD8, 0xD9) or pos + 4 > end:
            raise PixelDecodeError(f"frame {index}: the {what} codestream has no scan (no SOS marker)")
        length = int.from_bytes(frame[pos + 2:pos + 4], "big")
        if length < 2 or pos + 2 + length > end - 2:
            raise PixelDecodeError(f"frame {index} is truncated: its {what} marker segment FF {marker:02X} at byte {pos} "
                                   f"declares {length} bytes, {end - 2 - pos - 2} remain before EOI")
        if marker in sofs:
            if length < 8:
                raise PixelDecodeError(f"frame {index}: the {what} SOF segment is {length} bytes, too short")
            height = int.from_bytes(frame[pos + 5:pos + 7], "big")
            width = int.from_bytes(frame[pos + 7:pos + 9], "big")
            components = frame[pos + 9]
            # height 0: given later by a DNL marker (JPEG) or an LSE segment (JPEG-LS), as is width 0 in JPEG-LS
            if (height and height != info.rows) or ((width or not ls) and width != info.columns):
                raise PixelDecodeError(f"frame {index}: the {what} codestream is {height}x{width} (rows x columns), "
                                       f"the header says {info.rows}x{info.columns}")
            if components != info.samples_per_pixel:
                raise PixelDecodeError(f"frame {index}: the {what} codestream has {components} components, "
                                       f"SamplesPerPixel is {info.samples_per_pixel}")
            sof_seen = True
        elif marker == 0xDA:  # SOS: entropy-coded data follows, the header is complete
            if not sof_seen:
                raise PixelDecodeError(f"frame {index}: the {what} codestream has a scan before any frame header (SOF)")
            return
        pos += 2 + length


def _check_j2k(frame: bytes | memoryview, index: int, info: PixelInfo) -> None:
    """SOC+SIZ ... EOC with every tile-part's declared length present (a cut anywhere breaks the chain)."""
    if bytes(frame[4:8]) == b"jP  ":  # a JP2 file: the codestream is the contents of its jp2c box
        pos = 0
        while True:
            if pos + 8 > len(frame):
                raise PixelDecodeError(f"frame {index}: the JP2 file has no codestream box (jp2c)")
            size, kind, head = int.from_bytes(frame[pos:pos + 4], "big"), bytes(frame[pos + 4:pos + 8]), 8
            if size == 1 and pos + 16 <= len(frame):
                size, head = int.from_bytes(frame[pos + 8:pos + 16], "big"), 16
            elif size == 0:
                size = len(frame) - pos
            if size < head or pos + size > len(frame):
                raise PixelDecodeError(f"frame {index} is truncated: its JP2 box {kind!r} at byte {pos} declares "
                                       f"{size} bytes, {len(frame) - pos} remain")
            if kind == b"jp2c":
                frame = frame[pos + head:pos + size]
                break
            pos += size
    end = _unpadded_end(frame)
    if bytes(frame[:4]) != b"\xff\x4f\xff\x51":
        raise PixelDecodeError(f"frame {index}: the JPEG 2000 codestream does not start with SOC and SIZ (FF 4F FF 51)")
    if end < 44 or bytes(frame[end - 2:end]) != b"\xff\xd9":
        raise PixelDecodeError(f"frame {index} is truncated: its JPEG 2000 codestream ({end} bytes) does not end "
                               "with an EOC marker (FF D9)")
    lsiz = int.from_bytes(frame[4:6], "big")
    xsiz, ysiz, xosiz, yosiz = struct.unpack_from(">4L", frame, 8)
    components = int.from_bytes(frame[40:42], "big")
    if (ysiz - yosiz, xsiz - xosiz) != (info.rows, info.columns):
        raise PixelDecodeError(f"frame {index}: the JPEG 2000 image is {ysiz - yosiz}x{xsiz - xosiz} (rows x columns), "
                               f"the header says {info.rows}x{info.columns}")
    if components != info.samples_per_pixel:
        raise PixelDecodeError(f"frame {index}: the JPEG 2000 codestream has {components} components, "
                               f"SamplesPerPixel is {info.samples_per_pixel}")
    eoc = end - 2
    pos = 4 + lsiz
    while pos + 4 <= eoc and bytes(frame[pos:pos + 2]) != b"\xff\x90":  # main header segments up to the first SOT
        if frame[pos] != 0xFF:
            raise PixelDecodeError(f"frame {index}: the JPEG 2000 main header is corrupt: no marker at byte {pos}")
        pos += 2 + int.from_bytes(frame[pos + 2:pos + 4], "big")
    tile_parts = 0
    while pos < eoc:
        if pos + 12 > eoc or bytes(frame[pos:pos + 2]) != b"\xff\x90":
            raise PixelDecodeError(f"frame {index} is corrupt or truncated: no JPEG 2000 tile-part (SOT) at byte {pos}")
        psot = int.from_bytes(frame[pos + 6:pos + 10], "big")
        if psot == 0:  # the last tile-part runs to EOC
            psot = eoc - pos
        if psot < 12 or pos + psot > eoc:
            raise PixelDecodeError(f"frame {index} is truncated: JPEG 2000 tile-part {tile_parts} at byte {pos} "
                                   f"declares {psot} bytes, {eoc - pos} remain before EOC")
        pos += psot
        tile_parts += 1
    if not tile_parts:
        raise PixelDecodeError(f"frame {index}: the JPEG 2000 codestream holds no tile-part")


def _check_rle(frame: bytes | memoryview, index: int, info: PixelInfo) -> None:
    """The RLE header names one segment per byte plane, each starting inside the frame after the one before."""
    if len(frame) < 64:
        raise PixelDecodeError(f"frame {index} is truncated: {len(frame)} bytes cannot hold the 64-byte RLE header")
    count, *offsets = struct.unpack_from("<16L", frame)
    expected = info.samples_per_pixel * ((info.bits_allocated + 7) // 8)
    if count != expected:
        raise PixelDecodeError(f"frame {index}: the RLE header lists {count} segments, SamplesPerPixel "
                               f"{info.samples_per_pixel} x BitsAllocated {info.bits_allocated} needs {expected}")
    starts = offsets[:count]
    if starts[0] != 64:
        raise PixelDecodeError(f"frame {index}: the first RLE segment starts at byte {starts[0]}, not 64")
    for segment, (start, stop) in enumerate(zip(starts, [*starts[1:], len(frame)])):
        if start >= len(frame):
            raise PixelDecodeError(f"frame {index} is truncated: RLE segment {segment} starts at byte {start}, "
                                   f"the frame holds {len(frame)} bytes")
        if stop <= start:
            raise PixelDecodeError(f"frame {index}: RLE segment {segment + 1} does not start after segment {segment}")


def check_pixel_data(ds: Dataset, info: PixelInfo | None = None) -> None:
    """PixelDecodeError unless the stored pixel data holds every frame complete (no decoding).

    The JPEG and JPEG-LS decoders turn a frame that was cut short into a whole image with the rest
    filled flat; this finds the cut from the codestream's own structure first.
    """
    info = info or pixel_info(ds)
    ts = UID(info.transfer_syntax)
    if not ts.is_encapsulated:  # native and deflated: the bytes themselves (pydicom inflated deflate already)
        per_pixel = 2 if info.photometric == "YBR_FULL_422" else info.samples_per_pixel  # 4:2:2: Y Y Cb Cr
        frame_bytes = (info.rows * info.columns * per_pixel * info.bits_allocated + 7) // 8
        stored = len(ds.PixelData)
        if stored < frame_bytes * info.number_of_frames:
            raise PixelDecodeError(
                f"pixel data is truncated: {stored} bytes, less than expected ({info.number_of_frames} frame(s) of "
                f"{frame_bytes} bytes need {frame_bytes * info.number_of_frames}; frame {stored // frame_bytes} is cut short)")
        return
    family = ("jpeg" if ts in _JPEG_SYNTAXES else "jpeg-ls" if ts in _JPEG_LS_SYNTAXES
              else "j2k" if ts in _J2K_SYNTAXES else "rle" if ts == RLE_LOSSLESS else None)
    for index, frame in enumerate(_encapsulated_frames(ds, info.number_of_frames, family)):
        if family in ("jpeg", "jpeg-ls"):
            _check_jpeg(frame, index, info, ls=family == "jpeg-ls")
        elif family == "j2k":
            _check_j2k(frame, index, info)
        elif family == "rle":
            _check_rle(frame, index, info)


def _palette_scale(ds: Dataset, info: PixelInfo, dtype: np.dtype) -> float:
    """Full scale of the palette's output, decided over the whole palette (every index), not per frame: 255
    for 8-bit tables and for 16-bit tables whose every entry is <= 255 (8-bit entries stored in 16 bits), else
    65535. Judged on one frame's pixels, a frame using only the dark entries of a 16-bit palette was stretched
    x257 (near-black shown near-white)."""
    every = apply_color_lut(np.arange(1 << min(info.bits_stored, 16)).astype(dtype), ds)
    return 255.0 if every.dtype == np.uint8 or int(every.max(initial=0)) <= 255 else 65535.0


def iter_frames(ds: Dataset, info: PixelInfo | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """Yield (frame, voi) for each frame in order: frame float32 [0, 1], voi the transform used."""
    info = info or pixel_info(ds)
    decoder = get_decoder(UID(info.transfer_syntax))
    # pydicom tries its own pure-Python RLE decoder first; pylibjpeg-rle is ~8x faster when installed
    plugin = ""
    if info.transfer_syntax == RLE_LOSSLESS and "pylibjpeg" in decoder.available_plugins:
        plugin = "pylibjpeg"
    elif info.transfer_syntax in JPEG_LS and "pyjpegls" in decoder.available_plugins:
        plugin = "pyjpegls"  # ~5x faster than pylibjpeg-libjpeg on JPEG-LS (0.09 vs 0.50 s for a camera-size fundus)
    index = 0
    palette_scale = 0.0
    try:
        check_pixel_data(ds, info)  # before any frame is yielded: a cut last frame fails the whole instance
        frames = decoder.iter_array(ds, as_rgb=True, decoding_plugin=plugin)
        for index in range(info.number_of_frames):
            try:
                raw, meta = next(frames)
            except StopIteration:
                raise PixelDecodeError(
                    f"pixel data holds fewer frames than NumberOfFrames {info.number_of_frames} (stopped at {index})"
                ) from None
            if raw.shape[:2] != (info.rows, info.columns):
                raise PixelDecodeError(f"decoded frame {index} is {raw.shape[:2]}, header says {info.rows}x{info.columns}")
            if raw.size != info.rows * info.columns * info.samples_per_pixel:
                raise PixelDecodeError(f"decoded frame {index} holds {raw.size} samples, header says "
                                       f"{info.rows}x{info.columns}x{info.samples_per_pixel}")
            if info.photometric == "PALETTE COLOR":
                rgb = apply_color_lut(raw, ds)
                palette_scale = palette_scale or _palette_scale(ds, info, raw.dtype)
                yield np.clip(rgb.astype(np.float32) / palette_scale, 0.0, 1.0), "palette"
            elif info.color:
                scale = float((1 << min(info.bits_stored, int(meta.get("bits_stored", info.bits_stored)))) - 1)
                yield np.clip(raw.astype(np.float32) / scale, 0.0, 1.0), "full-range"
            else:
                unit, voi = _gray_to_unit(raw, ds, info, index)
                if displays_inverted(ds, info.photometric):
                    unit = 1.0 - unit
                yield np.ascontiguousarray(unit, dtype=np.float32), voi
    except PixelDecodeError:
        raise
    except Exception as exc:  # decoder errors (truncated data, corrupt codestream) name the syntax
        raise PixelDecodeError(
            f"cannot decode {UID(info.transfer_syntax).name} pixel data (frame {index}): {exc}"
        ) from exc


def to_stored(frame: np.ndarray, out_bits: int) -> np.ndarray:
    """A float [0, 1] frame -> unsigned stored values (uint8, or uint16 using all 16 bits)."""
    if out_bits not in (8, 16):
        raise ValueError(f"out_bits must be 8 or 16, not {out_bits}")
    arr = np.asarray(frame, dtype=np.float32)
    if not np.all(np.isfinite(arr)):
        raise ValueError("enhanced frame contains NaN or infinite values")
    if out_bits == 8:
        return np.rint(np.clip(arr, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.rint(np.clip(arr, 0.0, 1.0) * 65535.0).astype(np.uint16)
