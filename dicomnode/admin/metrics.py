"""Prometheus metrics of the running node (``GET /metrics``).

Two sources, each where it is exact: events counted as they happen (:class:`Metrics` is the server's
:class:`~dicomnode.observe.Observer`: stores answered, bytes read, per-stage seconds of each job, batches
sent) and states read from the ledger at scrape time (jobs by state, deliveries by destination and state,
dead letters, queues, jobs held back by the quality gate by model and reason), plus disk usage of the spool
and the models loaded. Counters start at zero with the process, as Prometheus expects; the ledger figures
survive restarts. Labels are states, stage names, destination and model names and status codes: never UIDs.
"""

from __future__ import annotations

import shutil
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dicomnode.admin.ops import gate_reason
from dicomnode.domain import SeriesOutcome
from dicomnode.ledger import DeliveryState, JobState, Ledger
from dicomnode.observe import Observer

__all__ = ["CONTENT_TYPE", "Metrics", "STAGES"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# Pipeline timing keys (SeriesOutcome.timings) -> the stage label; "receive" is per C-STORE, "send" per batch.
STAGES = {"read": "decode", "decode": "decode", "model": "model", "gate": "gate", "encode": "encode", "write": "write",
          "total": "job"}
_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0)


class Metrics(Observer):
    """The node's counters and histograms, and a collector that reads the ledger when Prometheus scrapes."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.received = Counter("dicomnode_instances_received", "Instances stored (C-STORE answered Success)", registry=r)
        self.refused = Counter("dicomnode_instances_refused", "C-STOREs answered with a failure, by status", ["status"],
                               registry=r)
        self.bytes = Counter("dicomnode_received_bytes", "Bytes of PDUs read from DICOM senders", registry=r)
        self.stage = Histogram("dicomnode_stage_duration_seconds",
                               "Seconds per stage: receive per C-STORE, decode/model/gate/encode/write/job per series, "
                               "send per batch", ["stage"], buckets=_BUCKETS, registry=r)
        self.jobs_processed = Counter("dicomnode_jobs_processed", "Jobs through the pipeline, by what came of them",
                                      ["outcome"], registry=r)
        self.sent_files = Counter("dicomnode_delivery_attempts", "Files tried at a destination, by outcome",
                                  ["destination", "outcome"], registry=r)
        for stage in ("receive", "decode", "model", "gate", "encode", "write", "send", "job"):
            self.stage.labels(stage)  # every stage shows from the start, at zero
        self._source: _LedgerCollector | None = None

    def attach(self, ledger: Callable[[], Ledger | None], spool_root: Path, models: Callable[[], Any]) -> None:
        """Read ledger states, disk usage and models at scrape time (called once the node is up)."""
        if self._source is None:
            self._source = _LedgerCollector(ledger, Path(spool_root), models)
            self.registry.register(self._source)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- Observer ------------------------------------------------------------------------------
    def stored(self, status: int, seconds: float) -> None:
        if status == 0:
            self.received.inc()
        else:
            self.refused.labels(f"0x{status:04X}").inc()
        self.stage.labels("receive").observe(seconds)

    def received_bytes(self, count: int) -> None:
        self.bytes.inc(count)

    def processed(self, job_id: int, outcome: SeriesOutcome) -> None:
        merged: dict[str, float] = {}
        for key, seconds in outcome.timings.items():
            stage = STAGES.get(key)
            if stage is not None:
                merged[stage] = merged.get(stage, 0.0) + seconds
        for stage, seconds in merged.items():
            self.stage.labels(stage).observe(seconds)
        if outcome.error is not None:
            result = "failed"
        elif outcome.held_back:
            result = "gated"
        else:
            result = outcome.action if outcome.action != "enhance" else "enhanced"
        self.jobs_processed.labels(result).inc()

    def sent(self, destination: str, ok: int, failed: int, seconds: float) -> None:
        if ok:
            self.sent_files.labels(destination, "stored").inc(ok)
        if failed:
            self.sent_files.labels(destination, "failed").inc(failed)
        self.stage.labels("send").observe(seconds)


class _LedgerCollector(Collector):
    """Gauges read at scrape time from the ledger, the spool's disk and the resident models."""

    def __init__(self, ledger: Callable[[], Ledger | None], root: Path, models: Callable[[], Any]) -> None:
        self.ledger, self.root, self.models = ledger, root, models

    def describe(self) -> list[Any]:
        return []  # read-time values: nothing to check at registration

    def collect(self) -> Iterator[Any]:
        ledger = self.ledger()
        if ledger is not None:
            counts = ledger.counts()
            jobs = GaugeMetricFamily("dicomnode_jobs", "Jobs in the ledger by state", labels=["state"])
            for state in JobState:
                jobs.add_metric([state.value], counts["jobs"].get(state.value, 0))
            yield jobs
            deliveries = GaugeMetricFamily("dicomnode_deliveries", "Deliveries by destination and state",
                                           labels=["destination", "state"])
            for (dest, state), n in sorted(ledger.delivery_counts().items()):
                deliveries.add_metric([dest, state], n)
            yield deliveries
            yield GaugeMetricFamily("dicomnode_dead_letters", "Deliveries dead-lettered (dicomnode resend brings them back)",
                                    value=counts["deliveries"].get(DeliveryState.DEAD_LETTER.value, 0))
            queue = GaugeMetricFamily("dicomnode_queue_depth", "Work waiting: complete jobs for a worker, pending deliveries",
                                      labels=["queue"])
            queue.add_metric(["jobs"], counts["jobs"].get(JobState.COMPLETE.value, 0))
            queue.add_metric(["deliveries"], counts["deliveries"].get(DeliveryState.PENDING.value, 0))
            yield queue
            gated: Tally[tuple[str, str]] = Tally()
            for job in ledger.jobs(JobState.GATED):
                reasons = {gate_reason(r) for f in ((job.details or {}).get("gate") or {}).get("failures") or []
                           for r in f.get("reasons", [])}
                for reason in reasons or {"other"}:
                    gated[(job.model or "?", reason)] += 1
            rejections = GaugeMetricFamily("dicomnode_gate_rejections",
                                           "Jobs held back by the quality gate now, by model and reason", labels=["model", "reason"])
            for (model, reason), n in sorted(gated.items()):
                rejections.add_metric([model, reason], n)
            yield rejections
        try:
            usage = shutil.disk_usage(self.root)
        except OSError:
            usage = None
        if usage is not None:
            yield GaugeMetricFamily("dicomnode_disk_used_ratio", "Used fraction of the spool's file system",
                                    value=usage.used / usage.total if usage.total else 1.0)
            yield GaugeMetricFamily("dicomnode_disk_free_bytes", "Free bytes on the spool's file system", value=usage.free)
        resident = self.models()
        if resident is not None:
            yield GaugeMetricFamily("dicomnode_models_loaded", "Models loaded and ready", value=len(resident.models))
            yield GaugeMetricFamily("dicomnode_models_failed", "Configured models that failed to load",
                                    value=len(resident.failures))
            up = GaugeMetricFamily("dicomnode_model_up", "1 when the model is loaded, 0 when it failed", labels=["model"])
            for name in sorted([*resident.models, *resident.failures]):
                up.add_metric([name], 1 if name in resident.models else 0)
            yield up
            calls = CounterMetricFamily("dicomnode_inference_calls", "Model calls run on each device", labels=["device"])
            merged = CounterMetricFamily("dicomnode_inference_calls_merged",
                                         "Model calls that served several series at once (batching across series)",
                                         labels=["device"])
            for device, queue in sorted(resident.queues().items()):
                calls.add_metric([device], queue.calls)
                merged.add_metric([device], queue.merged_calls)
            yield calls
            yield merged
