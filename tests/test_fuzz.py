"""Fuzzing the node's parsing path and its running SCP with mutated datasets (bounded by hypothesis).

Properties: the header parser (receive.read_uids) either files an object under four valid UIDs or
raises ValueError, never anything else; the SCP answers every C-STORE with Success or a failure
status in the A7xx/A9xx/Cxxx ranges, keeps what it accepted in the ledger and what it could not
understand in quarantine, and still answers the next association.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dicomnode.part10 import read_uids, scan_uids
from dicomnode.uids import is_valid_uid

from conftest import examples
from factories import ct_dataset, start_receiver
from reliability import encoded_body, raw_object, send_raw

# pydicom warns about every invalid UI/VR value a mutation creates: expected here, not news
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

UID = re.compile(r"[0-9]+(\.[0-9]+)*")
SEED = ct_dataset("fuzz", "s1", 0, rows=4, cols=4)
SEED_BODY = encoded_body(SEED)

# One mutation = (kind, position as a fraction of the length, payload). Positions are fractions so a
# shrunk example stays inside the (mutated, shorter or longer) buffer.
MUTATION = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0, 1), st.just(b"")),
    st.tuples(st.just("flip"), st.floats(0, 1), st.binary(min_size=1, max_size=1)),
    st.tuples(st.just("overwrite"), st.floats(0, 1), st.binary(min_size=1, max_size=8)),
    st.tuples(st.just("insert"), st.floats(0, 1), st.binary(min_size=1, max_size=16)),
    st.tuples(st.just("delete"), st.floats(0, 1), st.binary(min_size=1, max_size=32)),
    # lengths are where parsers go wrong: set a 16- or 32-bit value to an extreme
    st.tuples(st.just("length"), st.floats(0, 1), st.sampled_from(
        [b"\xff\xff", b"\xff\xff\xff\xff", b"\x00\x00", b"\xfe\xff\xff\x7f", b"\x01\x00\x00\x80"])),
)


def mutate(body: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    data = bytearray(body)
    for kind, where, payload in mutations:
        pos = min(int(where * len(data)), max(len(data) - 1, 0))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip" and data:
            data[pos] ^= payload[0] or 0x01
        elif kind in ("overwrite", "length"):
            data[pos:pos + len(payload)] = payload
        elif kind == "insert":
            data[pos:pos] = payload
        elif kind == "delete":
            del data[pos:pos + len(payload)]
    return bytes(data)


def _file(tmp: Path, body: bytes) -> Path:
    """A Part 10 file with valid meta and the given dataset bytes, as the SCP lands it."""
    obj = raw_object(SEED, body)
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_file_meta_info

    fp = DicomBytesIO()
    fp.is_little_endian, fp.is_implicit_VR = True, False
    write_file_meta_info(fp, SEED.file_meta, enforce_standard=True)
    path = tmp / "landed.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + fp.getvalue() + obj.body)
    return path


@settings(max_examples=examples(200), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_header_parser_never_crashes(tmp_path: Path, mutations: list) -> None:
    path = _file(tmp_path, mutate(SEED_BODY, mutations))
    try:
        uids = read_uids(path)
    except ValueError as exc:
        assert str(exc)  # a reason a human can read in quarantine/
        return
    patient = uids.pop("PatientID")
    assert isinstance(patient, str)
    assert set(uids) == {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"}
    assert all(UID.fullmatch(v) and len(v) <= 64 for v in uids.values())


def test_parser_rejects_the_obvious(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="lacks|cannot parse"):
        read_uids(_file(tmp_path, b""))
    with pytest.raises(ValueError):
        read_uids(_file(tmp_path, SEED_BODY[:7]))
    assert read_uids(_file(tmp_path, SEED_BODY))["SOPInstanceUID"] == SEED.SOPInstanceUID


@pytest.fixture(scope="module")
def running_scp(tmp_path_factory: pytest.TempPathFactory):
    """The node's real Receiver (in-process, loopback) on a fresh spool."""
    receiver, spool = start_receiver(tmp_path_factory.mktemp("fuzz-spool"), max_object_bytes=1 << 20)
    yield receiver, spool
    receiver.stop()
    spool.close()


def _acceptable(status: int | None) -> bool:
    return status is not None and (status == 0 or 0xA700 <= status <= 0xA7FF or 0xA900 <= status <= 0xA9FF
                                   or 0xC000 <= status <= 0xCFFF)


