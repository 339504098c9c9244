"""The one pipeline: a complete series in, its outputs out (route -> bind model -> enhance -> derive -> write).

The live node (a worker per claimed job), ``dicomnode enhance`` and the demo all call :meth:`Pipeline.run`,
so a series gives byte-identical outputs whichever way it came in. The pipeline reads and writes files
only: recording the outcome in the ledger and sending it are its callers' business. Series come from
:mod:`dicomnode.assemble` (the ledger's jobs, or files on disk grouped as the receiver groups them).
"""

from __future__ import annotations

import errno
import logging
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

from dicomnode import gate, route
from dicomnode.config import GatePolicy, NodeConfig, NodeSettings
from dicomnode.derive import DeriveSettings, derive_sc
from dicomnode.domain import Series, SeriesOutcome
from dicomnode.durable import write_with
from dicomnode.encode import encode
from dicomnode.enhance import enhance_instances
from dicomnode.imaging import check_decode_budget, pixel_info
from dicomnode.resident import ModelUnavailable, ResidentModels

log = logging.getLogger(__name__)

__all__ = ["GATED_DIR", "OUT_OF_SPACE", "Pipeline", "StorageFull", "out_of_space", "write_dataset"]

GATED_DIR = "gated"  # outputs the quality gate held back are written here, inside the output folder
OUT_OF_SPACE = frozenset({errno.ENOSPC, errno.EDQUOT})  # a full disk or quota: a fault of the node, not of the input


class StorageFull(RuntimeError):
    """The output folder has no room (above the watermark, or a write failed with ENOSPC/EDQUOT).

    Not a fault of the series: :meth:`Pipeline.run` stops the series and raises this; its caller retries later.
    """


