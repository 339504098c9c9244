"""Enhance one series: decode -> model -> derive -> write, streaming in batches of frames.

Memory stays bounded by the batch, not the series: instances are read one after another, their
frames are decoded one at a time into a pending batch of at most ``batch_size`` float frames, and
an instance is derived, written and dropped as soon as its last frame comes back from the model.
Only instances with frames in the current batch are held (their pixel data is released once all
their frames are decoded), plus the stored-value (uint8/uint16) output frames of a multi-frame
instance still being filled.

A bad instance fails alone: unreadable files, undecodable pixels, a model error on its frames
(a failed batch is retried frame by frame to find the culprit) or a derivation/write error are
recorded with the reason in :attr:`SeriesResult.failed`, and the rest of the series goes on.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicomnode.derive import DeriveError, DeriveSettings, derive_sc
from dicomnode.imaging import PixelDecodeError, iter_frames, pixel_info
from models.registry import Enhancer

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("read", "decode", "model", "encode", "write")


@dataclass
class SeriesResult:
    """What came of one series: written files, failed sources with the reason, seconds per stage."""

    outputs: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=lambda: {stage: 0.0 for stage in STAGES})
    frames: int = 0  # frames enhanced (of written instances)


@dataclass
class _Instance:
    path: Path
    ds: Dataset
    nframes: int
    outputs: list[np.ndarray | None]
    done: int = 0
    decoded_all: bool = False
    error: str | None = None


def write_atomic(ds: Dataset, out_dir: Path) -> Path:
    """Write ``ds`` as ``out_dir/SOPInstanceUID.dcm`` via temp file, fsync and rename.

    A reader (the dispatcher, a folder-watching PACS) never sees a half-written file, and a
    re-run replaces the earlier file of the same (deterministic) UID.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    final = out_dir / f"{ds.SOPInstanceUID}.dcm"
    fd, tmp_name = tempfile.mkstemp(prefix=".tmp-", suffix=".dcm", dir=out_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            ds.save_as(fh, enforce_file_format=True)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, final)
    except BaseException:
        try:
            os.unlink(tmp_name)
        except FileNotFoundError:
            pass
        raise
    return final