@settings(max_examples=examples(25), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(st.lists(MUTATION, min_size=1, max_size=3), min_size=1, max_size=3))
def test_running_scp_survives_mutated_datasets(running_scp, tmp_path_factory, batch: list) -> None:
    receiver, spool = running_scp
    before_q = len(list(spool.quarantine_dir.glob("*.reason.txt")))
    before_n = len(spool.ledger.all_instances())
    objects = [raw_object(SEED, mutate(SEED_BODY, m)) for m in batch]
    statuses = send_raw(receiver.port, objects, tmp_path_factory.mktemp("raw"))
    # the SCP answered each object with a status in the documented ranges (None: aborted mid-way)
    assert all(_acceptable(s) for s in statuses), [hex(s) if s is not None else s for s in statuses]
    quarantined = len(list(spool.quarantine_dir.glob("*.reason.txt"))) - before_q
    not_understood = sum(1 for s in statuses if s is not None and (0xA900 <= s <= 0xA9FF or s >= 0xC000))
    assert quarantined == not_understood  # bytes it could not understand are kept, with the reason
    rows = spool.ledger.all_instances()
    if 0 in statuses:  # accepted = filed under the command's SOP Instance UID, and on disk
        assert SEED.SOPInstanceUID in {r.sop_uid for r in rows}
        assert all(r.path.is_file() for r in rows)
    assert len(rows) >= before_n
    # and the node still serves: a clean object goes through on a new association
    clean = send_raw(receiver.port, [raw_object(SEED)], tmp_path_factory.mktemp("clean"))
    assert clean == [0]


def test_scp_quarantines_what_it_cannot_parse(running_scp, tmp_path: Path) -> None:
    receiver, spool = running_scp
    before = set(spool.quarantine_dir.glob("*.reason.txt"))
    body = SEED_BODY[:40] + b"\xff" * 8
    statuses = send_raw(receiver.port, [raw_object(SEED, body)], tmp_path)
    assert statuses[0] is not None and 0xC000 <= statuses[0] <= 0xCFFF
    new = set(spool.quarantine_dir.glob("*.reason.txt")) - before
    assert len(new) == 1
    reason_file = new.pop()
    reason = reason_file.read_text()
    assert "cannot parse" in reason or "lacks" in reason
    kept = reason_file.with_name(reason_file.name.replace(".reason.txt", ".dcm"))
    assert kept.read_bytes().endswith(body)  # the bytes as received, for a human to look at


def _pydicom_uids(path: Path) -> dict[str, str] | None:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True,
                             specific_tags=["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"])
        return {k: str(ds.get(k, "") or "").strip() for k in
                ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")}
    except Exception:  # noqa: BLE001
        return None


@settings(max_examples=examples(300), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=4))
def test_fast_uid_scan_agrees_with_pydicom(tmp_path: Path, mutations: list) -> None:
    """The SCP's byte-level UID scanner never raises and never files an object under UIDs pydicom
    would not read from the same bytes (it may only decline and leave the verdict to pydicom)."""
    path = _file(tmp_path, mutate(SEED_BODY, mutations))
    fast = scan_uids(path.read_bytes()[:64 * 1024])
    if fast is None:
        return
    assert set(fast) == {"SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "PatientID"}
    slow = _pydicom_uids(path)
    if slow is not None:
        assert {k: fast[k] for k in slow} == slow


@settings(max_examples=examples(200), deadline=None)
@given(head=st.binary(max_size=400))
def test_fast_uid_scan_on_arbitrary_bytes(head: bytes) -> None:
    """Random bytes never raise; whatever the scanner answers holds four well-formed UIDs."""
    prefix = b"\0" * 128 + b"DICM"
    found = scan_uids(prefix + head)
    if found is not None:
        uids = [found[k] for k in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")]
        assert all(is_valid_uid(u) for u in uids), found
    if head[128:132] != b"DICM":
        assert scan_uids(head) is None  # no Part 10 preamble: always left to pydicom


@pytest.fixture(scope="module")
def clahe_pipeline(tmp_path_factory):
    from dicomnode.config import parse_config
    from dicomnode.pipeline import Pipeline
    from dicomnode.resident import ResidentModels

    from factories import config_data

    root = tmp_path_factory.mktemp("pipe")
    config = parse_config(config_data(root / "var", 11112, {"out": {"folder": str(root / "out")}},
                                      rules=[{"name": "all", "model": "clahe", "destinations": ["out"]}],
                                      derive={"min_size": 1}), root)  # the 4 x 4 seed must reach the decoder
    return Pipeline(config, ResidentModels.load(config))


@settings(max_examples=examples(60), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutations=st.lists(MUTATION, min_size=1, max_size=3))
def test_enhancement_path_fails_mutated_instances_alone(tmp_path_factory, clahe_pipeline, mutations: list) -> None:
    """Whatever a mutated instance does to the decoder or to derive (whatever the exception), the pipeline
    accounts for every source (written or failed with a reason) and the good instance beside it is enhanced."""
    from dicomnode.domain import Instance, Series

    work = tmp_path_factory.mktemp("enh")
    bad = _file(work, mutate(SEED_BODY, mutations))
    good = work / "good.dcm"
    ct_dataset("fuzz", "s1", 1, rows=4, cols=4).save_as(good, enforce_file_format=True)
    series = Series("p", "1.2", "1.2.3", (Instance(bad, {"Modality": "CT"}), Instance(good, {"Modality": "CT"})))
    outcome = clahe_pipeline.run(series, work / "out", batch_size=2)
    failed = {Path(src) for src, _reason in outcome.failed}
    assert len(outcome.outputs) + len(failed) == 2
    assert good not in failed and all(reason for _src, reason in outcome.failed)
