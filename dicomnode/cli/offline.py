"""`dicomnode enhance`: the node's route -> enhance -> derive pipeline over files, without a network.

It runs exactly the code the node runs (series grouped as the receiver groups them, then
:class:`dicomnode.pipeline.Pipeline`), so a config and a model can be tried on a folder of studies
before the node is started, and a study can be re-processed by hand. Outputs are the same derived
Secondary Capture files the node would send (byte for byte, same deterministic UIDs).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from dicomnode.cli.common import config_or_exit, count, expand_paths

if TYPE_CHECKING:
    from dicomnode.domain import Series, SeriesOutcome


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "enhance",
        help="enhance DICOM files/folders offline with the node's rules and models",
        description="Group the given DICOM files (folders are searched recursively) by series, route each "
        "series with the config's rules and write the enhanced Secondary Capture instances into --out "
        "(named SOPInstanceUID.dcm). Series a rule forwards or ignores are reported, not copied. "
        "Nothing is sent over the network.",
    )
    parser.add_argument("--config", type=Path, default=None, metavar="FILE", help="the node's YAML config file (default: the embedded default)")
    parser.add_argument("--out", required=True, type=Path, metavar="DIR", help="folder for the derived files")
    parser.add_argument("--model", metavar="NAME",
                        help="enhance every series with this configured model instead of following the rules")
    parser.add_argument("--calling-aet", default="", metavar="AET",
                        help="AE title to assume as sender, for rules that match CallingAETitle")
    parser.add_argument("--batch-size", type=int, metavar="N",
                        help="frames per model call (default: the model's batch_size in the config)")
    parser.add_argument("--no-gate", action="store_true",
                        help="write every output to --out even where the quality gate would hold it back (inspection only)")
    parser.add_argument("inputs", nargs="+", type=Path, metavar="INPUT", help="DICOM files or folders")
    parser.set_defaults(func=main)


def main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # noqa: PLC0415 - the heavy stack loads only for this command

    from dicomnode.assemble import series_from_files  # noqa: PLC0415
    from dicomnode.config import GatePolicy  # noqa: PLC0415
    from dicomnode.pipeline import Pipeline  # noqa: PLC0415
    from dicomnode.resident import ResidentModels  # noqa: PLC0415
    from dicomnode.route import decide, routing_keywords  # noqa: PLC0415

    config = config_or_exit(args.config)
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

    files = list(expand_paths(args.inputs))
    series, skipped = series_from_files(tqdm(files, desc="reading headers", unit="file", disable=None, leave=False),
                                        routing_keywords(config), args.calling_aet)
    plans = []
    for entry in series:
        if args.model is not None:
            plans.append((entry, "enhance", args.model, len(entry.instances)))
        else:
            d = decide(config, [i.tags for i in entry.instances], entry.calling_aet)
            plans.append((entry, d.action, d.model, len(d.matched)))
    needed = sorted({m for _, action, m, _ in plans if action == "enhance" and m})
    models = ResidentModels.load(config, only=needed) if needed else ResidentModels({}, {})
    for name in needed:
        if name in models.failures:
            print(f"model {name}: {models.failures[name]}", file=sys.stderr)
    pipeline = Pipeline(config, models)
    no_gate = GatePolicy(enabled=False) if args.no_gate else None
    to_enhance = sum(n for _, action, _, n in plans if action == "enhance")
    started = time.perf_counter()
    outcomes = []
    with tqdm(total=to_enhance, desc="enhancing", unit="instance", disable=None) as bar:
        for entry, action, _model, _n in plans:
            if action == "enhance":
                outcomes.append((entry, pipeline.run(entry, args.out, model=args.model, batch_size=args.batch_size,
                                                     progress=bar.update, gate_policy=no_gate)))
            else:  # forward/ignore: nothing is written or sent offline
                outcomes.append((entry, pipeline.run(entry, args.out)))
    return _report(outcomes, skipped, files, args.out, time.perf_counter() - started)


def _report(outcomes: list[tuple[Series, SeriesOutcome]], skipped: list[tuple[Path, str]], files: list[Path],
            out: Path, elapsed: float) -> int:
    from dicomnode.pipeline import GATED_DIR  # noqa: PLC0415  (loaded already: the pipeline ran)

    written = failed = held = 0
    for entry, outcome in outcomes:
        head = f"Series {entry.series_uid} (Modality {entry.modality or '?'}, {count(len(entry.instances), 'instance')})"
        # no rule but "enhance" can only come from --model; the unmatched policy forwards or ignores
        via = f"rule {outcome.rule!r}" if outcome.rule else ("--model" if outcome.action == "enhance" else "no rule matched")
        if outcome.action == "enhance":
            line = f"  {via} -> model {outcome.model!r}: {len(outcome.outputs)} of {len(outcome.matched)} enhanced"
            if outcome.timings:
                line += " (" + ", ".join(f"{k} {v:.2f} s" for k, v in outcome.timings.items()) + ")"
        elif outcome.action == "forward":
            line = f"  {via} -> forward untouched ({len(outcome.matched)} instances; nothing is sent offline)"
        else:
            line = f"  {via} -> ignore"
        print(head)
        print(line)
        for path, reason in outcome.failed:
            print(f"  FAILED {path}: {reason}")
        for path, reason in outcome.skipped:
            print(f"  not enhanced {path}: {reason}")
        if outcome.held_back and outcome.gate is not None:
            held += 1
            print(f"  HELD BACK by the quality gate ({outcome.gate['failed']} of {outcome.gate['measured']} instances; "
                  f"outputs in {out / GATED_DIR}):")
            for failure in outcome.gate["failures"]:
                print(f"    {failure['sop_instance_uid']}: {'; '.join(failure['reasons'])}")
        if outcome.action == "enhance":
            written += len(outcome.outputs)
        failed += len(outcome.failed)
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    enhanced_series = sum(1 for _, o in outcomes if o.action == "enhance")
    print(
        f"{count(len(files), 'file')}, {count(len(outcomes), 'series', 'series')} ({enhanced_series} to enhance): "
        f"{written} written to {out}, {failed} failed"
        + (f", {held} series held back by the quality gate" if held else "")
        + (f", {len(skipped)} skipped" if skipped else "")
        + f" in {elapsed:.1f} s"
    )
    if failed or held or not outcomes:
        return 1
    return 0
