"""Durable writes: a file is either absent or complete, and stays so across a crash or a power cut.

Every stage that hands a file to the next (receive -> spool, enhance -> outgoing, dispatch -> a
folder destination, guidance caches) writes through here: a temporary name in the same folder,
fsync of the data, an atomic rename, then fsync of the folder so the rename itself is on disk.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

FILE_MODE = 0o600
DIR_MODE = 0o700

__all__ = ["DIR_MODE", "FILE_MODE", "copy_file", "fsync_dir", "fsync_file", "make_dir", "move", "move_new", "start_writeback", "write_bytes", "write_with"]


def make_dir(path: Path, mode: int = DIR_MODE) -> Path:
    path.mkdir(mode=mode, parents=True, exist_ok=True)
    return path


def fsync_dir(folder: Path) -> None:
    """Make renames and new entries in ``folder`` durable (POSIX: the entry lives in the directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on directories; nothing more can be done there
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_with(path: Path, writer: Callable[[BinaryIO], None], mode: int = FILE_MODE) -> Path:
    """Write ``path`` by calling ``writer(fh)`` on a temporary file, then fsync, rename and fsync the folder."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            writer(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: Path, data: bytes | memoryview, mode: int = FILE_MODE) -> Path:
    return write_with(path, lambda fh: fh.write(data), mode)


def copy_file(src: Path, dst: Path, mode: int = FILE_MODE) -> Path:
    """Copy ``src`` to ``dst`` durably (streamed, never read whole)."""
    def writer(fh: BinaryIO) -> None:
        with open(src, "rb") as source:
            shutil.copyfileobj(source, fh, 1 << 20)

    return write_with(dst, writer, mode)


def move(src: Path, dst: Path, mode: int | None = FILE_MODE, *, sync_source: bool = True) -> Path:
    """Rename ``src`` to ``dst`` (same file system) and make both folders' entries durable.

    ``sync_source=False`` skips the fsync of the source folder: for a temp folder that start-up empties
    (incoming/), a name that survives a crash there is only a second link to a file already durable at
    ``dst``, and removing it loses nothing. One fsync fewer per received instance.
    """
    os.replace(src, dst)
    if mode is not None:
        os.chmod(dst, mode)
    fsync_dir(Path(dst).parent)
    if sync_source and Path(src).parent != Path(dst).parent:
        fsync_dir(Path(src).parent)
    return Path(dst)


def move_new(src: Path, dst: Path, *, sync_file: bool = False) -> Path:
    """Like :func:`move` from a temp folder (``sync_source=False``, no chmod), but never replaces ``dst``:
    FileExistsError when it exists (a hard link, then the source name removed; same file system).

    ``sync_file``: fsync the file once it is at ``dst`` (before the folder's fsync): where the file was not
    synced yet, one sync covers data and entry (ext4 syncs a new entry's folder with the file), and
    nothing else can refer to ``dst`` before this returns. On a failing sync ``dst`` is removed again."""
    os.link(src, dst)
    os.unlink(src)
    try:
        if sync_file:
            fsync_file(Path(dst))
        fsync_dir(Path(dst).parent)
    except OSError:
        Path(dst).unlink(missing_ok=True)
        raise
    return Path(dst)


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """libc's sync_file_range (Linux), or None where it is missing."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        func = libc.sync_file_range
    except (OSError, AttributeError):
        return None
    func.argtypes = (ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
    func.restype = ctypes.c_int
    return func


_SYNC_FILE_RANGE = _sync_file_range()
_SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, count: int) -> bool:
    """Start writing ``count`` bytes from ``offset`` to the disk without waiting (Linux ``sync_file_range``
    with ``SYNC_FILE_RANGE_WRITE``): a file still arriving goes to disk while the rest comes in, so the
    fsync at its end waits for little more than its tail and metadata. Durability still comes from that
    fsync; where the call is missing or refused, nothing happens (False)."""
    return _SYNC_FILE_RANGE is not None and _SYNC_FILE_RANGE(fd, offset, count, _SYNC_FILE_RANGE_WRITE) == 0
