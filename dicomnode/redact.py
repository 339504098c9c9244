"""Text from outside the node, reduced to what may be logged or stored.

A PACS may explain a refusal in its own words (a C-STORE ErrorComment such as "PatientID 123 name
DOE^JANE conflicts"), and an exception raised while reading or encoding an object may quote a value
of it. Such text would reach the log, the ledger's ``last_error`` and ``dicomnode status``. What the
node keeps of it is what names no patient: UIDs, status codes and the node's own fixed messages.

:func:`escape_controls` is the other half: a value logged with a newline or an escape sequence in it
(a SOP Instance UID from a faulty sender) must not be able to forge log lines or drive a terminal.
"""

from __future__ import annotations

import re
import ssl

__all__ = ["escape_controls", "exception_text", "peer_comment", "uids_in"]

# A UID as found inside free text: at least two numeric components (PS3.5 9.1), so bare numbers,
# dates and IDs such as "784512" are not mistaken for one.
_UID_IN_TEXT = re.compile(r"(?<![0-9.])[0-9]+(?:\.[0-9]+)+(?![0-9.])")
_MAX_UIDS = 8

# C0 controls but tab, DEL, C1 controls and the Unicode line/paragraph separators: each starts a new
# line or drives a terminal somewhere a log is read.
_CONTROLS = {c: f"\\x{c:02x}" for c in [*range(0x00, 0x09), *range(0x0A, 0x20), 0x7F, *range(0x80, 0xA0)]}
_CONTROLS.update({0x0A: "\\n", 0x0D: "\\r", 0x1B: "\\x1b", 0x2028: "\\u2028", 0x2029: "\\u2029"})


def uids_in(text: str) -> list[str]:
    """The UIDs found in ``text``, in order, without repeats (at most 8, each at most 64 characters)."""
    found: dict[str, None] = {}
    for match in _UID_IN_TEXT.finditer(text or ""):
        if len(match.group()) <= 64:
            found.setdefault(match.group(), None)
    return list(found)[:_MAX_UIDS]


def peer_comment(text: str | None) -> str:
    """A peer's free-text comment reduced to the UIDs it names: "" when empty, else a fixed phrase."""
    if not text or not str(text).strip():
        return ""
    uids = uids_in(str(text))
    return "comment withheld" + (f", UIDs in it: {', '.join(uids)}" if uids else "")


def exception_text(exc: BaseException) -> str:
    """An exception as its class and what of its message names no patient.

    OS and TLS errors keep their fixed system text (errno and OpenSSL reason strings); any other
    message may quote a value of the object being handled, so only the UIDs in it are kept.
    """
    name = exc.__class__.__name__
    if isinstance(exc, ssl.SSLError):
        parts = [str(p) for p in (getattr(exc, "reason", None), getattr(exc, "verify_message", None)) if p]
        return f"{name}: {', '.join(parts)}" if parts else name
    if isinstance(exc, OSError) and exc.strerror:
        return f"{name}: {exc.strerror}"
    uids = uids_in(str(exc))
    return name + (f" (message withheld, UIDs in it: {', '.join(uids)})" if uids else " (message withheld)")


def escape_controls(text: str) -> str:
    """``text`` with newlines, carriage returns, escapes and other control characters written as escapes."""
    return text.translate(_CONTROLS)
