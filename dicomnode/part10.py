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
_TRANSFER_SYNTAX = 0x00020010
_WANTED = frozenset({*_SCAN_TAGS, _PATIENT_ID, _TRANSFER_SYNTAX})
_EXPLICIT_HEADER = struct.Struct("<HH2sH")  # group, element, VR, 16-bit length
_U32 = struct.Struct("<I")
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

    It runs for every received instance (about 130 elements each), so each element costs one
    ``unpack_from`` and a few comparisons; only the six elements it wants are sliced.
    """
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos, end, syntax, implicit = 132, len(head), None, False
    found: dict[str, str] = {}
    explicit_header, u32 = _EXPLICIT_HEADER.unpack_from, _U32.unpack_from
    short_vrs, long_vrs, wanted = _SHORT_VRS, _LONG_VRS, _WANTED
    while pos + 8 <= end:
        group, element, vr, length = explicit_header(head, pos)
        if group != 0x0002 and implicit:  # file meta is always explicit VR
            (length,) = u32(head, pos + 4)
            header = 8
        else:
            if group != 0x0002 and syntax is None:
                return None  # file meta without a transfer syntax
            if vr in short_vrs:
                header = 8
            elif vr in long_vrs:
                if pos + 12 > end:
                    return None
                (length,) = u32(head, pos + 8)
                header = 12
            else:  # not a VR: pydicom guesses how to go on, so its verdict must decide (found by fuzzing)
                return None
        following = pos + header + length
        if length == 0xFFFFFFFF or following > end:
            return None
        tag = (group << 16) | element
        if tag in wanted:
            value = head[pos + header : following]
            if tag == _TRANSFER_SYNTAX:
                syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
                if syntax in (_BIG_ENDIAN, _DEFLATED):
                    return None
                implicit = syntax == _IMPLICIT_LE
            elif tag == _PATIENT_ID:
                found[PATIENT_ID] = value.rstrip(b"\x00 ").decode("latin-1")
            else:
                found[_SCAN_TAGS[tag]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        elif tag > 0x0020000E:
            break
        pos = following
    if len(found) < 4 or any(k not in found for k in _SCAN_TAGS.values()):
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
