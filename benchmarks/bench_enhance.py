"""What the DICOM side of enhancement costs per instance: read, decode, derive (encode), write.

Run by hand (prints figures; not a test):

    .venv/bin/python benchmarks/bench_enhance.py --count 40

An identity "model" is used so the figures are the node's own overhead around any enhancer;
``--model clahe`` adds a real classical model for comparison. Cases: 512² 16-bit CT native, RLE and
JPEG 2000 lossless; 1024² 8-bit RGB native and JPEG baseline (YBR); one 30-frame 512² 8-bit RGB cine.
Peak Python heap (tracemalloc) shows that memory follows the batch, not the series.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.uid import (
    CTImageStorage,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    RLELossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomnode.domain import Instance, Series  # noqa: E402
from dicomnode.pipeline import Pipeline  # noqa: E402
from dicomnode.resident import ResidentModels  # noqa: E402
from models.registry import Enhancer, ModelInfo, build_model  # noqa: E402


class Identity(Enhancer):
    info = ModelInfo(kind="identity", name="Identity", version="0")

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        return [np.asarray(i, dtype=np.float32) for i in images]


def _base(sop_class: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = sop_class
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "Bench^Mark"
    ds.PatientID = "BENCH"
    ds.SeriesNumber = 1
    return ds


def make_series(folder: Path, kind: str, count: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    if kind.startswith("ct"):
        ds = _base(CTImageStorage)
        ds.Modality = "CT"
        yy, xx = np.mgrid[0:512, 0:512]
        body = ((xx - 256) ** 2 + (yy - 256) ** 2 < 200**2) * 1000
        pixels = (body + rng.normal(0, 20, (512, 512))).clip(0, 4095).astype(np.uint16)
        ds.Rows = ds.Columns = 512
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1, -1024
        ds.WindowCenter, ds.WindowWidth = 40, 400
    else:
        ds = _base(SecondaryCaptureImageStorage)
        ds.Modality = "XC"
        side = 512 if kind == "cine" else 1024
        yy, xx = np.mgrid[0:side, 0:side]
        rgb = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
        if kind == "cine":
            pixels = np.stack([np.roll(rgb, i, axis=1) for i in range(30)])
            ds.NumberOfFrames = 30
            ds.FrameTime = 33.3
            ds.FrameIncrementPointer = 0x00181063
        else:
            pixels = rgb
        ds.Rows = ds.Columns = side
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    paths = []
    for i in range(count if kind != "cine" else 1):
        ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = i + 1
        if kind in ("ct", "rgb", "cine"):
            ds.PixelData = pixels.tobytes()
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        elif kind == "ct-rle":
            ds.compress(RLELossless, pixels)
        elif kind == "ct-j2k":
            ds.compress(JPEG2000Lossless, pixels)
        elif kind == "rgb-jpeg":  # pydicom has no JPEG encoder: Pillow writes 4:2:2 baseline JPEG
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="JPEG", quality=90, subsampling=1)
            ds.PhotometricInterpretation = "YBR_FULL_422"
            ds.PixelData = encapsulate([buffer.getvalue()])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
            ds.LossyImageCompression = "01"
        path = folder / f"{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=40, help="instances per single-frame case")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--model", default="identity", help="identity (default) or a registry kind, e.g. clahe")
    args = parser.parse_args()
    enhancer = Identity() if args.model == "identity" else build_model(args.model)
    pipeline = Pipeline(None, ResidentModels.single("m", enhancer, batch_size=args.batch_size))
    print(f"model {enhancer.info.name}, batch {args.batch_size}")
    print(f"{'case':10s} {'inst':>5s} {'frames':>6s} {'inst/s':>7s} {'ms/frame':>8s}  read decode model encode write (ms/frame)  peak heap MB")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for kind in ("ct", "ct-rle", "ct-j2k", "rgb", "rgb-jpeg", "cine"):
            sources = make_series(root / kind, kind, args.count)
            tracemalloc.start()
            start = time.perf_counter()
            series = Series("bench", "1.2", kind, tuple(Instance(p, {}) for p in sources))
            result = pipeline.run(series, root / f"{kind}-out", model="m")
            elapsed = time.perf_counter() - start
            _current, peak = tracemalloc.get_traced_memory()
            tracemalloc.stop()
            assert not result.failed, result.failed
            frames = max(sum(int(pydicom.dcmread(p, stop_before_pixels=True).get("NumberOfFrames", 1) or 1)
                             for p in result.outputs), 1)
            stages = " ".join(f"{result.timings[s] * 1000 / frames:5.1f}" for s in ("read", "decode", "model", "encode", "write"))
            print(f"{kind:10s} {len(sources):5d} {frames:6d} {len(sources) / elapsed:7.1f} "
                  f"{elapsed * 1000 / frames:8.1f}  {stages}   {peak / 2**20:8.1f}")


if __name__ == "__main__":
    main()