def out_of_space(exc: BaseException) -> OSError | None:
    """The ENOSPC/EDQUOT error behind ``exc``, if any: pydicom re-raises write errors as a new exception
    without the errno (``With tag (7FE0,0010) got exception: ...``), the original is its cause."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, OSError) and current.errno in OUT_OF_SPACE:
            return current
        current = current.__cause__ or current.__context__
    return None


def write_dataset(ds: Dataset, out_dir: Path) -> Path:
    """``out_dir/SOPInstanceUID.dcm`` written durably; a re-run replaces the file of the same (deterministic) UID."""
    out_dir.mkdir(parents=True, exist_ok=True)
    return write_with(out_dir / f"{ds.SOPInstanceUID}.dcm", lambda fh: ds.save_as(fh, enforce_file_format=True))


class Pipeline:
    """Route, enhance and derive one series at a time with the node's rules and resident models."""

    def __init__(self, config: NodeConfig | None, models: ResidentModels, derive: DeriveSettings | None = None) -> None:
        """``config`` gives the rules and the derive settings; without it (one model, ``run(..., model=...)``)
        the derive settings are ``derive`` or the defaults."""
        self.config = config
        self.models = models
        self.derive = derive or (DeriveSettings.from_config(config) if config is not None else DeriveSettings())
        node = config.node if config is not None else None
        fields = NodeSettings.model_fields
        self.max_frame_bytes = int(node.max_decoded_frame_bytes if node else fields["max_decoded_frame_bytes"].default)
        self.max_series_bytes = int(node.max_decoded_series_bytes if node else fields["max_decoded_series_bytes"].default)

    def _gate_policy(self, rule: str | None, override: GatePolicy | None) -> GatePolicy:
        if override is not None:
            return override
        for candidate in self.config.rules if self.config is not None else ():
            if candidate.name == rule:
                return candidate.gate
        return GatePolicy()

    def _admit(self, ds: Dataset) -> str | None:
        """Images too small to enhance meaningfully are left alone (the reason is recorded)."""
        least = self.derive.policy.min_size
        rows, columns = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
        if min(rows, columns) < least:
            return f"{rows}x{columns} pixels is below the minimum size {least} (derive.min_size): not enhanced"
        return None

    def _budget(self) -> Callable[[Dataset], None]:
        """A check for one series: DecodeBudgetExceeded (the instance fails) when one frame or the series so far,
        counted from the headers, is over ``node.max_decoded_frame_bytes`` / ``max_decoded_series_bytes``."""
        admitted = 0

        def check(ds: Dataset) -> None:
            nonlocal admitted
            admitted += check_decode_budget(pixel_info(ds), self.max_frame_bytes, self.max_series_bytes, admitted)

        return check

    def run(self, series: Series, out_dir: Path, *, model: str | None = None, batch_size: int | None = None,
            progress: Callable[[int], None] | None = None, gate_policy: GatePolicy | None = None,
            check_space: Callable[[], str | None] | None = None, frames: Callable[[int], None] | None = None) -> SeriesOutcome:
        """Process one series into ``out_dir``. ``model`` overrides the rules (every instance, that model).

        Outputs the quality gate (the rule's, or ``gate_policy``) fails are written to
        ``out_dir/gated`` and the outcome's ``gate`` says why; the caller holds the series back.
        ``progress`` is called with 1 as each matched instance is finished (written or failed), ``frames`` with the
        number of frames each model call enhanced.
        Never raises for a bad instance or an unavailable model: the outcome says what happened.
        Raises :class:`StorageFull` when ``check_space()`` (called before enhancing and before each output is
        written) gives a reason, or a write fails with ENOSPC/EDQUOT: outputs written so far stay, a re-run
        replaces them.
        """
        started = time.perf_counter()
        if model is not None:
            outcome = SeriesOutcome("enhance", None, model, (), tuple(range(len(series.instances))))
        elif self.config is None:
            raise ValueError("a pipeline without a config has no rules: name the model")
        else:
            decision = route.decide(self.config, [i.tags for i in series.instances], series.calling_aet)
            outcome = SeriesOutcome(decision.action, decision.rule, decision.model, decision.destinations, decision.matched)
        chosen = [series.instances[i] for i in outcome.matched]
        if outcome.action == "forward":
            outcome.outputs = [inst.path for inst in chosen]
        if outcome.action != "enhance" or not chosen:
            return outcome
        assert outcome.model is not None
        try:
            bound = self.models.bind(outcome.model, series.modality)
        except ModelUnavailable as exc:
            outcome.error = str(exc)
            outcome.failed = [(inst.path, str(exc)) for inst in chosen]
            return outcome
        full = check_space() if check_space is not None else None
        if full is not None:  # before decoding anything: the series would only stop half-way
            raise StorageFull(f"series {series.series_uid} not started: {full}")
        outcome.guidance_id = bound.guidance_id
        bound.enhancer.on_frames = frames
        info = bound.enhancer.info
        timings: dict[str, float] = {}
        policy = self._gate_policy(outcome.rule, gate_policy)
        verdict = gate.SeriesVerdict(policy) if policy.enabled else None

        def measure(source: np.ndarray, output: np.ndarray, index: int, nframes: int) -> dict[str, float]:
            return gate.measure(source, output, full=index in gate.measured_frames(nframes))

        budget = self._budget()

        def admit(ds: Dataset) -> str | None:
            budget(ds)  # raises: an instance over budget fails (it is not merely skipped)
            return self._admit(ds)

        for item in enhance_instances([inst.path for inst in chosen], bound.enhancer, batch_size=batch_size or bound.batch_size,
                                      timings=timings, admit=admit, measure=measure if verdict is not None else None):
            if item.skipped:
                outcome.skipped.append((item.path, item.error or "not enhanced"))
                if progress is not None:
                    progress(1)
                continue
            target = out_dir
            if item.error is None and verdict is not None:
                judged = verdict.judge(str(item.header.get("SOPInstanceUID", item.path.name)), item.checks)
                if judged.reasons:
                    target = out_dir / GATED_DIR
                    log.warning("series %s instance %s held back by the quality gate: %s", series.series_uid,
                                judged.sop_instance_uid, "; ".join(judged.reasons))
            if item.error is None:
                t0 = time.perf_counter()
                try:
                    derived = derive_sc(item.header, item.frames, info, self.derive, bound.guidance_id)
                except Exception as exc:  # a header derive cannot use fails this instance alone
                    item.error = f"derive: {type(exc).__name__}: {exc}"
                timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
            if item.error is None:
                t0 = time.perf_counter()
                try:  # storage encoding (derive.transfer_syntax), counted with derive under "encode"
                    derived = encode(derived, self.derive.policy.transfer_syntax)
                except Exception as exc:  # an encoder failure fails this instance alone
                    item.error = f"encode: {type(exc).__name__}: {exc}"
                timings["encode"] = timings.get("encode", 0.0) + time.perf_counter() - t0
            if item.error is None:
                t0 = time.perf_counter()
                full = check_space() if check_space is not None else None
                if full is not None:
                    raise StorageFull(f"series {series.series_uid} stopped before writing: {full}")
                try:
                    outcome.outputs.append(write_dataset(derived, target))
                except OSError as exc:
                    full_error = out_of_space(exc)
                    if full_error is not None:
                        raise StorageFull(f"series {series.series_uid} stopped: writing to {target} failed: "
                                          f"{full_error.strerror or full_error}") from exc
                    item.error = f"write: {exc}"
                timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
            if item.error is not None:
                outcome.failed.append((item.path, item.error))
            item.frames = []
            if progress is not None:
                progress(1)
        outcome.timings = {**timings, "total": time.perf_counter() - started}
        if verdict is not None and verdict.instances:
            outcome.gate = verdict.summary()
        if not outcome.outputs and (outcome.failed or not outcome.skipped):
            outcome.error = "no instance could be enhanced: " + "; ".join(f"{p.name}: {r}" for p, r in outcome.failed)
        log.info("series %s: %d written, %d failed, %d skipped by %s%s (%s)", series.series_uid, len(outcome.outputs),
                 len(outcome.failed), len(outcome.skipped), outcome.model, " [held back by the quality gate]" if outcome.held_back else "", ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
        return outcome
