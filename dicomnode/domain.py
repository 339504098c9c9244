"""Typed objects passed between the stages: a series as the pipeline sees it, and what came of it.

A :class:`Series` is built from the ledger (the live node) or from files on disk (``dicomnode enhance``,
``dicomnode route``, the demo) and carries each instance's header tags, so routing never re-reads a
file. The pipeline returns a :class:`SeriesOutcome`; the caller records it (one ledger transition)
or reports it. Patient identity appears only as a hash (``patient_key``), never as text.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

__all__ = ["Action", "Instance", "Series", "SeriesOutcome", "patient_key"]

Action = Literal["enhance", "forward", "ignore"]


def patient_key(patient_id: str) -> str:
    """A short hash of the PatientID: tells patients apart without storing or logging the identifier."""
    return hashlib.sha256(patient_id.strip().encode("utf-8", "surrogateescape")).hexdigest()[:16]


@dataclass(frozen=True)
class Instance:
    """One source instance: its file and the header tags the rules and provenance need."""

    path: Path
    tags: Mapping[str, Any]
    ledger_id: int | None = None  # the instance row in the ledger (live node only)

    @property
    def sop_uid(self) -> str:
        return str(self.tags.get("SOPInstanceUID") or "")


@dataclass(frozen=True)
class Series:
    """One series of one patient in one study, with its instances in arrival (or file) order."""

    patient_key: str
    study_uid: str
    series_uid: str
    instances: tuple[Instance, ...]
    calling_aet: str = ""
    job_id: int | None = None

    @property
    def modality(self) -> str | None:
        for inst in self.instances:
            value = inst.tags.get("Modality")
            if value:
                return str(value)
        return None


@dataclass
class SeriesOutcome:
    """What the pipeline did with one series.

    ``matched`` indexes ``series.instances``: the instances the rule took (the others are left alone).
    ``outputs`` are written files (derived objects, or the sources for ``forward``); ``failed`` holds
    sources that produced nothing, with the reason; ``skipped`` sources the node does not enhance
    (smaller than ``derive.min_size``), with the reason. ``error`` is set when the series as a whole failed
    (its model is unavailable, nothing could be enhanced); ``gate`` holds the quality gate's verdict.
    """

    action: Action
    rule: str | None
    model: str | None = None
    destinations: tuple[str, ...] = ()
    matched: tuple[int, ...] = ()
    guidance_id: str | None = None
    outputs: list[Path] = field(default_factory=list)
    failed: list[tuple[Path, str]] = field(default_factory=list)
    skipped: list[tuple[Path, str]] = field(default_factory=list)  # not enhanced by design (too small), not an error
    timings: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    gate: dict[str, Any] | None = None

    @property
    def held_back(self) -> bool:
        """True when the quality gate stopped outputs from being sent."""
        return bool(self.gate and not self.gate.get("passed", True))
