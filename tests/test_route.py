"""Routing: first-match rules over every instance of a series."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.config import NodeConfig, parse_config
from dicomnode.headers import read_tags as routing_tags
from dicomnode.route import CALLING_AET, RouteDecision, decide, routing_keywords


def make_config(rules: list[dict[str, Any]], unmatched: dict[str, Any] | None = None) -> NodeConfig:
    data: dict[str, Any] = {
        "destinations": {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 104}, "archive": {"folder": "out"}},
        "models": {"enhance": {"kind": "clahe"}, "other": {"kind": "histeq"}},
        "rules": rules,
    }
    if unmatched is not None:
        data["unmatched"] = unmatched
    return parse_config(data, Path("/srv/node"))


def rule(name: str, match: dict[str, Any], model: str | None = "enhance", destinations: list[str] | None = None) -> dict:
    return {"name": name, "match": match, "model": model,
            "destinations": ["pacs"] if destinations is None and model else (destinations or [])}


def test_exact_string_match() -> None:
    config = make_config([rule("op", {"Modality": "OP"})])
    assert decide(config, [{"Modality": "OP"}], "X") == RouteDecision("enhance", "op", "enhance", ("pacs",), (0,))
    assert decide(config, [{"Modality": "op"}], "X").action == "ignore"  # case-sensitive
    assert decide(config, [{"Modality": "OPT"}], "X").action == "ignore"


def test_list_means_any_of() -> None:
    config = make_config([rule("endo", {"Modality": ["ES", "XC"]})])
    assert decide(config, [{"Modality": "XC"}], "X").rule == "endo"
    assert decide(config, [{"Modality": "ES"}], "X").rule == "endo"
    assert decide(config, [{"Modality": "CT"}], "X").rule is None


def test_regex_must_match_the_whole_value() -> None:
    config = make_config([rule("colon", {"SeriesDescription": {"regex": "(?i)colon.*"}})])
    assert decide(config, [{"SeriesDescription": "Colonoscopy left"}], "X").rule == "colon"
    assert decide(config, [{"SeriesDescription": "Pre-colonoscopy"}], "X").rule is None  # fullmatch, not search


def test_multi_valued_tag_matches_any_value_or_the_joined_value() -> None:
    config = make_config([rule("loc", {"ImageType": "LOCALIZER"}),
                          rule("orig", {"ImageType": "ORIGINAL\\PRIMARY\\AXIAL"})])
    assert decide(config, [{"ImageType": ["ORIGINAL", "PRIMARY", "LOCALIZER"]}], "X").rule == "loc"
    assert decide(config, [{"ImageType": "ORIGINAL\\PRIMARY\\LOCALIZER"}], "X").rule == "loc"  # joined string
    assert decide(config, [{"ImageType": ["ORIGINAL", "PRIMARY", "AXIAL"]}], "X").rule == "orig"
    regex = make_config([rule("derived", {"ImageType": {"regex": "DERIV.*"}})])
    assert decide(regex, [{"ImageType": ["DERIVED", "SECONDARY"]}], "X").rule == "derived"


def test_calling_aet_from_the_association_or_the_instance() -> None:
    config = make_config([rule("cam", {CALLING_AET: "FUNDUSCAM", "Modality": "OP"})])
    assert decide(config, [{"Modality": "OP"}], "FUNDUSCAM").rule == "cam"
    assert decide(config, [{"Modality": "OP"}], "OTHER").rule is None
    mixed = [{"Modality": "OP", CALLING_AET: "OTHER"}, {"Modality": "OP"}]
    assert decide(config, mixed, "FUNDUSCAM").matched == (1,)


def test_first_matching_rule_wins_in_order() -> None:
    rules = [rule("specific", {"Modality": "OP", "BodyPartExamined": "EYE"}, model="other"),
             rule("general", {"Modality": "OP"}),
             rule("catch-all", {}, model=None, destinations=["archive"])]
    config = make_config(rules)
    assert decide(config, [{"Modality": "OP", "BodyPartExamined": "EYE"}], "X").rule == "specific"
    assert decide(config, [{"Modality": "OP"}], "X").rule == "general"
    fallback = decide(config, [{"Modality": "MR"}], "X")
    assert (fallback.action, fallback.rule, fallback.model, fallback.destinations) == ("forward", "catch-all", None,
                                                                                      ("archive",))
    # Reordering the same rules changes the decision: order is the contract.
    reordered = make_config([rules[1], rules[0], rules[2]])
    assert decide(reordered, [{"Modality": "OP", "BodyPartExamined": "EYE"}], "X").rule == "general"


def test_rule_matching_some_instances_wins_and_only_those_are_processed() -> None:
    config = make_config([rule("fundus", {"Modality": "OP", "ImageType": "PRIMARY"}),
                          rule("any-op", {"Modality": "OP"}, model="other")])
    series = [{"Modality": "OP", "ImageType": ["ORIGINAL", "PRIMARY"]},
              {"Modality": "OP", "ImageType": ["DERIVED", "SECONDARY"]},
              {"Modality": "OP", "ImageType": ["ORIGINAL", "PRIMARY"]}]
    decision = decide(config, series, "X")
    assert decision.rule == "fundus" and decision.matched == (0, 2)
    # The decision is over all instances, not the first file: a series whose first file does not
    # match still goes to the first rule that matches any of its instances.
    decision = decide(config, list(reversed(series[:2])), "X")
    assert decision.rule == "fundus" and decision.matched == (1,)


def test_absent_tag_counts_as_empty() -> None:
    config = make_config([rule("no-body-part", {"BodyPartExamined": ""}),
                          rule("has", {"BodyPartExamined": {"regex": ".+"}}, model="other")])
    assert decide(config, [{"Modality": "OP"}], "X").rule == "no-body-part"
    assert decide(config, [{"BodyPartExamined": ""}], "X").rule == "no-body-part"
    assert decide(config, [{"BodyPartExamined": "EYE"}], "X").rule == "has"


def test_numbers_compare_as_text() -> None:
    config = make_config([rule("s3", {"SeriesNumber": 3})])
    assert decide(config, [{"SeriesNumber": "3"}], "X").rule == "s3"
    assert decide(config, [{"SeriesNumber": 3}], "X").rule == "s3"


def test_unmatched_ignore_and_forward() -> None:
    ignore = make_config([rule("op", {"Modality": "OP"})])
    assert decide(ignore, [{"Modality": "CT"}] * 2, "X") == RouteDecision("ignore", None, None, (), ())
    forward = make_config([rule("op", {"Modality": "OP"})], {"action": "forward", "destinations": ["archive", "pacs"]})
    assert decide(forward, [{"Modality": "CT"}] * 3, "X") == RouteDecision("forward", None, None,
                                                                          ("archive", "pacs"), (0, 1, 2))


def test_rule_without_model_forwards_or_drops() -> None:
    config = make_config([rule("fwd", {"Modality": "CT"}, model=None, destinations=["pacs"]),
                          rule("drop", {"Modality": "SR"}, model=None)])
    assert decide(config, [{"Modality": "CT"}], "X") == RouteDecision("forward", "fwd", None, ("pacs",), (0,))
    assert decide(config, [{"Modality": "SR"}], "X") == RouteDecision("ignore", "drop", None, (), (0,))


def test_empty_series_goes_to_unmatched_policy() -> None:
    config = make_config([rule("all", {})])
    assert decide(config, [], "X") == RouteDecision("ignore", None, None, (), ())


def test_routing_keywords_are_the_match_keys() -> None:
    config = make_config([rule("a", {"Modality": "OP", CALLING_AET: "X"}), rule("b", {"ImageType": "PRIMARY"})])
    assert routing_keywords(config) == {"Modality", CALLING_AET, "ImageType"}


def _write(path: Path, **tags: Any) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.SeriesInstanceUID = generate_uid()
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 32
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((32, 32), np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def test_routing_tags_reads_header_only_and_returns_plain_values(tmp_path: Path) -> None:
    path = _write(tmp_path / "a.dcm", Modality="OP", ImageType=["ORIGINAL", "PRIMARY"], SeriesNumber=7,
                  PatientName="Doe^Jane")
    # Cut the file inside the pixel data: a header-only read must not notice.
    data = path.read_bytes()
    path.write_bytes(data[:-500])
    tags = routing_tags(path, ["Modality", "ImageType", "SeriesNumber", "BodyPartExamined", CALLING_AET])
    assert tags["Modality"] == "OP"
    assert tags["ImageType"] == ["ORIGINAL", "PRIMARY"]
    assert tags["SeriesNumber"] == "7"
    assert "BodyPartExamined" not in tags and CALLING_AET not in tags
    assert "SeriesInstanceUID" in tags and "SOPInstanceUID" in tags
    assert "PatientName" not in tags  # only what routing needs
    assert json.loads(json.dumps(tags)) == tags  # storable in the ledger as JSON
    config = make_config([rule("orig", {"ImageType": "PRIMARY", "SeriesNumber": 7})])
    assert decide(config, [tags], "X").rule == "orig"


def test_routing_tags_on_a_non_dicom_file_raises(tmp_path: Path) -> None:
    bad = tmp_path / "x.dcm"
    bad.write_text("not dicom")
    with pytest.raises(InvalidDicomError):
        routing_tags(bad, ["Modality"])


MODALITIES = ["OP", "ES", "XC", "CT"]
IMAGE_TYPES = [["ORIGINAL", "PRIMARY"], ["DERIVED", "SECONDARY"], ["ORIGINAL", "PRIMARY", "LOCALIZER"]]


def test_decision_is_first_rule_with_any_match_and_exactly_its_matches() -> None:
    """Property: over random series, the decision equals the rules written out by hand."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from dicomnode.route import rule_matches

    config = make_config([rule("op-primary", {"Modality": "OP", "ImageType": "PRIMARY"}),
                          rule("endo", {"Modality": ["ES", "XC"]}, model="other"),
                          rule("loc", {"ImageType": {"regex": "LOCALI[SZ]ER"}}, model=None),
                          rule("cam", {CALLING_AET: "CAM"}, model=None, destinations=["archive"])],
                         {"action": "forward", "destinations": ["archive"]})
    instance = st.fixed_dictionaries({"Modality": st.sampled_from(MODALITIES),
                                      "ImageType": st.sampled_from(IMAGE_TYPES)})

    # The same rules written directly in Python, independent of the matcher.
    expected_rules = [
        ("op-primary", "enhance", lambda inst, aet: inst["Modality"] == "OP" and "PRIMARY" in inst["ImageType"]),
        ("endo", "enhance", lambda inst, aet: inst["Modality"] in ("ES", "XC")),
        ("loc", "ignore", lambda inst, aet: "LOCALIZER" in inst["ImageType"]),
        ("cam", "forward", lambda inst, aet: aet == "CAM"),
    ]

    @settings(max_examples=150, deadline=None)
    @given(st.lists(instance, max_size=6), st.sampled_from(["CAM", "OTHER"]))
    def check(series: list[dict[str, Any]], aet: str) -> None:
        decision = decide(config, series, aet)
        for name, action, predicate in expected_rules:
            hits = tuple(i for i, inst in enumerate(series) if predicate(inst, aet))
            if hits:
                assert (decision.rule, decision.action, decision.matched) == (name, action, hits)
                assert all(rule_matches(config.rules[[r.name for r in config.rules].index(name)], series[i], aet)
                           for i in hits)
                return
        assert decision == RouteDecision("forward", None, None, ("archive",), tuple(range(len(series))))

    check()
