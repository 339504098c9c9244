"""Enhance the instances of a series: read -> decode -> model, streaming, one finished instance at a time.

Memory stays bounded by the batch, not the series: instances are read one after another, their
frames decoded one at a time into a pending batch of at most ``batch_size`` frames (across
instances), and an instance is handed on (:class:`EnhancedInstance`) as soon as its last frame comes
back from the model; the caller derives and writes it and lets it go. Only instances with frames in
the current batch are held (their encoded pixel data is released once all their frames are decoded).

A bad instance fails alone, whatever the exception: an unreadable file, pixel data that cannot be
decoded or is incomplete, a model error on its frames (a failed batch is retried frame by frame to
find the culprit). It comes out with ``error`` set and the rest of the series goes on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset

from dicomnode.imaging import PixelDecodeError, iter_frames, pixel_info
from models.registry import Enhancer, EnhancerUnavailable

log = logging.getLogger(__name__)

STAGES: tuple[str, ...] = ("read", "decode", "model", "gate")
Measure = Callable[[np.ndarray, np.ndarray, int, int], dict[str, float]]


@dataclass
class EnhancedInstance:
    """One source instance after the model: its header (no pixel data) and enhanced frames, or why not."""

    path: Path
    header: Dataset
    frames: list[np.ndarray] = field(default_factory=list)
    error: str | None = None
    skipped: bool = False  # refused by ``admit`` (e.g. too small to enhance): not an error, nothing derived
    checks: list[dict[str, float]] = field(default_factory=list)  # ``measure`` per frame, in frame order


@dataclass
class _Open:
    path: Path
    ds: Dataset
    nframes: int
    outputs: list[np.ndarray | None]
    done: int = 0
    decoded_all: bool = False
    error: str | None = None
    checks: dict[int, dict[str, float]] = field(default_factory=dict)


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if not isinstance(exc, (PixelDecodeError,)) else str(exc)


class _Run:
    """State of one :func:`enhance_instances` call."""

    def __init__(self, enhancer: Enhancer, batch_size: int, timings: dict[str, float],
                 admit: Callable[[Dataset], str | None] | None, measure: Measure | None) -> None:
        self.enhancer = enhancer
        self.batch_size = max(1, int(batch_size))
        self.timings = timings
        self.admit = admit
        self.measure = measure
        self.pending: list[tuple[_Open, int, np.ndarray]] = []
        self.ready: list[EnhancedInstance] = []

    def _time(self, stage: str, started: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - started

    def _fail(self, inst: _Open, reason: str) -> None:
        if inst.error is None:
            inst.error = reason
            log.warning("instance %s failed: %s", inst.ds.get("SOPInstanceUID", inst.path.name), reason)
            self.pending = [p for p in self.pending if p[0] is not inst]
            inst.outputs = []
            header = inst.ds
            if "PixelData" in header:
                del header.PixelData
            self.ready.append(EnhancedInstance(inst.path, header, error=reason))

    def process(self, path: Path) -> None:
        started = time.perf_counter()
        try:
            ds = pydicom.dcmread(path)
            info = pixel_info(ds)
            refusal = self.admit(ds) if self.admit is not None else None
        except PixelDecodeError as exc:
            self._time("read", started)
            self.ready.append(EnhancedInstance(path, Dataset(), error=f"pixel data: {exc}"))
            return
        except Exception as exc:  # untrusted bytes: pydicom raises assorted errors on malformed files
            self._time("read", started)
            self.ready.append(EnhancedInstance(path, Dataset(), error=f"cannot read DICOM file: {_describe(exc)}"))
            return
        self._time("read", started)
        inst = _Open(path=path, ds=ds, nframes=info.number_of_frames, outputs=[None] * info.number_of_frames)
        if refusal is not None:
            log.info("instance %s not enhanced: %s", ds.get("SOPInstanceUID", path.name), refusal)
            if "PixelData" in ds:
                del ds.PixelData
            self.ready.append(EnhancedInstance(path, ds, error=refusal, skipped=True))
            return
        frames = iter_frames(ds, info)
        index = 0
        while True:
            started = time.perf_counter()
            try:
                frame, _voi = next(frames)
            except StopIteration:
                self._time("decode", started)
                break
            except Exception as exc:  # decoder or a lazily raised header error: this instance only
                self._time("decode", started)
                self._fail(inst, f"pixel data: {_describe(exc)}")
                return
            self._time("decode", started)
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
        out = self.enhancer.enhance(frames)
        if len(out) != len(frames):
            raise RuntimeError(f"model returned {len(out)} frames for {len(frames)}")
        for i, (a, b) in enumerate(zip(frames, out, strict=True)):
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
        except EnhancerUnavailable:  # no fault of these frames: the caller retries the series later
            raise
        except Exception as exc:
            log.warning("model failed on a batch of %d frames (%s); retrying frame by frame", len(batch), exc)
            outputs = []
            for inst, _index, frame in batch:
                if inst.error is not None:
                    outputs.append(None)
                    continue
                try:
                    outputs.append(self._run_model([frame])[0])
                except EnhancerUnavailable:
                    raise
                except Exception as single:
                    outputs.append(None)
                    self._fail(inst, f"model {self.enhancer.info.name}: {_describe(single)}")
        self._time("model", started)
        touched: list[_Open] = []
        for (inst, index, frame), out in zip(batch, outputs, strict=True):
            if inst.error is not None or out is None:
                continue
            if self.measure is not None:
                t0 = time.perf_counter()
                try:
                    inst.checks[index] = self.measure(frame, out, index, inst.nframes)
                except Exception as exc:  # an output that cannot be measured cannot pass the gate
                    self._fail(inst, f"quality gate could not measure frame {index}: {_describe(exc)}")
                    continue
                finally:
                    self._time("gate", t0)
            inst.outputs[index] = out
            inst.done += 1
            if inst not in touched:
                touched.append(inst)
        for inst in touched:
            self._maybe_finish(inst)

    def _maybe_finish(self, inst: _Open) -> None:
        if inst.error is not None or not inst.decoded_all or inst.done < inst.nframes:
            return
        frames = [f for f in inst.outputs if f is not None]
        inst.outputs = []
        checks = [inst.checks[i] for i in sorted(inst.checks)]
        self.ready.append(EnhancedInstance(inst.path, inst.ds, frames, checks=checks))

    def take(self) -> list[EnhancedInstance]:
        ready, self.ready = self.ready, []
        return ready


def enhance_instances(
    sources: Sequence[Path],
    enhancer: Enhancer,
    *,
    batch_size: int = 4,
    timings: dict[str, float] | None = None,
    admit: Callable[[Dataset], str | None] | None = None,
    measure: Measure | None = None,
) -> Iterator[EnhancedInstance]:
    """Yield every source as an :class:`EnhancedInstance`, in the order they finish.

    Frames go through ``enhancer.enhance`` in batches of ``batch_size`` (across instances; the
    enhancer carries its guidance). ``admit(ds)`` may refuse an instance before decoding (a reason
    string: it comes out ``skipped``, e.g. an image too small to enhance) or fail it by raising
    :class:`~dicomnode.imaging.PixelDecodeError` (e.g. over the decode budget); ``measure(source, output,
    index, nframes)`` is called for every enhanced frame while its source frame is still at hand (the
    quality gate's figures, in ``checks``); ``timings`` accumulates seconds per stage (read, decode,
    model, gate). Never raises for a bad instance; raises :class:`~models.registry.EnhancerUnavailable` when the
    enhancer cannot run at all (a remote executor without live workers), so that the series is retried whole.
    """
    run = _Run(enhancer, batch_size, timings if timings is not None else {}, admit, measure)
    for path in sources:
        run.process(Path(path))
        yield from run.take()
    run.flush()
    yield from run.take()
