"""Small helpers shared by the command modules: loading the config, file arguments, plural-aware counts."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from dicomnode.config import ConfigError, NodeConfig, load_config
from dicomnode.configerrors import environment_problems
from dicomnode.ledger import Ledger, LedgerError
from models.registry import ModelLoadError, read_card

EXIT_CONFIG = 2  # every command exits with this when its config file is invalid or unreadable

__all__ = ["EXIT_CONFIG", "config_or_exit", "config_problems", "count", "expand_paths", "open_ledger", "when"]


def config_problems(path: Path | None, *, files: bool = True) -> tuple[NodeConfig | None, list[str]]:
    """The config (``None``: the embedded default), or the lines that say why it cannot be used
    (with ``files``: missing or corrupt weights, missing TLS files, TLS keys that do not match their
    certificates, a bind address that is not this host's, storage.root or logging.file not writable)."""
    try:
        config = load_config(path)
    except ConfigError as exc:
        return None, str(exc).splitlines()
    missing = (config.missing_files() + _weights_problems(config) + environment_problems(config)) if files else []
    if missing:
        lines = [f"invalid config {path or 'embedded default'} ({len(missing)} problem{'s' if len(missing) != 1 else ''}):"]
        lines += [f"  {key}: {reason}" for key, reason in missing]
        return None, lines
    return config, []


def _weights_problems(config: NodeConfig) -> list[tuple[str, str]]:
    """Weights whose card is missing, unreadable or does not match the file (sha256), as (key, reason)."""
    problems = []
    for name, model in config.models.items():
        if model.weights is None or not Path(model.weights).exists():
            continue  # missing files are reported by missing_files()
        try:
            read_card(Path(model.weights), verify=True)
        except ModelLoadError as exc:
            problems.append((f"models.{name}.weights", str(exc)))
    return problems


def config_or_exit(path: Path | None, *, files: bool = False) -> NodeConfig:
    """Load ``path`` or print every problem and exit with :data:`EXIT_CONFIG`."""
    config, problems = config_problems(path, files=files)
    if config is None:
        print("\n".join(problems), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return config


def open_ledger(config: NodeConfig, *, write: bool = False) -> Ledger:
    """The node's ledger, read-only unless ``write`` (commands that read it work beside a running node and
    never create a spool); a missing or unreadable ledger prints why and exits with 1."""
    path = Path(config.storage.root) / "ledger.sqlite3"
    if not path.exists():
        print(f"error: no ledger at {path} (has `dicomnode serve` run with this config?)", file=sys.stderr)
        raise SystemExit(1)
    try:
        return Ledger(path, readonly=not write)
    except LedgerError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(1) from None


def when(ts: float | None) -> str:
    """A ledger timestamp as local date and time ("-" when unset)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else "-"


def expand_paths(paths: Iterable[Path]) -> Iterator[Path]:
    """Files named on the command line, folders walked recursively in sorted order."""
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def count(n: int, noun: str, plural: str | None = None) -> str:
    """'1 series', '3 instances': a count with the noun in the right number."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
