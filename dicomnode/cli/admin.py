"""Admin commands: `dicomnode check-config` and `dicomnode route` (a dry run of the routing rules).

Both only read the config and file headers (no models, no network), so an admin can check a
change on any machine before restarting the node.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dicomnode.assemble import series_from_files
from dicomnode.cli.common import EXIT_CONFIG, config_or_exit, config_problems, count, expand_paths
from dicomnode.route import CALLING_AET, decide, routing_keywords


def register(subparsers: argparse._SubParsersAction) -> None:
    check = subparsers.add_parser(
        "check-config",
        help="validate a config file; list every problem with its key",
        description="Validate a config file. Prints 'OK: N rules, M models, K destinations', or every "
        "problem with its key path (exit status 2). Missing or corrupt model weights, missing TLS files, a TLS key "
        "that does not belong to its certificate, a node.host that is not an address of this machine and a "
        "storage.root or logging.file this user cannot write count as problems.",
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
    route.add_argument("--config", type=Path, default=None, metavar="FILE", help="the YAML config file (default: the embedded default)")
    route.add_argument("--calling-aet", default="", metavar="AET",
                       help="AE title of the sender, for rules that match CallingAETitle (default: none)")
    route.add_argument("paths", nargs="+", type=Path, metavar="FILE.dcm", help="DICOM files or folders")
    route.set_defaults(func=route_main)


# --------------------------------------------------------------------------- check-config


def check_config_main(args: argparse.Namespace) -> int:
    path = args.file or args.config_opt  # None: the embedded default
    config, problems = config_problems(path, files=True)
    if config is None:
        print("\n".join(problems), file=sys.stderr)
        return EXIT_CONFIG
    print(f"OK: {count(len(config.rules), 'rule')}, {count(len(config.models), 'model')}, "
          f"{count(len(config.destinations), 'destination')}")
    return 0


# --------------------------------------------------------------------------- route (dry run)


def route_main(args: argparse.Namespace) -> int:
    from tqdm import tqdm  # noqa: PLC0415 - progress bars only for this command

    config = config_or_exit(args.config)
    keywords = routing_keywords(config)
    if CALLING_AET in keywords and not args.calling_aet:
        print(f"note: some rules match {CALLING_AET}; without --calling-aet the sender is taken as empty")
    files = list(expand_paths(args.paths))
    series, skipped = series_from_files(tqdm(files, desc="reading headers", unit="file", disable=None, leave=False),
                                        keywords, args.calling_aet, as_received=True)
    actions: dict[str, int] = {"enhance": 0, "forward": 0, "ignore": 0}
    for entry in series:
        decision = decide(config, [i.tags for i in entry.instances], entry.calling_aet)
        actions[decision.action] += 1
        print(f"Series {entry.series_uid} (Modality {entry.modality or '?'}, {count(len(entry.instances), 'instance')})")
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
            names = [inst.path.name for i, inst in enumerate(entry.instances) if i in matched]
            others = [inst.path.name for i, inst in enumerate(entry.instances) if i not in matched]
            print(f"  matched {len(names)} of {len(entry.instances)}: {', '.join(names)}")
            if others:
                print(f"  not matched (left alone): {', '.join(others)}")
    for path, reason in skipped:
        print(f"skipped {path}: {reason}")
    kept = {inst.path for entry in series for inst in entry.instances} | {Path(path) for path, _ in skipped}
    for path in files:
        if Path(path) not in kept:  # as on the node, the later file of one SOPInstanceUID in a series replaces it
            print(f"replaced {path}: a later file has the same SOPInstanceUID in the same series")
    print(f"{count(len(files), 'file')}, {count(len(series), 'series', 'series')}: "
          f"{actions['enhance']} enhance, {actions['forward']} forward, {actions['ignore']} ignore"
          + (f"; {len(skipped)} skipped" if skipped else ""))
    return 0 if series else 1
