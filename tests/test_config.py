"""Config validation: the example parses, and every wrong key gets a message naming it."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.config import (
    ConfigError,
    DicomSettings,
    FolderSettings,
    NodeConfig,
    RegexMatch,
    load_config,
    parse_config,
)

# A full config using every section (the example in docs/configuration.md is checked separately by
# test_example_in_docs_matches).
EXAMPLE_YAML = """\
node:
  ae_title: DICOMNODE
  port: 11112
  series_quiet_seconds: 10
  allowed_calling_aets: [FUNDUSCAM, ENDO1, PACS]
  max_object_bytes: 2GiB

storage:
  root: ../var
  disk_high_watermark_percent: 90
  disk_low_watermark_percent: 85

destinations:
  pacs:
    ae_title: PACS
    host: 192.168.1.20
    port: 104
  archive:
    folder: ../var/outbox

models:
  hqg-fundus:
    kind: hqgnet
    weights: ../models/weights/hqgnet_fundus.pt
    device: auto
    batch_size: 4
    guidance:
      OP: ../guidance/fundus_hq
  clahe:
    kind: clahe
    options: {clip_limit: 2.0}

rules:
  - name: fundus
    match:
      Modality: OP
      CallingAETitle: FUNDUSCAM
    model: hqg-fundus
    destinations: [pacs, archive]
  - name: endoscopy
    match:
      Modality: [ES, XC]
      SeriesDescription: {regex: "(?i).*(colon|gastro).*"}
    model: clahe
    destinations: [pacs]
  - name: drop-localizers
    match:
      ImageType: LOCALIZER

unmatched:
  action: forward
  destinations: [archive]

derive:
  series_number_offset: 1000
  series_description_suffix: " [enhanced, not for diagnosis]"
  content_qualification: RESEARCH

dispatch:
  max_attempts: 5
  backoff_initial_seconds: 2
  backoff_max_seconds: 300

logging:
  level: INFO
