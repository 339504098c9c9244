"""The `dicomnode` command: a thin dispatcher over command groups.

Each module in COMMAND_MODULES defines ``register(subparsers)``, which adds its sub-commands and
sets ``func`` (taking the parsed ``argparse.Namespace`` and returning an exit code). Modules are
imported lazily by name so that, for example, `dicomnode check-config` never imports torch.
The CLI is the only place that knows both the service (``dicomnode``) and the models (``models``).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from dicomnode import __version__

# Order = order in `dicomnode --help`.
COMMAND_MODULES: tuple[str, ...] = (
    "dicomnode.cli.node",  # serve, status, resend
    "dicomnode.cli.admin",  # check-config, route
    "dicomnode.cli.offline",  # enhance (files/folders, no network)
    "dicomnode.cli.train",  # train pretrain-g | hqgnet | stillgan | lamegan
    "dicomnode.cli.modelinfo",  # models info
    "dicomnode.cli.evaluate",  # evaluate
    "dicomnode.cli.guidance",  # guidance build | show
    "dicomnode.cli.demo",  # demo
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue  # command group not built yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
