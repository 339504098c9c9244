"""`dicomnode init --dir DIR`: write an editable config.yaml for an installed node.

The file is the embedded default (:data:`dicomnode.config.DEFAULT_CONFIG`) with its comments kept, and
with what only the installing admin knows filled in: absolute storage paths (the spool and the outbox
under ``DIR/var`` unless ``--storage`` says otherwise), the AE title and port, and optionally a PACS the
rules send to. The shipped models stay named ``builtin:NAME``, so an upgraded wheel brings its weights
and guidance caches with it and the config does not change. The result is checked like
``dicomnode check-config`` before it is put in place; an existing file is never overwritten without
``--force``.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

from dicomnode.cli.common import EXIT_CONFIG, config_problems, count
from dicomnode.config import DEFAULT_CONFIG

__all__ = ["register", "render_config"]

_PACS_RE = re.compile(r"^(?P<aet>[^@]{1,16})@(?P<host>[^:@]+):(?P<port>\d{1,5})$")


def register(subparsers: argparse._SubParsersAction) -> None:
    init = subparsers.add_parser(
        "init",
        help="write an editable config.yaml (absolute storage paths, the shipped models and rules)",
        description="Write DIR/config.yaml: the embedded default with its comments, absolute storage paths, the "
        "shipped models (builtin:NAME) and rules, and optionally a PACS destination. The file is checked "
        "before it is written. Edit it, then `dicomnode check-config DIR/config.yaml`.",
    )
    init.add_argument("--dir", type=Path, required=True, metavar="DIR", help="folder for config.yaml (created if missing)")
    init.add_argument("--storage", type=Path, default=None, metavar="PATH",
                      help="storage.root: spool, ledger and outbox (default: DIR/var)")
    init.add_argument("--ae-title", default=None, metavar="AET", help="the node's AE title (default: DICOMNODE)")
    init.add_argument("--port", type=int, default=None, help="the node's DICOM port (default: 11112)")
    init.add_argument("--pacs", default=None, metavar="AET@HOST:PORT",
                      help="add a `type: dicom` destination named pacs and send every rule's output there too")
    init.add_argument("--force", action="store_true", help="overwrite an existing config.yaml")
    init.set_defaults(func=init_main)


def _replace_once(text: str, pattern: str, repl: str | Callable[[re.Match[str]], str], what: str) -> str:
    new, n = re.subn(pattern, repl, text, count=1, flags=re.MULTILINE)
    if n != 1:  # the embedded default changed shape: fail loudly rather than write a half-edited file
        raise RuntimeError(f"dicomnode init: cannot set {what} in {DEFAULT_CONFIG} (pattern {pattern!r} not found)")
    return new


def _yaml_str(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_config(storage: Path, *, ae_title: str | None = None, port: int | None = None,
                  pacs: tuple[str, str, int] | None = None) -> str:
    """The embedded default's text with absolute storage paths, the node's identity and an optional PACS."""
    text = DEFAULT_CONFIG.read_text(encoding="utf-8")
    storage = Path(os.path.abspath(storage))
    header_end = text.index("\nnode:")
    header = (
        "# dicomnode configuration written by `dicomnode init`; edit it, then check it with\n"
        "#   dicomnode check-config THIS_FILE\n"
        "# Relative paths resolve against this file's folder. `builtin:NAME` names a file shipped inside the\n"
        "# installed package (weights, model cards, guidance caches): an upgrade brings its own.\n"
        "# Every key: docs/configuration.md.\n"
    )
    text = header + text[header_end:]
    text = _replace_once(text, r"^(  root: )\S+", lambda m: m.group(1) + _yaml_str(str(storage)), "storage.root")
    text = _replace_once(text, r"^(    folder: )\S+", lambda m: m.group(1) + _yaml_str(str(storage / "outbox")),
                         "destinations.outbox.folder")
    if ae_title is not None:
        text = _replace_once(text, r"^(  ae_title: )\S+", lambda m: m.group(1) + _yaml_str(ae_title), "node.ae_title")
        text = _replace_once(text, r"(# senders must call us )\S+", lambda m: m.group(1) + ae_title, "the called AE title comment")
    if port is not None:
        text = _replace_once(text, r"^(  port: )\d+", lambda m: m.group(1) + str(port), "node.port")
    if pacs is not None:
        aet, host, pacs_port = pacs
        block = (f"  pacs:\n    type: dicom\n    ae_title: {_yaml_str(aet)}\n    host: {_yaml_str(host)}\n"
                 f"    port: {pacs_port}\n")
        text = _replace_once(text, r"^  # pacs:\n(  #.*\n)*", block, "destinations.pacs")
        text = re.sub(r"^(    destinations: )\[outbox\]", r"\1[outbox, pacs]", text, flags=re.MULTILINE)
    return text


def _parse_pacs(value: str) -> tuple[str, str, int]:
    m = _PACS_RE.match(value.strip())
    if not m:
        raise ValueError(f"--pacs {value!r}: expected AET@HOST:PORT, e.g. PACS@192.0.2.10:104")
    return m.group("aet"), m.group("host"), int(m.group("port"))


def init_main(args: argparse.Namespace) -> int:
    folder = Path(os.path.abspath(args.dir))
    target = folder / "config.yaml"
    if target.exists() and not args.force:
        print(f"error: {target} exists; edit it, or pass --force to write a fresh one", file=sys.stderr)
        return 1
    try:
        pacs = _parse_pacs(args.pacs) if args.pacs else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    storage = args.storage if args.storage is not None else folder / "var"
    text = render_config(storage, ae_title=args.ae_title, port=args.port, pacs=pacs)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".config.", suffix=".yaml", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
        config, problems = config_problems(Path(tmp), files=True)
        if config is None:
            print("\n".join(problems).replace(tmp, str(target)), file=sys.stderr)
            return EXIT_CONFIG
        os.chmod(tmp, 0o640)  # noqa: PTH101 - the service group may read it; nobody else
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    print(f"wrote {target}: {count(len(config.rules), 'rule')}, {count(len(config.models), 'model')} "
          f"({', '.join(config.models)}), {count(len(config.destinations), 'destination')}; storage {config.storage.root}")
    print(f"next: edit it, then `dicomnode check-config {target}` and `dicomnode serve --config {target}`")
    return 0