"""


def example() -> dict[str, Any]:
    return yaml.safe_load(EXAMPLE_YAML)


def errors_of(data: Any, base: Path = Path("/etc/dicomnode")) -> list[tuple[str, str]]:
    with pytest.raises(ConfigError) as info:
        parse_config(data, base)
    return info.value.errors


def assert_error(errors: list[tuple[str, str]], key: str, *fragments: str) -> None:
    reasons = [reason for k, reason in errors if k == key]
    assert reasons, f"no error for {key!r}; got {errors}"
    assert any(all(f in r for f in fragments) for r in reasons), f"{key}: {reasons} lacks {fragments}"


def test_example_config_parses_with_paths_relative_to_the_file(tmp_path: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "node.yaml").write_text(EXAMPLE_YAML)
    config = load_config(folder / "node.yaml")
    assert config.node.ae_title == "DICOMNODE"
    assert config.node.max_object_bytes == 2 * 1024**3
    assert config.storage.root == tmp_path / "var"
    assert isinstance(config.destinations["pacs"], DicomSettings)
    assert isinstance(config.destinations["archive"], FolderSettings)
    assert config.destinations["archive"].folder == tmp_path / "var" / "outbox"
    assert config.models["hqg-fundus"].guidance["OP"] == tmp_path / "guidance" / "fundus_hq"
    assert [r.name for r in config.rules] == ["fundus", "endoscopy", "drop-localizers"]
    assert config.rules[1].match["Modality"] == ["ES", "XC"]
    assert isinstance(config.rules[1].match["SeriesDescription"], RegexMatch)
    assert config.rules[2].model is None and config.rules[2].destinations == []
    assert config.calling_ae_title("pacs") == "DICOMNODE"
    assert config.unmatched.action == "forward"


def test_defaults_fill_a_minimal_config() -> None:
    config = parse_config({"models": {"c": {"kind": "clahe"}}, "destinations": {"out": {"folder": "out"}},
                           "rules": [{"name": "all", "model": "c", "destinations": ["out"]}]}, Path("/srv/node"))
    assert config.node.port == 11112 and config.node.require_called_aet is True
    assert config.storage.root == Path("/srv/node/var")
    assert config.storage.retention_days_delivered == 7 and config.storage.retention_days_failed == 30
    assert config.dispatch.batch_size == 50 and config.derive.content_qualification == "RESEARCH"
    assert config.unmatched.action == "ignore"
    assert config.rules[0].match == {}


def test_config_hash_is_stable_and_tracks_content() -> None:
    a = parse_config(example(), Path("/a"))
    b = parse_config(example(), Path("/a"))
    assert a.config_hash == b.config_hash and len(a.config_hash) == 64
    changed = example()
    changed["derive"]["series_number_offset"] = 2000
    assert parse_config(changed, Path("/a")).config_hash != a.config_hash
    # Written the same way (defaults spelt out or left out) gives the same hash.
    spelled = example()
    spelled["node"]["workers"] = 1
    assert parse_config(spelled, Path("/a")).config_hash == a.config_hash


def _set(data: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    target: Any = data
    for part in parts[:-1]:
        target = target[int(part)] if isinstance(target, list) else target[part]
    last = parts[-1]
    if isinstance(target, list):
        target[int(last)] = value
    else:
        target[last] = value


@pytest.mark.parametrize(
    ("where", "value", "key", "fragments"),
    [
        ("node.prot", 104, "node.prot", ("unknown key 'prot'", "did you mean 'port'")),
        ("rules.0.mdoel", "clahe", "rules[0].mdoel", ("unknown key", "'model'")),
        ("node.port", 70000, "node.port", ("between 1 and 65535", "70000")),
        ("destinations.pacs.port", 0, "destinations.pacs.port", ("between 1 and 65535",)),
        ("destinations.pacs.port", "abc", "destinations.pacs.port", ("valid integer", "'abc'")),
        ("node.ae_title", "A_VERY_LONG_AE_TITLE", "node.ae_title", ("at most 16",)),
        ("destinations.pacs.ae_title", "PA\\CS", "destinations.pacs.ae_title", ("backslash",)),
        ("destinations.pacs.ae_title", "   ", "destinations.pacs.ae_title", ("empty",)),
        ("node.allowed_calling_aets", ["OK", "BAD\tAE"], "node.allowed_calling_aets[1]", ("'\\t'",)),
        ("node.ae_title", "NÖDE", "node.ae_title", ("printable ASCII",)),
        ("rules.0.model", "hqg-fundos", "rules[0].model", ("unknown model 'hqg-fundos'", "did you mean 'hqg-fundus'",
                                                             "known: hqg-fundus, clahe")),
        ("rules.0.destinations", ["pacs", "pcas"], "rules[0].destinations[1]",
         ("unknown destination 'pcas'", "(known: pacs, archive)")),
        ("unmatched.destinations", ["arcive"], "unmatched.destinations[0]", ("unknown destination 'arcive'",)),
        ("rules.1.match.SeriesDescription", {"regex": "colon("}, "rules[1].match.SeriesDescription",
         ("bad regex", "colon(")),
        ("rules.1.match.SeriesDescription", {"regexp": "x"}, "rules[1].match.SeriesDescription", ("{regex: PATTERN}",)),
        ("rules.0.match", {"Modalty": "OP"}, "rules[0].match.Modalty", ("unknown DICOM keyword", "did you mean 'Modality'")),
        ("rules.0.match", {"PixelData": "x"}, "rules[0].match.PixelData", ("cannot be matched",)),
        ("rules.0.match", {"Modality": False}, "rules[0].match.Modality", ("boolean", "quote")),
        ("rules.0.match", {"Modality": []}, "rules[0].match.Modality", ("empty list",)),
        ("storage.disk_low_watermark_percent", 95, "storage.disk_low_watermark_percent",
         ("below disk_high_watermark_percent",)),
        ("storage.disk_high_watermark_percent", 150, "storage.disk_high_watermark_percent", ("less than or equal to 100",)),
        ("models.clahe.kind", "claeh", "models.clahe.kind", ("unknown model kind 'claeh'", "did you mean 'clahe'")),
        ("models.clahe.device", "gpu", "models.clahe.device", ("auto, cpu, cuda",)),
        ("models.clahe.batch_size", 0, "models.clahe.batch_size", ("greater than or equal to 1", "got 0")),
        ("node.series_quiet_seconds", "soon", "node.series_quiet_seconds", ("valid number", "'soon'")),
        ("unmatched.action", "forwrd", "unmatched.action", ("'ignore' or 'forward'", "'forwrd'")),
        ("derive.content_qualification", "CLINICAL", "derive.content_qualification", ("RESEARCH",)),
        ("dispatch.backoff_max_seconds", 1, "dispatch.backoff_max_seconds", ("not be below backoff_initial_seconds",)),
        ("logging.level", "LOUD", "logging.level", ("'DEBUG'",)),
        ("destinations.pacs.tls", {"cert": "c.pem"}, "destinations.pacs.tls", ("cert and key",)),
        ("node.tls", {"cert": "c.pem", "key": "k.pem", "require_client_cert": True}, "node.tls.ca", ("require_client_cert",)),
        ("rules.0.name", "has space", "rules[0].name", ("letters, digits",)),
        ("rules.1.name", "fundus", "rules[1].name", ("duplicate rule name 'fundus'",)),
        ("rules.1.destinations", [], "rules[1].destinations", ("at least one destination",)),
        ("rules.0.destinations", ["pacs", "archive", "pacs"], "rules[0].destinations[2]", ("listed twice",)),
        ("rules.0.match", {}, "rules[1]", ("can never match", "rules[0]", "catch-all last")),
        ("destinations.pacs.host", "", "destinations.pacs.host", ("at least 1 character",)),
    ],
)
def test_each_wrong_key_gets_a_message_naming_it(where: str, value: Any, key: str, fragments: tuple[str, ...]) -> None:
    data = example()
    _set(data, where, value)
    assert_error(errors_of(data), key, *fragments)


def test_missing_required_keys_are_named() -> None:
    data = example()
    del data["destinations"]["pacs"]["host"]
    del data["rules"][0]["name"]
    errors = errors_of(data)
    assert_error(errors, "destinations.pacs.host", "required")
    assert_error(errors, "rules[0].name", "required")


def test_no_rules_is_an_error() -> None:
    data = example()
    data["rules"] = []
    assert_error(errors_of(data), "rules", "at least one rule")
    del data["rules"]
    assert_error(errors_of(data), "rules", "at least one rule")


def test_forward_unmatched_needs_destinations() -> None:
    data = example()
    data["unmatched"] = {"action": "forward"}
    assert_error(errors_of(data), "unmatched.destinations", "needs at least one destination")


def test_every_problem_is_reported_at_once_in_document_order() -> None:
    data = example()
    data["node"]["port"] = -1
    data["rules"][1]["model"] = "nope"
    data["rules"][0]["destinations"] = ["pcas"]
    data["dispatch"]["max_attemps"] = 3
    with pytest.raises(ConfigError) as info:
        parse_config(data, Path("/x"))
    keys = [k for k, _ in info.value.errors]
    assert keys == ["node.port", "rules[0].destinations[0]", "rules[1].model", "dispatch.max_attemps"]
    text = str(info.value)
    assert "4 problems" in text
    assert "\n  rules[0].destinations[0]: unknown destination 'pcas' (did you mean 'pacs'?) (known: pacs, archive)" in text


def test_unknown_section_is_named_with_suggestion() -> None:
    data = example()
    data["destination"] = data.pop("destinations")
    errors = errors_of(data)
    assert_error(errors, "destination", "unknown key 'destination'", "did you mean 'destinations'")


def test_destination_type_is_inferred_or_explicit() -> None:
    data = example()
    data["destinations"]["pacs"]["folder"] = "x"  # a dicom destination has no folder key
    data["destinations"]["pacs"]["type"] = "dicom"
    assert_error(errors_of(data), "destinations.pacs.folder", "unknown key 'folder'")
    data = example()
    data["destinations"]["archive"]["port"] = 104
    assert_error(errors_of(data), "destinations.archive.port", "unknown key 'port'", "allowed: type, folder")


def test_numeric_ae_title_is_text() -> None:
    data = example()
    data["destinations"]["pacs"]["ae_title"] = 104
    assert parse_config(data, Path("/x")).destinations["pacs"].ae_title == "104"


def test_match_values_are_normalized_to_text() -> None:
    data = example()
    data["rules"][0]["match"] = {"SeriesNumber": 3, "Modality": ["OP", 7]}
    config = parse_config(data, Path("/x"))
    assert config.rules[0].match == {"SeriesNumber": "3", "Modality": ["OP", "7"]}


def test_yaml_syntax_error_names_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("node:\n  port: 11112\n  ae_title: [DICOMNODE\nrules: []\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    (key, reason), = info.value.errors
    assert "line 4, column" in reason and str(path) in str(info.value)


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(EXAMPLE_YAML.replace("  port: 11112\n", "  port: 11112\n  port: 104\n", 1))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "duplicate key 'port' (first at line 3)" in str(info.value)
    assert "line 4, column 3" in str(info.value)


@pytest.mark.parametrize(("text", "fragment"), [("", "empty"), ("- a\n- b\n", "mapping of sections")])
def test_empty_or_non_mapping_file(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=fragment):
        load_config(path)


def test_unreadable_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "missing.yaml")


def test_missing_files_lists_weights_and_tls(tmp_path: Path) -> None:
    data = example()
    data["destinations"]["pacs"]["tls"] = {"ca": "ca.pem"}
    (tmp_path / "ca.pem").write_text("x")
    config = parse_config(data, tmp_path)
    missing = dict(config.missing_files())
    assert "models.hqg-fundus.weights" in missing and "destinations.pacs.tls.ca" not in missing
    assert str(tmp_path.parent / "models" / "weights" / "hqgnet_fundus.pt") in missing["models.hqg-fundus.weights"]


def test_config_error_is_a_value_error_with_errors_list() -> None:
    err = ConfigError([("a.b", "wrong"), ("", "file-level")], source="x.yaml")
    assert isinstance(err, ValueError)
    assert str(err) == "invalid config x.yaml (2 problems):\n  a.b: wrong\n  file-level"


def test_example_in_docs_matches(tmp_path: Path) -> None:
    """The example block in docs/configuration.md is a valid config too."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"
    text = doc.read_text()
    start = text.index("```yaml\n", text.index("## Example")) + len("```yaml\n")
    block = text[start : text.index("```", start)]
    assert isinstance(parse_config(yaml.safe_load(block), tmp_path), NodeConfig)


