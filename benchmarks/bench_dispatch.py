"""How fast dicomnode's destinations deliver: C-STORE SCU to dcmtk storescp on loopback, and a folder.

Run by hand (prints figures; not a test):

    .venv/bin/python benchmarks/bench_dispatch.py --count 100

Cases: one association per batch vs one per file (the reason ``send`` takes batches), files sent as
stored vs decompressed because the PACS refuses their compression, and the atomic folder writer.
storescp and the SCU both run with TCP_NODELAY=1 (dcmtk leaves Nagle on otherwise).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RLELossless, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dicomnode.dispatch import DicomDestination, FolderDestination, SendOutcome  # noqa: E402


def make_files(folder: Path, count: int, size: int, compress: str | None) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    study, series = generate_uid(), generate_uid()
    base = (rng.normal(1000, 200, (size, size))).clip(0, 4095).astype(np.uint16)
    paths = []
    for i in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = CTImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.Modality, ds.InstanceNumber = study, series, "CT", i + 1
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = np.roll(base, i, axis=0).tobytes()
        if compress:
            ds.compress(compress)
        path = folder / f"{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StoreSCP:
    def __init__(self, folder: Path, *args: str) -> None:
        self.folder, self.args, self.port = folder, args, free_port()

    def __enter__(self) -> StoreSCP:
        self.folder.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "TCP_NODELAY": "1"}
        self.proc = subprocess.Popen(["storescp", "-aet", "PACS", "-od", str(self.folder), *self.args, str(self.port)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                                     start_new_session=True)
        time.sleep(0.5)
        return self

    def __exit__(self, *exc: object) -> None:
        os.killpg(self.proc.pid, signal.SIGTERM)
        self.proc.wait(10)


def timed(label: str, paths: Sequence[Path], send: Callable[[Sequence[Path]], list[SendOutcome]]) -> None:
    start = time.perf_counter()
    outcomes = send(paths)
    seconds = time.perf_counter() - start
    ok = sum(o.ok for o in outcomes)
    megabytes = sum(p.stat().st_size for p in paths) / 1e6
    print(f"{label:<52} {ok:>4}/{len(paths)} ok  {seconds:6.2f} s  {len(paths) / seconds:7.1f} files/s  "
          f"{megabytes / seconds:7.1f} MB/s (as stored on disk)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=100, help="files per case (default 100)")
    parser.add_argument("--size", type=int, default=512, help="image side in pixels, 16-bit (default 512)")
    parser.add_argument("--batch", type=int, default=50, help="files per association (default 50)")
    args = parser.parse_args()
    if shutil.which("storescp") is None:
        print("needs dcmtk's storescp", file=sys.stderr)
        return 2
    os.environ["TCP_NODELAY"] = "1"
    with tempfile.TemporaryDirectory(prefix="bench_dispatch_") as tmp_name:
        tmp = Path(tmp_name)
        plain = make_files(tmp / "plain", args.count, args.size, None)
        rle = make_files(tmp / "rle", args.count, args.size, RLELossless)
        print(f"{args.count} CT images {args.size}x{args.size} 16-bit "
              f"({plain[0].stat().st_size / 1e6:.2f} MB uncompressed, {rle[0].stat().st_size / 1e6:.2f} MB RLE), "
              f"batches of {args.batch}")

        def batched(dest: DicomDestination, size: int) -> Callable[[Sequence[Path]], list[SendOutcome]]:
            def send(paths: Sequence[Path]) -> list[SendOutcome]:
                out: list[SendOutcome] = []
                for i in range(0, len(paths), size):
                    out += dest.send(paths[i : i + size])
                return out
            return send

        with StoreSCP(tmp / "pacs1", "+xa") as scp:
            dest = DicomDestination("pacs", "PACS", "127.0.0.1", scp.port)
            timed("storescp +xa, uncompressed, one association/batch", plain, batched(dest, args.batch))
            timed("storescp +xa, uncompressed, one association/file", plain, batched(dest, 1))
            timed("storescp +xa, RLE sent as stored", rle, batched(dest, args.batch))
        with StoreSCP(tmp / "pacs2") as scp:
            dest = DicomDestination("pacs", "PACS", "127.0.0.1", scp.port)
            timed("storescp uncompressed only, RLE decompressed", rle, batched(dest, args.batch))
        folder = FolderDestination("outbox", tmp / "outbox")
        timed("folder (temp file, fsync, rename)", plain, batched(folder, args.batch))  # type: ignore[arg-type]
    return 0


if __name__ == "__main__":
    sys.exit(main())
