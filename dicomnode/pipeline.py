"""The one pipeline: a complete series in, its outputs out (route -> bind model -> enhance -> derive -> write).

The live node (a worker per claimed job), ``dicomnode enhance`` and the demo all call :meth:`Pipeline.run`,
so a series gives byte-identical outputs whichever way it came in. The pipeline reads and writes files
only: recording the outcome in the ledger and sending it are its callers' business. Series come from
:mod:`dicomnode.assemble` (the ledger's jobs, or files on disk grouped as the receiver groups them).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from pathlib import Path

from pydicom.dataset import Dataset

from dicomnode import route
from dicomnode.config import NodeConfig
from dicomnode.derive import DeriveSettings, derive_sc
from dicomnode.domain import Series, SeriesOutcome
from dicomnode.durable import write_with
from dicomnode.encode import encode
from dicomnode.enhance import enhance_instances
from dicomnode.resident import ModelUnavailable, ResidentModels

log = logging.getLogger(__name__)

__all__ = ["Pipeline", "write_dataset"]


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

    def run(self, series: Series, out_dir: Path, *, model: str | None = None, batch_size: int | None = None,
            progress: Callable[[int], None] | None = None) -> SeriesOutcome:
        """Process one series into ``out_dir``. ``model`` overrides the rules (every instance, that model).

        ``progress`` is called with 1 as each matched instance is finished (written or failed).
        Never raises for a bad instance or an unavailable model: the outcome says what happened.
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
        outcome.guidance_id = bound.guidance_id
        info = bound.enhancer.info
        timings: dict[str, float] = {}
        for item in enhance_instances([inst.path for inst in chosen], bound.enhancer, batch_size=batch_size or bound.batch_size,
                                      timings=timings):
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
                try:
                    outcome.outputs.append(write_dataset(derived, out_dir))
                except OSError as exc:
                    item.error = f"write: {exc}"
                timings["write"] = timings.get("write", 0.0) + time.perf_counter() - t0
            if item.error is not None:
                outcome.failed.append((item.path, item.error))
            item.frames = []
            if progress is not None:
                progress(1)
        outcome.timings = {**timings, "total": time.perf_counter() - started}
        if not outcome.outputs:
            outcome.error = "no instance could be enhanced: " + "; ".join(f"{p.name}: {r}" for p, r in outcome.failed)
        log.info("series %s: %d written, %d failed by %s (%s)", series.series_uid, len(outcome.outputs), len(outcome.failed),
                 outcome.model, ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()))
        return outcome
