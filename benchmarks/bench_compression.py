"""How big and how fast each ``derive.transfer_syntax`` is on derived-size images (the figures behind its default).

Run by hand (prints figures; not a test):

    .venv/bin/python benchmarks/bench_compression.py --count 5

Images: real fundus and endoscopy (8-bit RGB) and CCM (8-bit gray) frames from ``../shared/data/train``
(read in place, never copied; skipped with a message when absent), each as the node would store it
after enhancement (CLAHE, the classical model: derived pixels, not the camera's), one fundus frame
upscaled to a camera's 2592x1944 for per-image times at full size (smoother than a native capture, so its
ratio flatters), and pydicom's bundled 16-bit CT as derive stores it (unsigned, all 16 bits), single
frame and as an 8-frame multi-frame. Per syntax: file bytes (mean per image), ratio against uncompressed,
encode and decode seconds (mean per image, best of ``--repeat``). Decoding is pydicom's with the fastest
installed plugin (pylibjpeg-rle for RLE, CharLS via pyjpegls for JPEG-LS) and every round trip is checked
bit-exact.
"""

from __future__ import annotations

import argparse
import copy
import io
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from pydicom.uid import ExplicitVRLittleEndian, JPEGLSLossless, RLELossless, SecondaryCaptureImageStorage, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomnode.encode import SYNTAXES, encode  # noqa: E402
from dicomnode.imaging import iter_frames, to_stored  # noqa: E402
from models.registry import build_model  # noqa: E402

TRAIN = Path(__file__).resolve().parents[2] / "shared" / "data" / "train"
CAMERA = (2592, 1944)  # a common fundus camera frame (5 MP): 15 MB as uncompressed RGB


def sc_dataset(frames: Sequence[np.ndarray]) -> Dataset:
    """An uncompressed Secondary Capture holding ``frames`` (uint8 gray/RGB or uint16 gray), as derive writes it."""
    first = frames[0]
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, meta.MediaStorageSOPInstanceUID
    ds.Rows, ds.Columns = first.shape[:2]
    bits = 16 if first.dtype == np.uint16 else 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = bits, bits, bits - 1, 0
    if first.ndim == 3:
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "RGB", 0
    else:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    if len(frames) > 1:
        ds.NumberOfFrames = len(frames)
    ds.LossyImageCompression = "00"
    data = b"".join(np.ascontiguousarray(f).tobytes() for f in frames)
    ds.PixelData = data + b"\x00" * (len(data) % 2)
    ds["PixelData"].VR = "OB" if bits == 8 else "OW"
    return ds


def derived(paths: Sequence[Path], size: tuple[int, int] | None = None) -> list[np.ndarray]:
    """The stored pixels of each image after CLAHE (8-bit, as derive stores colour and 8-bit gray)."""
    model = build_model("clahe")
    out = []
    for path in paths:
        img = Image.open(path)
        img = img.convert("RGB" if img.mode not in ("L", "I;16") else "L")
        if size is not None:
            img = img.resize(size, Image.Resampling.LANCZOS)
        frame = np.asarray(img, dtype=np.float32) / 255.0
        out.append(to_stored(model.enhance([frame])[0], 8))
    return out


def ct_frames() -> np.ndarray | None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("CT_small.dcm", download=False)
    if path is None:
        return None
    ds = pydicom.dcmread(path)
    frame, _voi = next(iter_frames(ds))
    return to_stored(frame, 16)  # 16-bit derived values, as derive stores 16-bit sources


def decode(ds: Dataset) -> np.ndarray:
    tsyntax = ds.file_meta.TransferSyntaxUID
    decoder = get_decoder(tsyntax)
    # the fastest installed decoder: pylibjpeg-rle (pydicom's own RLE is ~8x slower), CharLS by pyjpegls
    # (pydicom may pick pylibjpeg-libjpeg for JPEG-LS, ~5x slower); JPEG 2000: openjpeg either way
    preferred = {RLELossless: "pylibjpeg", JPEGLSLossless: "pyjpegls"}.get(tsyntax, "")
    plugin = preferred if preferred in decoder.available_plugins else ""
    return decoder.as_array(ds, decoding_plugin=plugin)[0]


