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

# Command -> the module that registers it. Order = order in `dicomnode --help`.
COMMANDS: dict[str, str] = {
    "init": "dicomnode.cli.init",
    "serve": "dicomnode.cli.node",
    "status": "dicomnode.cli.node",
    "resend": "dicomnode.cli.node",
    "reprocess": "dicomnode.cli.node",
    "jobs": "dicomnode.cli.ops",
    "echo": "dicomnode.cli.ops",
    "check-config": "dicomnode.cli.admin",
    "route": "dicomnode.cli.admin",
    "enhance": "dicomnode.cli.offline",
    "train": "dicomnode.cli.train",
    "models": "dicomnode.cli.modelinfo",
    "evaluate": "dicomnode.cli.evaluate",
    "guidance": "dicomnode.cli.guidance",
    "demo": "dicomnode.cli.demo",
}
COMMAND_MODULES: tuple[str, ...] = tuple(dict.fromkeys(COMMANDS.values()))


def _first_command(argv: Sequence[str]) -> str | None:
    for token in argv:
        if not token.startswith("-"):
            return token
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """Build the parser; when ``argv`` names a command, import only its module (keeps
    `check-config` and `status` free of torch start-up time)."""
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"dicomnode {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    wanted = COMMANDS.get(_first_command(argv or []) or "")
    for name in (wanted,) if wanted else COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue  # command group not built yet
        module.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING - 10 * min(args.verbose + 1, 2),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    logging.getLogger("matplotlib").setLevel(logging.WARNING)  # its font-cache chatter is not ours
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
