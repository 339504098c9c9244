"""Field types shared by every part of the config schema (and by destination types in their own files).

Each validator raises ``ValueError`` with a sentence an admin can act on; the config loader adds the
key path in front of it.
"""

from __future__ import annotations

import difflib
import os
import re
import string
from pathlib import Path
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, ValidationInfo

__all__ = ["AETitle", "BUILTIN_PREFIX", "ConfigPath", "Name", "Port", "StrictModel", "builtin_dir", "did_you_mean", "upper"]

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_AE_CHARS = set(string.printable) - set("\\\t\n\r\x0b\x0c")


class StrictModel(BaseModel):
    """Unknown keys are errors (a misspelt optional key would otherwise be ignored and its default used)."""

    model_config = ConfigDict(extra="forbid", validate_default=True)


def did_you_mean(word: str, choices: Any, cutoff: float = 0.6) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=cutoff)
    return f" (did you mean {close[0]!r}?)" if close else ""


def upper(value: Any) -> Any:
    return value.upper() if isinstance(value, str) else value


BUILTIN_PREFIX = "builtin:"


def builtin_dir() -> Path:
    """Where the shipped weights, model cards and guidance caches are installed."""
    import models  # noqa: PLC0415 - only its location is needed, never its code

    return Path(models.__file__).resolve().parent / "weights"


def _builtin(value: Any) -> Any:
    """``builtin:NAME`` -> the shipped file NAME (a plain name: no folders, no way out of the package)."""
    if isinstance(value, str) and value.startswith(BUILTIN_PREFIX):
        name = value[len(BUILTIN_PREFIX):]
        if not name or "/" in name or "\\" in name or name.startswith("."):
            raise ValueError(f"{value!r}: builtin: takes the plain name of a shipped file, e.g. builtin:hqgnet-ccm.pt")
        return builtin_dir() / name
    return value


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Relative paths are relative to the config file's folder (passed as validation context)."""
    value = value.expanduser()
    base = (info.context or {}).get("base_dir")
    if not value.is_absolute() and base is not None:
        value = Path(base) / value
    return Path(os.path.normpath(Path(value).absolute()))


ConfigPath = Annotated[Path, BeforeValidator(_builtin), AfterValidator(_resolve_path)]


def _check_ae_title(value: str) -> str:
    """DICOM AE title: 1-16 characters of the default repertoire, no backslash or control chars."""
    stripped = value.strip(" ")
    if not stripped:
        raise ValueError("AE title is empty")
    if len(stripped) > 16:
        raise ValueError(f"AE title {stripped!r} is {len(stripped)} characters long (at most 16)")
    bad = sorted({c for c in stripped if c not in _AE_CHARS})
    if bad:
        raise ValueError(f"AE title {stripped!r} contains {', '.join(repr(c) for c in bad)} (only printable ASCII, no backslash)")
    return stripped


def _number_to_str(value: Any) -> Any:
    """YAML reads an unquoted AE title such as 12345 as a number; it is still a title."""
    return str(value) if isinstance(value, int) and not isinstance(value, bool) else value


AETitle = Annotated[str, BeforeValidator(_number_to_str), AfterValidator(_check_ae_title)]


def _check_port(value: int) -> int:
    if not 1 <= value <= 65535:
        raise ValueError(f"port must be between 1 and 65535 (got {value})")
    return value


Port = Annotated[int, AfterValidator(_check_port)]


def _check_name(value: str) -> str:
    if not _NAME_RE.match(value):
        raise ValueError(f"name {value!r} must start with a letter or digit and use only letters, digits, '_', '.', '-'")
    return value


Name = Annotated[str, AfterValidator(_check_name)]
