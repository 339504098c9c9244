"""DICOM pixel data <-> the float32 [0, 1] frames every enhancer takes.

Decoding does all the DICOM value handling so that models never see it: decompression (pydicom
with the pylibjpeg plugins: JPEG baseline/extended/lossless, JPEG-LS, JPEG 2000, RLE, deflate),
colour spaces (YBR is returned as RGB by pydicom 3 while the dataset still says YBR; PALETTE COLOR
is expanded through its LUT), MONOCHROME1 inversion, and for gray data deeper than 8 bits the
modality rescale followed by the VOI transform a viewer would apply (window centre/width, a VOI
LUT, or a per-frame min-max stretch when the sender gave neither). The result is what a reader
would see on screen, which is what the enhancement models were trained on.

Frames are decoded one at a time (:func:`iter_frames`) so a large multi-frame instance never has to
be held as float32 all at once. :func:`to_stored` maps enhanced frames back to the stored values
of the derived object: 8-bit RGB for colour, 8-bit gray for 8-bit sources and 16-bit gray for
deeper ones.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.pixels import apply_color_lut, apply_voi, get_decoder
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


def _minmax(values: np.ndarray) -> np.ndarray:
    lo, hi = float(values.min()), float(values.max())
    if hi - lo <= 0:
        return np.zeros(values.shape, dtype=np.float32)
    return ((values - lo) / (hi - lo)).astype(np.float32)


def _gray_to_unit(raw: np.ndarray, ds: Dataset, info: PixelInfo, index: int) -> tuple[np.ndarray, str]:
    """Stored gray values -> displayed intensity in [0, 1] (before MONOCHROME1 inversion)."""
    if info.bits_stored <= 8 and info.pixel_representation == 0:
        # 8-bit gray is display-ready (US, endoscopy, SC): the full stored range is the display range.
        return (raw.astype(np.float32) / float((1 << info.bits_stored) - 1)), "full-range"
    voi_item = _frame_item(ds, index, "FrameVOILUTSequence") or ds
    if "VOILUTSequence" in voi_item and voi_item.VOILUTSequence:
        slope, intercept = _rescale(ds, index)
        modality = raw.astype(np.float64) * slope + intercept
        try:
            # LUT indices are integers: round so pydicom indexes rather than warns about floats
            mapped = apply_voi(np.rint(modality).astype(np.int64), voi_item, index=0).astype(np.float64)
            lut = np.asarray(voi_item.VOILUTSequence[0].LUTData, dtype=np.float64)
        except Exception:  # a broken LUT falls back to the other transforms below
            mapped = None
        if mapped is not None and lut.size and float(lut.max()) > float(lut.min()):
            lo, hi = float(lut.min()), float(lut.max())
            return np.clip((mapped - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), "voi-lut"
    slope, intercept = _rescale(ds, index)
    modality = raw.astype(np.float64) * slope + intercept
    window = _window(ds, index)
    if window is not None:
        return _apply_window(modality, *window), "window"
    return _minmax(modality), "minmax"


def iter_frames(ds: Dataset, info: PixelInfo | None = None) -> Iterator[tuple[np.ndarray, str]]:
    """Yield (frame, voi) for each frame in order: frame float32 [0, 1], voi the transform used."""
    info = info or pixel_info(ds)
    decoder = get_decoder(UID(info.transfer_syntax))
    # pydicom tries its own pure-Python RLE decoder first; pylibjpeg-rle is ~8x faster when installed
    plugin = "pylibjpeg" if info.transfer_syntax == RLE_LOSSLESS and "pylibjpeg" in decoder.available_plugins else ""
    try:
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
            if info.photometric == "PALETTE COLOR":
                rgb = apply_color_lut(raw, ds)
                scale = 255.0 if rgb.dtype == np.uint8 or float(rgb.max(initial=0)) <= 255 else 65535.0
                yield np.clip(rgb.astype(np.float32) / scale, 0.0, 1.0), "palette"
            elif info.color:
                scale = float((1 << min(info.bits_stored, int(meta.get("bits_stored", info.bits_stored)))) - 1)
                yield np.clip(raw.astype(np.float32) / scale, 0.0, 1.0), "full-range"
            else:
                unit, voi = _gray_to_unit(raw, ds, info, index)
                if info.photometric == "MONOCHROME1":
                    unit = 1.0 - unit
                yield np.ascontiguousarray(unit, dtype=np.float32), voi
    except PixelDecodeError:
        raise
    except Exception as exc:  # decoder errors (truncated data, corrupt codestream) name the syntax
        raise PixelDecodeError(
            f"cannot decode {UID(info.transfer_syntax).name} pixel data: {exc}"
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
