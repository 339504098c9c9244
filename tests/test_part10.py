"""The fast UID scan gives the verdicts of its previous, plainer version (kept here as the reference) on
ordinary files, on unusual ones and on mutated bytes: it was rewritten for speed, not to decide otherwise."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_files

from dicomnode.part10 import scan_uids
from dicomnode.uids import is_valid_uid
from dicomnode.upper import file_meta

from conftest import examples
from factories import ct_dataset
from reliability import encoded_body

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

_TAGS = {0x00080016: "SOPClassUID", 0x00080018: "SOPInstanceUID", 0x0020000D: "StudyInstanceUID",
         0x0020000E: "SeriesInstanceUID"}
_LONG = {b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV"}
_SHORT = {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FD", b"FL", b"IS", b"LO", b"LT", b"PN", b"SH", b"SL",
          b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}


def reference(head: bytes) -> dict[str, str] | None:
    """scan_uids as it was before the rewrite (commit 3ca2b49), element by element."""
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    pos, end, syntax = 132, len(head), None
    found: dict[str, str] = {}
    while pos + 8 <= end:
        group, element = struct.unpack_from("<HH", head, pos)
        if group != 0x0002 and syntax is None:
            return None
        tag = (group << 16) | element
        if group != 0x0002 and syntax == "1.2.840.10008.1.2":
            (length,) = struct.unpack_from("<I", head, pos + 4)
            header = 8
        else:
            vr = head[pos + 4 : pos + 6]
            if vr in _LONG:
                if pos + 12 > end:
                    return None
                (length,) = struct.unpack_from("<I", head, pos + 8)
                header = 12
            elif vr in _SHORT:
                (length,) = struct.unpack_from("<H", head, pos + 6)
                header = 8
            else:
                return None
        if length == 0xFFFFFFFF or pos + header + length > end:
            return None
        value = head[pos + header : pos + header + length]
        if tag == 0x00020010:
            syntax = value.rstrip(b"\x00 ").decode("ascii", "replace")
            if syntax in ("1.2.840.10008.1.2.2", "1.2.840.10008.1.2.1.99"):
                return None
        elif tag in _TAGS:
            found[_TAGS[tag]] = value.rstrip(b"\x00 ").decode("ascii", "replace")
        elif tag == 0x00100020:
            found["PatientID"] = value.rstrip(b"\x00 ").decode("latin-1")
        elif tag > 0x0020000E:
            break
        pos += header + length
    if any(k not in found for k in _TAGS.values()) or not all(is_valid_uid(found[k]) for k in _TAGS.values()):
        return None
    found.setdefault("PatientID", "")
    return found


def explicit(group: int, element: int, vr: bytes, value: bytes) -> bytes:
    if vr in _LONG:
        return struct.pack("<HH2s2xI", group, element, vr, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr, len(value)) + value


def implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def part10(syntax: bytes, *elements: bytes, meta_after: bytes = b"") -> bytes:
    return b"\0" * 128 + b"DICM" + explicit(2, 0x10, b"UI", syntax) + meta_after + b"".join(elements)


EVLE = b"1.2.840.10008.1.2.1\0"
UIDS = [explicit(8, 0x16, b"UI", b"1.2.3\0"), explicit(8, 0x18, b"UI", b"1.2.3.4\0"),
        explicit(0x20, 0x0D, b"UI", b"1.2.5\0"), explicit(0x20, 0x0E, b"UI", b"1.2.6\0")]
UNUSUAL = {
    "plain": part10(EVLE, *UIDS),
    "patient latin-1": part10(EVLE, UIDS[0], UIDS[1], explicit(0x10, 0x20, b"LO", b"M\xfcller "), *UIDS[2:]),
    "implicit VR": part10(b"1.2.840.10008.1.2\0", *(implicit(0x8, 0x16, b"1.2.3\0"), implicit(0x8, 0x18, b"1.2.4\0"),
                                                       implicit(0x20, 0xD, b"1.2.5\0"), implicit(0x20, 0xE, b"1.2.6\0"))),
    "big endian": part10(b"1.2.840.10008.1.2.2\0", *UIDS),
    "deflated": part10(b"1.2.840.10008.1.2.1.99", *UIDS),
    "no transfer syntax": b"\0" * 128 + b"DICM" + b"".join(UIDS),
    "undefined length before the UIDs": part10(EVLE, struct.pack("<HH2s2xI", 8, 0x1115, b"SQ", 0xFFFFFFFF), *UIDS),
    "undefined length after the UIDs": part10(EVLE, *UIDS, struct.pack("<HH2s2xI", 0x28, 0x10, b"SQ", 0xFFFFFFFF)),
    "overrun after the UIDs": part10(EVLE, *UIDS, struct.pack("<HH2sH", 0x28, 0x10, b"US", 400)),
    "unknown VR": part10(EVLE, UIDS[0], explicit(8, 0x20, b"ZZ", b"20200101"), *UIDS[1:]),
    "unknown VR after the UIDs": part10(EVLE, *UIDS, explicit(0x28, 0x10, b"ZZ", b"\0\1")),
    "long VR at the end": part10(EVLE, *UIDS)[:-2] + b"OB",
    "a UID missing": part10(EVLE, *UIDS[:3]),
    "a bad UID": part10(EVLE, UIDS[0], explicit(8, 0x18, b"UI", b"1.2.x3\0"), *UIDS[2:]),
    "a UID twice, the last wins": part10(EVLE, *UIDS, explicit(0x20, 0xE, b"UI", b"9.9\0")),
    "syntax twice": part10(EVLE, explicit(2, 0x10, b"UI", b"1.2.840.10008.1.2\0"), *UIDS),
    "file meta after the data": part10(EVLE, UIDS[0], explicit(2, 0x10, b"UI", b"1.2.840.10008.1.2.2\0"), *UIDS[1:]),
    "odd element order": part10(EVLE, UIDS[3], UIDS[0], UIDS[1], UIDS[2]),
    "short head": part10(EVLE, *UIDS)[:140],
    "no preamble": b"DICM" + b"".join(UIDS),
}


@pytest.mark.parametrize("name", sorted(UNUSUAL))
def test_unusual_inputs_get_the_reference_verdict(name: str) -> None:
    assert scan_uids(UNUSUAL[name]) == reference(UNUSUAL[name])


def test_some_unusual_inputs_are_answered_and_some_left_to_pydicom() -> None:
    """The table above exercises both outcomes (a test that compared only Nones would prove little)."""
    answered = {name for name, head in UNUSUAL.items() if scan_uids(head) is not None}
    assert answered == {"plain", "patient latin-1", "implicit VR", "odd element order", "a UID twice, the last wins"}
    assert scan_uids(UNUSUAL["patient latin-1"])["PatientID"] == "M\xfcller"
    assert scan_uids(UNUSUAL["a UID twice, the last wins"])["SeriesInstanceUID"] == "9.9"


def test_pydicom_test_files_and_their_cuts_get_the_reference_verdict() -> None:
    compared = 0
    for name in get_testdata_files("*"):
        path = Path(name)
        if not path.is_file():
            continue
        head = path.read_bytes()[:65536]
        for cut in (len(head), 131, 132, 140, 300, 1000, len(head) // 2):
            assert scan_uids(head[:cut]) == reference(head[:cut]), (path.name, cut)
            compared += 1
    assert compared > 100


_SEED_DS = ct_dataset("part10", "s1", 0, rows=4, cols=4)
SEED = (file_meta(_SEED_DS.SOPClassUID, _SEED_DS.SOPInstanceUID, _SEED_DS.file_meta.TransferSyntaxUID)
        + encoded_body(_SEED_DS))[:4000]


@settings(max_examples=examples(300), deadline=None)
@given(edits=st.lists(st.tuples(st.integers(128, len(SEED) - 1), st.binary(max_size=6), st.integers(0, 6)),
                      min_size=1, max_size=3))
def test_mutated_bytes_get_the_reference_verdict(edits: list[tuple[int, bytes, int]]) -> None:
    assert scan_uids(SEED) is not None  # the unmutated seed is answered
    head = bytearray(SEED)
    for at, payload, cut in edits:
        head[at:at + cut] = payload
    assert scan_uids(bytes(head)) == reference(bytes(head))