def test_deep_copy_of_config_keeps_compiled_regex() -> None:
    config = parse_config(example(), Path("/x"))
    clone = copy.deepcopy(config)
    assert clone.rules[1].match["SeriesDescription"].pattern.fullmatch("Gastroscopy")
    assert clone.config_hash == config.config_hash


MINIMAL_SITE_CONFIG = """
node: {ae_title: DICOMNODE, host: 0.0.0.0, port: 11112, series_quiet_seconds: 10}
storage: {root: ./var}
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 11113}
  archive: {folder: ./var/outbox}
models:
  classic: {kind: clahe}
  fundus: {kind: hqgnet, weights: models/weights/FILE, device: auto}
rules:
  - name: eyes
    match: {Modality: OP}
    model: classic
    destinations: [pacs, archive]
"""


def test_minimal_site_config_parses_and_names_the_missing_weights(tmp_path: Path) -> None:
    cfg = parse_config(yaml.safe_load(MINIMAL_SITE_CONFIG), tmp_path)
    assert cfg.node.port == 11112 and cfg.node.series_quiet_seconds == 10
    assert cfg.rules[0].model == "classic" and cfg.rules[0].destinations == ["pacs", "archive"]
    assert cfg.storage.root == tmp_path / "var"
    missing = cfg.missing_files()
    assert any("fundus" in key and "FILE" in reason for key, reason in missing), missing


def test_builtin_paths_and_the_embedded_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from dicomnode.config import load_config
    from dicomnode.configtypes import builtin_dir

    monkeypatch.chdir(tmp_path)
    cfg = load_config()  # the embedded default: relative paths resolve against the working directory
    assert cfg.storage.root == tmp_path / "var"
    weights = {m.weights for m in cfg.models.values() if m.weights is not None}
    assert weights and all(w.parent == builtin_dir() and w.is_file() for w in weights)
    errors = errors_of({"models": {"m": {"kind": "hqgnet", "weights": "builtin:../../etc/passwd"}},
                        "rules": [{"name": "r", "model": "m", "destinations": []}]})
    assert_error(errors, "models.m.weights", "plain name of a shipped file")
