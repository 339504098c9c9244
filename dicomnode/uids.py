"""DICOM UIDs as the node trusts them: the one check, and the one way a UID becomes a file name."""

from __future__ import annotations

import re

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
MAX_UID_LENGTH = 64

__all__ = ["MAX_UID_LENGTH", "is_valid_uid", "safe_file_name"]


def is_valid_uid(value: str) -> bool:
    """Digits and dots, no empty component, at most 64 characters (PS3.5 9.1)."""
    return 0 < len(value) <= MAX_UID_LENGTH and _UID.fullmatch(value) is not None


def safe_file_name(uid: str) -> str:
    """A UID as a file name: anything but digits and dots (a malformed sender) is replaced, never a path."""
    cleaned = "".join(c if (c.isdigit() or c == ".") else "_" for c in uid.strip())
    return cleaned[:MAX_UID_LENGTH] or "unnamed"
