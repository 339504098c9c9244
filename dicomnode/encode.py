"""Storage encoding of a derived dataset: lossless compression of its Pixel Data, and the way back.

``encode(ds, "jpeg-ls-lossless")`` compresses an uncompressed dataset in place with pydicom's encoders
(pyjpegls, pylibjpeg-openjpeg, pylibjpeg-rle) and sets the file meta's TransferSyntaxUID to match. The
SOP Instance UID is kept (the derived UIDs are deterministic), and so is LossyImageCompression: a lossless
encoding does not change what derive recorded about the pixels' history. Colour keeps Planar Configuration
0. JPEG-LS and RLE keep RGB (dcmtk's dcmdjpls/dcmdrle and pydicom read them back bit-exact); JPEG 2000
stores RGB with its reversible colour transform as YBR_RCT, as PS3.5 8.2.4 asks of the lossless syntax
(dciodvfy flags RGB there) and 11% smaller; decoders hand back the RGB values exactly.

pylibjpeg-openjpeg always uses 6 wavelet resolutions, so it cannot encode an image under 32 pixels on a
side: such an image is kept uncompressed (a valid, tiny file) rather than failed.

``decompress_for(ds, accepted)`` is the way back for a peer that refuses the dataset's compression.
Only transfer syntaxes and sizes are logged, never patient data.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Collection

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

log = logging.getLogger(__name__)

__all__ = ["SYNTAXES", "UNCOMPRESSED", "decompress_for", "encode", "syntax_uid"]

# The names of the config's ``derive.transfer_syntax`` and the transfer syntax each stands for.
SYNTAXES: dict[str, UID] = {
    "jpeg-ls-lossless": JPEGLSLossless,
    "jpeg2000-lossless": JPEG2000Lossless,
    "rle-lossless": RLELossless,
    "uncompressed": ExplicitVRLittleEndian,
}
UNCOMPRESSED: tuple[UID, ...] = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
_J2K_MIN_SIDE = 32  # 2 ** (6 resolutions - 1): pylibjpeg-openjpeg's fixed number of wavelet levels


def syntax_uid(name: str) -> UID:
    """The transfer syntax UID for a ``derive.transfer_syntax`` name (ValueError for an unknown name)."""
    try:
        return SYNTAXES[name]
    except KeyError:
        raise ValueError(f"unknown transfer syntax {name!r} (one of {', '.join(SYNTAXES)})") from None


def _meta(ds: Dataset) -> FileMetaDataset:
    meta = getattr(ds, "file_meta", None)
    if meta is None:
        meta = ds.file_meta = FileMetaDataset()
    return meta


def encode(ds: Dataset, syntax_name: str) -> Dataset:
    """``ds`` with its Pixel Data stored in the transfer syntax ``syntax_name`` (changed in place, returned).

    A dataset already in that syntax, or without Pixel Data, is returned as it is. A compressed dataset
    in another syntax is decompressed first. Where the encoder cannot (an image too small for it), the
    pixels stay uncompressed: the output is lossless either way and is never lost to its storage format.
    """
    target = syntax_uid(syntax_name)
    meta = _meta(ds)
    current = UID(str(meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    if current == target or "PixelData" not in ds:
        return ds
    if current.is_compressed:
        ds.decompress(generate_instance_uid=False)  # -> Explicit VR Little Endian
        current = ExplicitVRLittleEndian
    if not target.is_compressed:  # uncompressed -> uncompressed: only the encoding of the header differs
        meta.TransferSyntaxUID = target
        return ds
    if target == JPEG2000Lossless and min(int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)) < _J2K_MIN_SIDE:
        meta.TransferSyntaxUID = current
        log.debug("kept uncompressed: %dx%d is under the %d pixels a side the JPEG 2000 encoder needs",
                  ds.get("Rows", 0), ds.get("Columns", 0), _J2K_MIN_SIDE)
        return ds
    lossy = ds.get("LossyImageCompression")
    rct = target == JPEG2000Lossless and ds.get("PhotometricInterpretation") == "RGB"
    if rct:  # the encoder applies the reversible colour transform to data labelled YBR_RCT
        ds.PhotometricInterpretation = "YBR_RCT"
    before = len(ds.PixelData)
    t0 = time.perf_counter()
    try:
        # generate_instance_uid=False: pydicom would otherwise give the instance a new (random) SOP Instance UID
        ds.compress(target, generate_instance_uid=False)
    except Exception as exc:  # e.g. pyjpegls refuses a 4 x 4 image: lossless either way, so keep it uncompressed
        if rct:
            ds.PhotometricInterpretation = "RGB"
        meta.TransferSyntaxUID = current
        log.warning("kept %s uncompressed: the %s encoder failed (%s: %s)", ds.get("SOPInstanceUID", "?"), target.name,
                    type(exc).__name__, exc)
        return ds
    if lossy is not None:
        ds.LossyImageCompression = lossy
    meta.TransferSyntaxUID = target
    log.debug("encoded %s: %d -> %d bytes (%.1fx) in %.3f s", target.name, before, len(ds.PixelData),
              before / max(len(ds.PixelData), 1), time.perf_counter() - t0)
    return ds


def decompress_for(ds: Dataset, accepted: Collection[str]) -> tuple[Dataset, UID | None]:
    """``ds`` in a transfer syntax from ``accepted``, and the compressed syntax it was decoded from (or None).

    Kept as is when its own syntax is accepted; decompressed (in place) when it is compressed and
    an uncompressed syntax is accepted. ValueError when neither is possible: this module does not
    transcode between compressed syntaxes.
    """
    meta = _meta(ds)
    current = UID(str(meta.get("TransferSyntaxUID", "") or ExplicitVRLittleEndian))
    accepted_uids = {UID(str(a)) for a in accepted}
    if current in accepted_uids:
        return ds, None
    if not accepted_uids & set(UNCOMPRESSED):
        raise ValueError(f"{current.name} is not accepted and neither is an uncompressed transfer syntax "
                         f"(accepted: {', '.join(sorted(u.name for u in accepted_uids)) or 'none'})")
    if not current.is_compressed:
        if current.is_deflated:  # inflated on reading: what is in memory is plain Explicit VR Little Endian
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
        return ds, None  # one uncompressed syntax for another: the network layer encodes it for the context
    if "PixelData" in ds:
        # generate_instance_uid=False: pydicom would otherwise give the instance a new SOP Instance UID
        ds.decompress(generate_instance_uid=False)  # sets the file meta to Explicit VR Little Endian
    else:
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
    log.debug("decompressed %s for a peer that does not accept it", current.name)
    return ds, current
