"""Small helpers shared by the command modules (file arguments, plural-aware counts)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from pathlib import Path


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