class _SeriesRun:
    """State of one :func:`enhance_series` call (kept out of the function to stay readable)."""

    def __init__(
        self,
        enhancer: Enhancer,
        settings: DeriveSettings,
        out_dir: Path,
        guidance: np.ndarray | None,
        guidance_id: str | None,
        batch_size: int,
        progress: Callable[[int], None] | None,
    ) -> None:
        self.enhancer = enhancer
        self.settings = settings
        self.out_dir = Path(out_dir)
        self.guidance = guidance
        self.guidance_id = guidance_id
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.result = SeriesResult()
        self.pending: list[tuple[_Instance, int, np.ndarray]] = []
        self.open: list[_Instance] = []  # read, neither written nor failed yet

    def _add_time(self, stage: str, started: float) -> None:
        self.result.timings[stage] += time.perf_counter() - started

    def _fail(self, inst: _Instance, reason: str) -> None:
        if inst.error is None:
            inst.error = reason
            self.result.failed.append((inst.path, reason))
            log.warning("instance %s failed: %s", inst.ds.get("SOPInstanceUID", inst.path.name), reason)
            if inst in self.open:
                self.open.remove(inst)
            inst.outputs = []  # release what was already enhanced
            inst.ds = Dataset()
            if self.progress:
                self.progress(1)

    def process(self, path: Path) -> None:
        path = Path(path)
        started = time.perf_counter()
        try:
            ds = pydicom.dcmread(path)
            info = pixel_info(ds)
        except (InvalidDicomError, OSError) as exc:
            self._add_time("read", started)
            self.result.failed.append((path, f"cannot read DICOM file: {exc}"))
            log.warning("cannot read %s: %s", path.name, exc)
            if self.progress:
                self.progress(1)
            return
        except PixelDecodeError as exc:
            self._add_time("read", started)
            self.result.failed.append((path, f"pixel data: {exc}"))
            log.warning("instance %s: pixel data: %s", ds.get("SOPInstanceUID", path.name), exc)
            if self.progress:
                self.progress(1)
            return
        except Exception as exc:  # pydicom raises assorted errors on malformed files
            self._add_time("read", started)
            self.result.failed.append((path, f"cannot read DICOM file: {type(exc).__name__}: {exc}"))
            if self.progress:
                self.progress(1)
            return
        self._add_time("read", started)
        inst = _Instance(path=path, ds=ds, nframes=info.number_of_frames, outputs=[None] * info.number_of_frames)
        self.open.append(inst)
        frames = iter_frames(ds, info)
        index = 0
        while True:
            started = time.perf_counter()
            try:
                frame, _voi = next(frames)
            except StopIteration:
                self._add_time("decode", started)
                break
            except PixelDecodeError as exc:
                self._add_time("decode", started)
                self._fail(inst, f"pixel data: {exc}")
                self.pending = [p for p in self.pending if p[0] is not inst]
                return
            self._add_time("decode", started)
            self.pending.append((inst, index, frame))
            index += 1
            if len(self.pending) >= self.batch_size:
                self.flush()
                if inst.error is not None:
                    return
        inst.decoded_all = True
        if "PixelData" in inst.ds:
            del inst.ds.PixelData  # the header is all derive needs; free the encoded pixels now
        self._maybe_finish(inst)

    def _run_model(self, frames: list[np.ndarray]) -> list[np.ndarray]:
        out = self.enhancer.enhance(frames, self.guidance)
        if len(out) != len(frames):
            raise RuntimeError(f"model returned {len(out)} frames for {len(frames)}")
        for i, (a, b) in enumerate(zip(frames, out)):
            if np.shape(b) != np.shape(a):
                raise RuntimeError(f"model changed frame shape {np.shape(a)} -> {np.shape(b)} (frame {i})")
        return [np.asarray(b, dtype=np.float32) for b in out]

    def flush(self) -> None:
        batch = [p for p in self.pending if p[0].error is None]
        self.pending = []
        if not batch:
            return
        started = time.perf_counter()
        try:
            outputs: list[np.ndarray | None] = list(self._run_model([p[2] for p in batch]))
        except Exception as exc:
            log.warning("model failed on a batch of %d frames (%s); retrying frame by frame", len(batch), exc)
            outputs = []
            for inst, _index, frame in batch:
                if inst.error is not None:
                    outputs.append(None)
                    continue
                try:
                    outputs.append(self._run_model([frame])[0])
                except Exception as single:
                    outputs.append(None)
                    self._fail(inst, f"model {self.enhancer.info.name}: {type(single).__name__}: {single}")
        self._add_time("model", started)
        touched: list[_Instance] = []
        for (inst, index, _frame), out in zip(batch, outputs):
            if inst.error is not None or out is None:
                continue
            inst.outputs[index] = out
            inst.done += 1
            if inst not in touched:
                touched.append(inst)
        for inst in touched:
            self._maybe_finish(inst)

    def _maybe_finish(self, inst: _Instance) -> None:
        if inst.error is not None or not inst.decoded_all or inst.done < inst.nframes:
            return
        started = time.perf_counter()
        try:
            frames = [f for f in inst.outputs if f is not None]
            derived = derive_sc(inst.ds, frames, self.enhancer.info, self.settings, self.guidance_id)
        except (DeriveError, ValueError, AttributeError, TypeError) as exc:
            self._add_time("encode", started)
            self._fail(inst, f"derive: {exc}")
            return
        self._add_time("encode", started)
        inst.outputs = []
        started = time.perf_counter()
        try:
            path = write_atomic(derived, self.out_dir)
        except OSError as exc:
            self._add_time("write", started)
            self._fail(inst, f"write: {exc}")
            return
        self._add_time("write", started)
        self.result.outputs.append(path)
        self.result.frames += inst.nframes
        self.open.remove(inst)
        inst.ds = Dataset()
        if self.progress:
            self.progress(1)
        log.debug("derived %s -> %s", inst.path.name, path.name)


def enhance_series(
    sources: Sequence[Path],
    enhancer: Enhancer,
    settings: DeriveSettings,
    out_dir: Path,
    *,
    guidance: np.ndarray | None = None,
    guidance_id: str | None = None,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> SeriesResult:
    """Enhance the instances ``sources`` and write one derived SC file per instance into ``out_dir``.

    Frames go through ``enhancer.enhance`` in batches of ``batch_size`` (across instances);
    ``progress`` (optional) is called with 1 as each source is finished, written or failed.
    Never raises for a bad instance: see :class:`SeriesResult`.
    """
    run = _SeriesRun(enhancer, settings, Path(out_dir), guidance, guidance_id, batch_size, progress)
    for path in sources:
        run.process(Path(path))
    run.flush()
    for inst in list(run.open):  # cannot happen unless the bookkeeping above is wrong: never lose one silently
        run._fail(inst, f"incomplete: {inst.done} of {inst.nframes} frames came back from the model")
    result = run.result
    log.info(
        "series done: %d written, %d failed, %d frames; seconds %s",
        len(result.outputs),
        len(result.failed),
        result.frames,
        ", ".join(f"{k}={v:.2f}" for k, v in result.timings.items()),
    )
    return result
