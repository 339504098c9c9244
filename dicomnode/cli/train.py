"""`dicomnode train MODEL ...`: one sub-command per training module in ``models.train``.

Each training module defines ``add_arguments(parser)`` and ``main(args) -> int``; its docstring's
first line is the help text. Modules are imported only when present, so the group grows as models do.
"""

from __future__ import annotations

import argparse
import importlib

from models.registry import MODELS


def trainers() -> dict[str, str]:
    """`dicomnode train` sub-command -> training module, from each model kind's ModelSpec."""
    found: dict[str, str] = {}
    for spec in MODELS.values():
        found.update(spec.trainers)
    return found


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train an enhancement model from image or DICOM folders")
    sub = parser.add_subparsers(dest="trainer", metavar="MODEL")
    for name, module_name in trainers().items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name != module_name:
                raise
            continue
        help_text = (module.__doc__ or name).strip().splitlines()[0]
        p = sub.add_parser(name, help=help_text, description=module.__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        module.add_arguments(p)
        p.set_defaults(func=module.main)
    parser.set_defaults(func=lambda args: (parser.print_help(), 2)[1])
