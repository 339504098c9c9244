"""Reading the header tags the rules and the pipeline need from a DICOM file, never its pixel data.

Values come back as plain ``str`` or ``list[str]`` (multi-valued), so they can be matched as text and
stored as JSON; tags absent from the file are absent from the result.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pydicom
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue

from dicomnode.config import CALLING_AET_KEY

__all__ = ["ALWAYS_READ", "plain_scalar", "read_tags"]
# Tags the node needs beside the rule keys, to group and log instances by UID.
ALWAYS_READ = ("SOPInstanceUID", "SeriesInstanceUID", "StudyInstanceUID", "Modality")


def read_tags(path: Path, keywords: Iterable[str]) -> dict[str, Any]:
    """Read the values the rules need from one file, header only (pixel data is never read).

    Values are plain ``str`` or ``list[str]`` (multi-valued), so the result can be stored as JSON;
    tags absent from the file are absent from the result. The calling AE title is not in the file
    and is skipped. Raises pydicom's ``InvalidDicomError``/``OSError`` for unreadable files.
    """
    wanted = [k for k in dict.fromkeys([*ALWAYS_READ, *keywords]) if k != CALLING_AET_KEY]
    tags = [t for t in (tag_for_keyword(k) for k in wanted) if t is not None]
    ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=tags)
    out: dict[str, Any] = {}
    for keyword in wanted:
        element = ds.get(keyword)
        if element is None:
            continue
        out[keyword] = _plain(element)
    return out


def _plain(value: Any) -> str | list[str]:
    """A tag value as text: numbers and person names via str(), multi-values as a list."""
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return [plain_scalar(v) for v in value]
    return plain_scalar(value)


def plain_scalar(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("ascii", errors="replace").rstrip("\x00 ")
    return str(value)


