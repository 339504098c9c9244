"""Admin commands: `dicomnode check-config` and `dicomnode route` (a dry run of the routing rules).

Both only read the config and file headers (no models, no network), so an admin can check a
change on any machine before restarting the node.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dicomnode.config import ConfigError, NodeConfig, load_config
from dicomnode.cli.common import count, expand_paths


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check-config",
        help="validate a config file; list every problem with its key",
        description="Validate a config file. Prints 'OK: N rules, M models, K destinations', or every "
        "problem with its key path (exit status 1). Missing model weights and TLS files count as problems.",
    )
    check.add_argument("file", nargs="?", type=Path, metavar="FILE", help="the YAML config file")
    check.add_argument("--config", dest="config_opt", type=Path, metavar="FILE", help="same as FILE")
    check.set_defaults(func=check_config_main)

    route = subparsers.add_parser(
        "route",
        help="dry run: which rule, model and destinations the given DICOM files would get",
        description="Group the given files (or folders, searched recursively) by series and show, for "
        "each series, the rule the node would pick, its model and destinations, and which instances "
        "it matched. Reads headers only; sends nothing.",
    )
    route.add_argument("--config", required=True, type=Path, metavar="FILE", help="the YAML config file")
    route.add_argument("--calling-aet", default="", metavar="AET",
                       help="AE title of the sender, for rules that match CallingAETitle (default: none)")
    route.add_argument("paths", nargs="+", type=Path, metavar="FILE.dcm", help="DICOM files or folders")
    route.set_defaults(func=route_main)


# --------------------------------------------------------------------------- check-config


def _load(path: Path) -> tuple[NodeConfig | None, list[str]]:
    """The config, or the lines describing why it cannot be used."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, str(exc).splitlines()
    missing = config.missing_files()
    if missing:
        lines = [f"invalid config {path} ({len(missing)} problem{'s' if len(missing) != 1 else ''}):"]
        lines += [f"  {key}: {reason}" for key, reason in missing]
        return None, lines
    return config, []


def check_config_main(args: argparse.Namespace) -> int:
    path = args.file or args.config_opt
    if path is None:
        print("dicomnode check-config: give the config FILE", file=sys.stderr)
        return 2
    config, problems = _load(path)
    if config is None:
        print("\n".join(problems), file=sys.stderr)
        return 1
    print(f"OK: {count(len(config.rules), 'rule')}, {count(len(config.models), 'model')}, "
          f"{count(len(config.destinations), 'destination')}")
    return 0



# --------------------------------------------------------------------------- route (dry run)


@dataclass
class _Series:
    uid: str
    paths: list[Path] = field(default_factory=list)
    tags: list[dict[str, Any]] = field(default_factory=list)



def route_main(args: argparse.Namespace) -> int:
    from pydicom.errors import InvalidDicomError
    from tqdm import tqdm

    from dicomnode.route import CALLING_AET, decide, routing_keywords, routing_tags

    try:
        config = load_config(args.config)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 1
    keywords = routing_keywords(config)
    if CALLING_AET in keywords and not args.calling_aet:
        print(f"note: some rules match {CALLING_AET}; without --calling-aet the sender is taken as empty")
    files = list(expand_paths(args.paths))
    series: dict[str, _Series] = {}
    skipped: list[tuple[Path, str]] = []
    for path in tqdm(files, desc="reading headers", unit="file", disable=None, leave=False):
        try:
            tags = routing_tags(path, keywords)
        except (InvalidDicomError, OSError, ValueError, EOFError) as exc:
            skipped.append((path, "not a DICOM file" if isinstance(exc, InvalidDicomError) else str(exc)))
            continue
        uid = str(tags.get("SeriesInstanceUID") or "(no SeriesInstanceUID)")
        entry = series.setdefault(uid, _Series(uid))
        entry.paths.append(path)
        entry.tags.append(tags)

    actions: dict[str, int] = {"enhance": 0, "forward": 0, "ignore": 0}
    for entry in series.values():
        decision = decide(config, entry.tags, args.calling_aet)
        actions[decision.action] += 1
        modality = entry.tags[0].get("Modality") or "?"
        print(f"Series {entry.uid} (Modality {modality}, {count(len(entry.paths), 'instance')})")
        if decision.rule is None:
            what = f"no rule matched -> unmatched policy: {config.unmatched.action}"
        else:
            what = f"rule {decision.rule!r}"
        if decision.action == "enhance":
            what += f" -> enhance with model {decision.model!r}"
        elif decision.action == "forward":
            what += " -> forward untouched"
        elif decision.rule is not None:
            what += " -> ignore (rule has no model and no destinations)"
        if decision.destinations:
            what += f" -> {', '.join(decision.destinations)}"
        print(f"  {what}")
        if decision.rule is not None:
            matched = set(decision.matched)
            names = [p.name for i, p in enumerate(entry.paths) if i in matched]
            others = [p.name for i, p in enumerate(entry.paths) if i not in matched]
            print(f"  matched {len(names)} of {len(entry.paths)}: {', '.join(names)}")
            if others:
                print(f"  not matched (left alone): {', '.join(others)}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    print(f"{count(len(files), 'file')}, {count(len(series), 'series', 'series')}: "
          f"{actions['enhance']} enhance, {actions['forward']} forward, {actions['ignore']} ignore"
          + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0 if series else 1
