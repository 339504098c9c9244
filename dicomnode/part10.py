"""Reading the identity of a received object from its Part 10 bytes, without decoding the dataset.

The receive path needs four UIDs (SOP class and instance, study, series) and the PatientID (to keep
one patient per series) for every object, at the rate objects arrive. :func:`scan_uids` walks the
first 64 KiB element by element and answers for ordinary files; anything unusual goes to pydicom,
whose verdict counts (:func:`read_uids`), so the fast path can never refuse what pydicom accepts.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

from pydicom import dcmread

from dicomnode.uids import is_valid_uid

__all__ = ["PATIENT_ID", "SCAN_BYTES", "read_uids", "scan_uids"]

PATIENT_ID = "PatientID"
_UID_TAGS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
_SCAN_TAGS = {
    0x00080016: "SOPClassUID",
    0x00080018: "SOPInstanceUID",
    0x0020000D: "StudyInstanceUID",
    0x0020000E: "SeriesInstanceUID",
}
_PATIENT_ID = 0x00100020
_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"})
_SHORT_VRS = frozenset({b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN",
                        b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"})
SCAN_BYTES = 64 * 1024  # how much of a file the fast path looks at
_IMPLICIT_LE = "1.2.840.10008.1.2"
_BIG_ENDIAN = "1.2.840.10008.1.2.2"
_DEFLATED = "1.2.840.10008.1.2.1.99"


def scan_uids(head: bytes) -> dict[str, str] | None:
    """Fast path: the four UIDs (and the raw PatientID) straight from the first bytes of a Part 10 file, or None.

    Walks the elements by their lengths (no decoding) up to (0020,000E). Returns None, leaving the
    decision to pydicom, whenever anything is unusual: no preamble, big endian or deflated data,
    an undefined length before the UIDs, an element running past ``head``, a UID missing or not
    well-formed. It never judges a file bad by itself, so it cannot refuse what pydicom accepts.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos, end, syntax = 132, len(head), None
    found: dict[str, str] = {}
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002 and syntax is None:
            return None  # file meta without a transfer syntax
        tag = (group << 16) | element
        if group != 0x0002 and syntax == _IMPLICIT_LE:  # file meta is always explicit VR
            (length,) = struct.unpack_from("<I", head, pos + 4)
            header = 8
        else:
            vr = head[pos + 4 : pos + 6]
            if vr in _LONG_VRS:
                if pos + 12 > end:
                    return None
                (length,) = struct.unpack_from("<I", head, pos + 8)
                header = 12
            elif vr in _SHORT_VRS:
                (length,) = struct.unpack_from("<H", head, pos + 6)
                header = 8
            else:  # not a VR: pydicom guesses how to go on, so its verdict must decide (found by fuzzing)
                return None
        if length == 0xFFFFFFFF or pos + header + length > end:
            return None
        value = head[pos + header : pos + header + length]
        if tag == 0x00020010:
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
            if syntax in (_BIG_ENDIAN, _DEFLATED):
                return None
        elif tag in _SCAN_TAGS:
            found[_SCAN_TAGS[tag]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        elif tag == _PATIENT_ID:
            found[PATIENT_ID] = value.rstrip(b"\x00 ").decode("latin-1")
        elif tag > 0x0020000E:
            break
        pos += header + length
    if any(k not in found for k in _SCAN_TAGS.values()):
        return None
    if not all(is_valid_uid(found[k]) for k in _SCAN_TAGS.values()):
        return None
    found.setdefault(PATIENT_ID, "")
    return found


def read_uids(path: Path | io.BufferedIOBase, head: bytes | bytearray | None = None) -> dict[str, str]:
    """The four UIDs that file a received object, plus ``PatientID`` (raw text, "" when absent).

    ValueError naming what is missing or unreadable.

    :func:`scan_uids` answers for well-formed files from one 64 KiB read; everything else goes
    through pydicom, whose verdict (and error message) is the one that counts. ``head``: the file's
    first :data:`SCAN_BYTES` bytes (all of it when shorter), when the caller wrote them and still has
    them (the native receive engine): the fast path then reads nothing.
    """
    if isinstance(path, (str, Path)):
        if head is None:
            with open(path, "rb") as fh:
                head = fh.read(SCAN_BYTES)
        fast = scan_uids(bytes(head[:SCAN_BYTES]))
        if fast is not None:
            return fast
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=[*_UID_TAGS, PATIENT_ID])
        uids = {tag: str(ds.get(tag, "") or "").strip() for tag in _UID_TAGS}
        raw = ds.get_item(PATIENT_ID)
        value = raw.value if raw is not None else b""
        patient = value.rstrip(b"\x00 ").decode("latin-1") if isinstance(value, bytes) else str(value or "").rstrip()
    except Exception as exc:  # untrusted bytes: any parser failure means "cannot understand"
        raise ValueError(f"cannot parse the dataset: {exc.__class__.__name__}: {exc}") from exc
    missing = [tag for tag, value in uids.items() if not value]
    if missing:
        raise ValueError(f"dataset lacks {', '.join(missing)}")
    bad = [tag for tag, value in uids.items() if not is_valid_uid(value)]
    if bad:
        raise ValueError(f"invalid UID in {', '.join(bad)}")
    return {**uids, PATIENT_ID: patient}