def measure(label: str, images: Sequence[Sequence[np.ndarray]], repeat: int) -> None:
    """One row per syntax for ``images`` (each a list of frames): mean bytes, ratio, encode/decode seconds."""
    sources = [sc_dataset(frames) for frames in images]
    results: dict[str, tuple[float, float, float]] = {}
    for name in SYNTAXES:
        sizes, enc_s, dec_s = [], [], []
        for ds, frames in zip(sources, images):
            best_enc = best_dec = float("inf")
            for _ in range(repeat):
                work = copy.deepcopy(ds)
                t0 = time.perf_counter()
                encode(work, name)
                best_enc = min(best_enc, time.perf_counter() - t0)
                buf = io.BytesIO()
                work.save_as(buf, enforce_file_format=True)
                blob = buf.getvalue()
                t0 = time.perf_counter()
                back = decode(pydicom.dcmread(io.BytesIO(blob)))
                best_dec = min(best_dec, time.perf_counter() - t0)
            expected = np.stack(frames) if len(frames) > 1 else frames[0]
            if not np.array_equal(back, expected):
                raise SystemExit(f"{label} {name}: round trip is not bit-exact")
            sizes.append(len(blob))
            enc_s.append(best_enc)
            dec_s.append(best_dec)
        results[name] = (float(np.mean(sizes)), float(np.mean(enc_s)), float(np.mean(dec_s)))
    base = results["uncompressed"][0]
    first = images[0][0]
    shape = "x".join(map(str, first.shape[1::-1])) + (f"x{len(images[0])} frames" if len(images[0]) > 1 else "")
    kind = "RGB" if first.ndim == 3 else "gray"
    print(f"\n{label}: {len(images)} image(s), {shape} {first.dtype.itemsize * 8}-bit {kind}")
    print(f"  {'syntax':<18} {'bytes':>11} {'ratio':>6} {'encode s':>9} {'decode s':>9}")
    for name, (size, enc, dec) in results.items():
        print(f"  {name:<18} {size:>11,.0f} {base / size:>5.2f}x {enc:>9.4f} {dec:>9.4f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5, help="images per training folder (default 5)")
    parser.add_argument("--repeat", type=int, default=3, help="timing runs per image; the best counts (default 3)")
    parser.add_argument("--train", type=Path, default=TRAIN, help=f"training images (default {TRAIN})")
    args = parser.parse_args()
    if args.train.is_dir():
        for label, folder in (("fundus (CLAHE-derived)", "fundus/lq"), ("endoscopy (CLAHE-derived)", "endoscopy/lq"),
                              ("CCM (CLAHE-derived)", "ccm/lq")):
            paths = sorted((args.train / folder).glob("*.png"))[: args.count]
            if not paths:
                print(f"\n{label}: no PNG in {args.train / folder}, skipped")
                continue
            measure(label, [[f] for f in derived(paths)], args.repeat)
        fundus = sorted((args.train / "fundus/lq").glob("*.png"))[:1]
        if fundus:
            measure(f"fundus upscaled to {CAMERA[0]}x{CAMERA[1]} (CLAHE-derived; smoother than native)",
                    [[f] for f in derived(fundus, CAMERA)], args.repeat)
    else:
        print(f"training images not found at {args.train}: fundus, endoscopy and CCM skipped")
    ct = ct_frames()
    if ct is None:
        print("\npydicom's CT_small.dcm is not installed: CT skipped")
    else:
        measure("CT_small.dcm (derived 16-bit)", [[ct]], args.repeat)
        measure("CT_small.dcm shifted, multi-frame", [[np.roll(ct, 3 * i, axis=0) for i in range(8)]], args.repeat)
    return 0


if __name__ == "__main__":
    sys.exit(main())
