"""`dicomnode enhance`: the node's route -> enhance -> derive pipeline over files, without a network.

It runs exactly the code the node runs (config loading, ``route.decide`` per series, the resident
models with their guidance, ``enhance.enhance_series``), so a config and a model can be tried on a
folder of studies before the node is started, and a study can be re-processed by hand. Outputs
are the same derived Secondary Capture files the node would send (same deterministic UIDs).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.cli.common import count, expand_paths


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "enhance",
        help="enhance DICOM files/folders offline with the node's rules and models",
        description="Group the given DICOM files (folders are searched recursively) by series, route each "
        "series with the config's rules and write the enhanced Secondary Capture instances into --out "
        "(named SOPInstanceUID.dcm). Series a rule forwards or ignores are reported, not copied. "
        "Nothing is sent over the network.",
    )
    parser.add_argument("--config", required=True, type=Path, metavar="FILE", help="the node's YAML config file")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the derived files")
    parser.add_argument("--model", metavar="NAME",
                        help="enhance every series with this configured model instead of following the rules")
    parser.add_argument("--calling-aet", default="", metavar="AET",
                        help="AE title to assume as sender, for rules that match CallingAETitle")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="frames per model call (default: the model's batch_size in the config)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders")
    parser.set_defaults(func=main)


@dataclass
class _Series:
    uid: str
    paths: list[Path] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Outcome:
    series: _Series
    action: str
    rule: str | None
    model: str | None
    chosen: int = 0
    written: int = 0
    failed: list[tuple[Path, str]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)




def main(args: argparse.Namespace) -> int:
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    from dicomnode import route
    from dicomnode.config import ConfigError, load_config
    from dicomnode.derive import DeriveSettings
    from dicomnode.enhance import enhance_series
    from dicomnode.resident import ModelUnavailable, ResidentModels

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    if args.model is not None and args.model not in config.models:
        known = ", ".join(sorted(config.models)) or "none"
        print(f"dicomnode enhance: --model {args.model!r} is not in the config's models (known: {known})", file=sys.stderr)
        return 2
    if args.batch_size is not None and args.batch_size < 1:
        print("dicomnode enhance: --batch-size must be at least 1", file=sys.stderr)
        return 2
    missing_inputs = [p for p in args.inputs if not p.exists()]
    if missing_inputs:
        print(f"dicomnode enhance: input not found: {', '.join(map(str, missing_inputs))}", file=sys.stderr)
        return 2

    keywords = route.routing_keywords(config) | {"Modality"}
    files = list(expand_paths(args.inputs))
    series: dict[str, _Series] = {}
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(files, desc="reading headers", unit="file", disable=None, leave=False):
        try:
            tags = route.routing_tags(path, keywords)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((path, "not a DICOM file" if isinstance(exc, InvalidDicomError) else str(exc)))
            continue
        uid = str(tags.get("SeriesInstanceUID") or "(no SeriesInstanceUID)")
        entry = series.setdefault(uid, _Series(uid))
        entry.paths.append(path)
        entry.tags.append(tags)

    plans: list[tuple[_Outcome, list[Path]]] = []
    for entry in series.values():
        if args.model is not None:
            outcome = _Outcome(entry, "enhance", None, args.model)
            plans.append((outcome, list(entry.paths)))
            continue
        decision = route.decide(config, entry.tags, args.calling_aet)
        outcome = _Outcome(entry, decision.action, decision.rule, decision.model)
        plans.append((outcome, [entry.paths[i] for i in decision.matched]))

    needed = sorted({o.model for o, _ in plans if o.action == "enhance" and o.model})
    models = ResidentModels.load(config, only=needed) if needed else ResidentModels({}, {})
    for name in needed:
        if name in models.failures:
            print(f"model {name}: {models.failures[name]}", file=sys.stderr)

    settings = DeriveSettings.from_config(config)
    to_enhance = sum(len(chosen) for o, chosen in plans if o.action == "enhance")
    started = time.perf_counter()
    with tqdm(total=to_enhance, desc="enhancing", unit="instance", disable=None) as bar:
        for outcome, chosen in plans:
            outcome.chosen = len(chosen)
            if outcome.action != "enhance" or not chosen:
                continue
            assert outcome.model is not None
            try:
                resident = models.get(outcome.model)
            except ModelUnavailable as exc:
                outcome.failed = [(p, str(exc)) for p in chosen]
                bar.update(len(chosen))
                continue
            tags = outcome.series.tags[0]
            modality = str(tags.get("Modality") or "") or None
            _vector, guidance_id = models.guidance_for(outcome.model, modality)
            # the enhancer carries its modality's guidance record itself (as in the node)
            result = enhance_series(
                chosen, models.enhancer_for(outcome.model, modality), settings, args.out,
                guidance=None, guidance_id=guidance_id,
                batch_size=args.batch_size or resident.batch_size, progress=bar.update,
            )
            outcome.written = len(result.outputs)
            outcome.failed = list(result.failed)
            outcome.timings = dict(result.timings)
    elapsed = time.perf_counter() - started
    return _report(plans, skipped, files, args.out, elapsed)


def _report(plans: list[tuple[_Outcome, list[Path]]], skipped: list[tuple[Path, str]], files: list[Path],
            out: Path, elapsed: float) -> int:
    written = failed = 0
    for outcome, _chosen in plans:
        entry = outcome.series
        modality = entry.tags[0].get("Modality") or "?"
        head = f"Series {entry.uid} (Modality {modality}, {count(len(entry.paths), 'instance')})"
        # no rule but "enhance" can only come from --model; the unmatched policy forwards or ignores
        via = f"rule {outcome.rule!r}" if outcome.rule else ("--model" if outcome.action == "enhance" else "no rule matched")
        if outcome.action == "enhance":
            line = f"  {via} -> model {outcome.model!r}: {outcome.written} of {outcome.chosen} enhanced"
            if outcome.timings:
                line += " (" + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()) + ")"
        elif outcome.action == "forward":
            line = f"  {via} -> forward untouched ({outcome.chosen} instances; nothing is sent offline)"
        else:
            line = f"  {via} -> ignore"
        print(head)
        print(line)
        for path, reason in outcome.failed:
            print(f"  FAILED {path}: {reason}")
        written += outcome.written
        failed += len(outcome.failed)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    enhanced_series = sum(1 for o, _ in plans if o.action == "enhance")
    print(
        f"{count(len(files), 'file')}, {count(len(plans), 'series', 'series')} ({enhanced_series} to enhance): "
        f"{written} written to {out}, {failed} failed"
        + (f", {len(skipped)} skipped" if skipped else "")
        + f" in {elapsed:.1f} s"
    )
    if failed or not plans:
        return 1
    return 0
