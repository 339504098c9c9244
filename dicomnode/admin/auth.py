"""Who may do what on the admin port, and the audit log of what they did.

Tokens come from ``admin.token_file``: one per line, ``NAME:TOKEN`` or a bare ``TOKEN`` (named by the first
8 hex digits of its sha256), blank lines and ``#`` comments ignored; the file is re-read when it changes,
so a token is revoked by editing the file. Every change needs ``Authorization: Bearer TOKEN``; read-only
views are open to loopback clients and need the token from any other address.

The audit log (``storage.root/admin-audit.jsonl``, owner-only) gets one JSON line per change tried: when,
who (token name, or "anonymous"), the peer address, the action, its target (job ids, destination names),
the HTTP status and a short result. It never holds patient data: the API deals in ids and UIDs only.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import logging
import os
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from dicomnode.durable import FILE_MODE

log = logging.getLogger(__name__)

__all__ = ["AUDIT_FILE", "Audit", "Tokens", "is_loopback"]

AUDIT_FILE = "admin-audit.jsonl"


def is_loopback(host: str | None) -> bool:
    """True for 127.0.0.0/8 and ::1 (an IPv4-mapped loopback too); False for anything else, names included."""
    if not host:
        return False
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    mapped = getattr(address, "ipv4_mapped", None)
    return bool(address.is_loopback or (mapped is not None and mapped.is_loopback))


class Tokens:
    """The bearer tokens of ``admin.token_file`` (None: no token, so nothing can be changed)."""

    def __init__(self, path: Path | None) -> None:
        self.path = Path(path) if path is not None else None
        self._stamp: tuple[float, int] | None = None
        self._tokens: dict[str, str] = {}  # token -> name
        self._lock = threading.Lock()

    @property
    def configured(self) -> bool:
        return self.path is not None

    def _load(self) -> dict[str, str]:
        if self.path is None:
            return {}
        try:
            st = self.path.stat()
        except OSError:
            log.error("admin.token_file %s cannot be read: every change is refused", self.path)
            return {}
        with self._lock:
            if self._stamp != (st.st_mtime, st.st_size):
                tokens: dict[str, str] = {}
                for line in self.path.read_text(encoding="utf-8").splitlines():
                    line = line.strip()
                    if not line or line.startswith("#"):
                        continue
                    name, sep, token = line.partition(":")
                    if not sep:
                        name, token = hashlib.sha256(line.encode()).hexdigest()[:8], line
                    if len(token.strip()) < 16:
                        log.warning("admin token %r is shorter than 16 characters: ignored", name.strip())
                        continue
                    tokens[token.strip()] = name.strip()
                self._tokens, self._stamp = tokens, (st.st_mtime, st.st_size)
            return self._tokens

    def who(self, authorization: str | None) -> str | None:
        """The token's name for an ``Authorization: Bearer TOKEN`` header, or None."""
        if not authorization:
            return None
        scheme, _, presented = authorization.partition(" ")
        if scheme.lower() != "bearer" or not presented.strip():
            return None
        presented = presented.strip()
        found = None
        for token, name in self._load().items():  # compare with every token: no early exit to time
            if hmac.compare_digest(token.encode(), presented.encode()):
                found = name
        return found


class Audit:
    """Append-only JSON lines of admin actions; the last few kept in memory for the web page."""

    def __init__(self, path: Path | None, keep: int = 200) -> None:
        self.path = Path(path) if path is not None else None
        self._recent: deque[dict[str, Any]] = deque(maxlen=keep)
        self._lock = threading.Lock()
        if self.path is not None and self.path.is_file():
            try:
                for line in self.path.read_text(encoding="utf-8").splitlines()[-keep:]:
                    self._recent.append(json.loads(line))
            except (OSError, ValueError) as exc:
                log.warning("audit log %s: earlier entries not shown: %s", self.path, exc)

    def record(self, *, who: str | None, peer: str | None, action: str, target: Any = None, status: int,
               result: str = "") -> dict[str, Any]:
        entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "who": who or "anonymous", "peer": peer or "?",
                 "action": action, "target": target, "status": status, "result": result[:500]}
        line = json.dumps(entry, sort_keys=True)
        with self._lock:
            self._recent.append(entry)
            if self.path is not None:
                try:
                    fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, FILE_MODE)
                    with os.fdopen(fd, "a", encoding="utf-8") as fh:
                        fh.write(line + "\n")
                except OSError as exc:
                    log.error("cannot write the audit log %s: %s", self.path, exc)
        log.info("admin audit: %s", line)
        return entry

    def recent(self, limit: int = 50) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._recent)[-limit:][::-1]
