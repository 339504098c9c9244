"""A folder (``type: folder``), e.g. a share watched by another system or an archive.

Each file is written as ``SOPInstanceUID.dcm`` durably (temporary name, fsync, rename, folder fsync):
a reader watching the folder never sees a partial file, and a retry overwrites the same name instead
of duplicating the instance. Files are private to the service user (0600) unless ``file_mode`` says
otherwise (e.g. ``"0640"`` for a group that reads the share).

Retention (:mod:`dicomnode.retention`) deletes the folder's ``*.dcm`` files older than
``storage.retention_days_delivered`` when the folder is inside ``storage.root`` or when
``swept_by_retention: true`` says so; a folder elsewhere (a share another system empties) is left alone
unless configured (``swept_by_retention: false`` keeps even a folder inside the root).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import ClassVar, Literal

from pydantic import field_validator

from dicomnode.configtypes import ConfigPath
from dicomnode.destinations.base import Destination, DestinationSettings, Progress, SendOutcome, destination_type
from dicomnode.destinations.dicom import read_file_meta
from dicomnode.durable import copy_file
from dicomnode.redact import exception_text
from dicomnode.uids import is_valid_uid

__all__ = ["FolderDestination", "FolderSettings"]

logger = logging.getLogger(__name__)


class FolderSettings(DestinationSettings):
    """A folder; files are written atomically."""

    implied_by: ClassVar[str | None] = "folder"
    type: Literal["folder"] = "folder"
    folder: ConfigPath
    file_mode: str = "0600"
    swept_by_retention: bool | None = None  # None: swept when the folder is inside storage.root

    @field_validator("file_mode")
    @classmethod
    def _mode(cls, value: str) -> str:
        try:
            mode = int(value, 8)
        except ValueError:
            raise ValueError(f"file_mode must be an octal string such as \"0600\" or \"0640\", got {value!r}") from None
        if mode & ~0o777 or mode & 0o007:
            raise ValueError(f"file_mode {value!r}: only owner and group bits may be set (no access for others)")
        return value


@destination_type(FolderSettings)
class FolderDestination(Destination):
    """Writes each file as ``SOPInstanceUID.dcm`` atomically (temp file, fsync, rename).

    A reader watching the folder never sees a partial file, and a retry overwrites the same name
    instead of duplicating the instance.
    """

    def __init__(self, name: str, folder: Path, mode: int = 0o600) -> None:
        self.name = name
        self.folder = Path(folder)
        self.mode = mode

    @classmethod
    def from_settings(cls, name: str, cfg: FolderSettings, node_ae_title: str) -> FolderDestination:
        return cls(name, cfg.folder, int(cfg.file_mode, 8))

    def echo(self) -> tuple[bool, str]:
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            return False, f"cannot create {self.folder}: {exc.strerror or exc}"
        if not os.access(self.folder, os.W_OK | os.X_OK):
            return False, f"{self.folder} is not writable"
        return True, f"{self.folder} is writable"

    def __repr__(self) -> str:
        return f"FolderDestination({self.name!r}: {self.folder})"

    def send(self, paths: Sequence[Path], progress: Progress | None = None) -> list[SendOutcome]:
        if not paths:
            return []
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            detail = f"cannot create folder {self.folder}: {exc.strerror or exc}"
            logger.warning("%s: %s", self.name, detail)
            return [SendOutcome(Path(p), False, None, detail) for p in paths]
        outcomes = []
        for p in paths:
            outcomes.append(self._write_one(Path(p)))
            if progress is not None:
                progress(outcomes[-1])
        sent = sum(o.ok for o in outcomes)
        (logger.info if sent == len(outcomes) else logger.warning)("%s: %d of %d written", self.name, sent, len(outcomes))
        return outcomes

    def _write_one(self, path: Path) -> SendOutcome:
        try:
            sop_instance = read_file_meta(path).sop_instance
        except Exception as exc:  # noqa: BLE001
            return SendOutcome(path, False, None, f"cannot read DICOM file: {exception_text(exc)}")
        if not is_valid_uid(str(sop_instance)):
            return SendOutcome(path, False, None, f"invalid SOP Instance UID {sop_instance!r}")
        target = self.folder / f"{sop_instance}.dcm"
        try:
            copy_file(path, target, self.mode)
        except OSError as exc:
            return SendOutcome(path, False, None, f"cannot write {target}: {exc.strerror or exc}")
        return SendOutcome(path, True, None, f"written to {target}")
