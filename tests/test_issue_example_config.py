"""The example config from the "dicomnode end to end" issue, verbatim, must be valid."""

import textwrap

import yaml

from dicomnode.config import parse_config

ISSUE_EXAMPLE = textwrap.dedent(
    """
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
)


def test_issue_example_parses_and_names_the_missing_weights(tmp_path):
    cfg = parse_config(yaml.safe_load(ISSUE_EXAMPLE), tmp_path)
    assert cfg.node.port == 11112 and cfg.node.series_quiet_seconds == 10
    assert cfg.rules[0].model == "classic" and cfg.rules[0].destinations == ["pacs", "archive"]
    assert cfg.storage.root == tmp_path / "var"
    missing = cfg.missing_files()
    assert any("fundus" in key and "FILE" in reason for key, reason in missing), missing
