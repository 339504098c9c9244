"""`dicomnode check-config` and `dicomnode route` (dry run)."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from dicomnode.cli import main
from dicomnode.cli.common import EXIT_CONFIG

REPO = Path(__file__).resolve().parents[1]

# A typical site config: fundus to HQG-Net, endoscopy to CLAHE, localizers dropped, everything
# else forwarded to an archive folder.
SITE_CONFIG = """\
node:
  ae_title: DICOMNODE
  port: 11112
  series_quiet_seconds: 10
  allowed_calling_aets: [FUNDUSCAM, ENDO1]
storage:
  root: ./var
  disk_high_watermark_percent: 90
  disk_low_watermark_percent: 85
destinations:
  pacs: {ae_title: PACS, host: 127.0.0.1, port: 104}
  archive: {folder: ./var/outbox}
models:
  hqg-fundus:
    kind: hqgnet
    weights: weights/hqgnet_fundus.pt
    guidance: {OP: guidance/fundus_hq}
  clahe: {kind: clahe, options: {clip_limit: 2.0}}
rules:
  - name: fundus
    match: {Modality: OP, CallingAETitle: FUNDUSCAM}
    model: hqg-fundus
    destinations: [pacs, archive]
  - name: endoscopy
    match: {Modality: [ES, XC], ImageType: PRIMARY}
    model: clahe
    destinations: [pacs]
  - name: drop-localizers
    match: {ImageType: {regex: "LOCALI[SZ]ER"}}
unmatched: {action: forward, destinations: [archive]}
derive: {series_number_offset: 1000, content_qualification: RESEARCH}
dispatch: {max_attempts: 5, backoff_initial_seconds: 2, backoff_max_seconds: 300, batch_size: 50}
logging: {level: INFO}
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    (tmp_path / "weights").mkdir()
    weights = tmp_path / "weights" / "hqgnet_fundus.pt"
    weights.write_bytes(b"weights")
    card = {"kind": "hqgnet", "weights_sha256": hashlib.sha256(b"weights").hexdigest()}
    weights.with_suffix(".json").write_text(json.dumps(card))
    path = tmp_path / "node.yaml"
    path.write_text(SITE_CONFIG)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    try:
        code = main(list(argv))
    except SystemExit as exc:  # commands exit with EXIT_CONFIG on an unusable config
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


def test_site_config_passes_check_config(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "check-config", str(config_file))
    assert (code, out, err) == (0, "OK: 3 rules, 2 models, 2 destinations\n", "")
    assert run(capsys, "check-config", "--config", str(config_file))[0] == 0


def test_check_config_lists_every_error_with_its_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.yaml"
    text = (SITE_CONFIG.replace("port: 11112", "prot: 11112")
            .replace("destinations: [pacs, archive]", "destinations: [pacs, pcas]")
            .replace("model: clahe\n", "model: clahee\n")
            .replace("disk_low_watermark_percent: 85", "disk_low_watermark_percent: 95"))
    path.write_text(text)
    code, out, err = run(capsys, "check-config", str(path))
    assert code == EXIT_CONFIG and out == ""
    lines = err.splitlines()
    assert lines[0] == f"invalid config {path} (4 problems):"
    assert "  node.prot: unknown key 'prot' (did you mean 'port'?)" in lines[1]
    assert any(line.startswith("  storage.disk_low_watermark_percent: must be below") for line in lines)
    assert "  rules[0].destinations[1]: unknown destination 'pcas' (did you mean 'pacs'?) (known: pacs, archive)" in lines
    assert any(line.startswith("  rules[1].model: unknown model 'clahee'") for line in lines)


def test_check_config_reports_missing_weights(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "node.yaml"
    path.write_text(SITE_CONFIG)
    code, _, err = run(capsys, "check-config", str(path))
    assert code == EXIT_CONFIG
    assert f"models.hqg-fundus.weights: file not found: {tmp_path / 'weights' / 'hqgnet_fundus.pt'}" in err


def test_check_config_reports_corrupt_weights(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (config_file.parent / "weights" / "hqgnet_fundus.pt").write_bytes(b"weights, changed")
    code, _, err = run(capsys, "check-config", str(config_file))
    assert code == EXIT_CONFIG and "models.hqg-fundus.weights: weights file" in err and "corrupt" in err


def test_check_config_yaml_error_names_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("node:\n  port: 11112\n   ae_title: X\n")
    code, _, err = run(capsys, "check-config", str(path))
    assert code == EXIT_CONFIG and "line 3, column" in err


def test_check_config_without_a_file_checks_the_embedded_default(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = run(capsys, "check-config")
    assert code == 0 and out.startswith("OK: ")


def write(path: Path, series: str, index: int, **tags: Any) -> Path:
    """A minimal image of ``series`` in one study (the four UIDs the node needs, nothing more)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = "1.2.3"
    ds.SeriesInstanceUID = series
    ds.InstanceNumber = index
    for key, value in tags.items():
        setattr(ds, key, value)
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = np.zeros((8, 8), np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_route_dry_run_groups_by_series_and_names_matched_instances(
        config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    endo, fundus, ct = "1.2.3.100", "1.2.3.200", "1.2.3.300"
    study = tmp_path / "study"
    write(study / "endo" / "e1.dcm", endo, 1, Modality="ES", ImageType=["ORIGINAL", "PRIMARY"])
    write(study / "endo" / "e2.dcm", endo, 2, Modality="ES", ImageType=["DERIVED", "SECONDARY"])
    write(study / "endo" / "e3.dcm", endo, 3, Modality="ES", ImageType=["ORIGINAL", "PRIMARY"])
    write(study / "f1.dcm", fundus, 1, Modality="OP", ImageType=["ORIGINAL", "PRIMARY"])
    write(study / "ct.dcm", ct, 1, Modality="CT")
    (study / "notes.txt").write_text("not dicom")

    code, out, _ = run(capsys, "route", "--config", str(config_file), "--calling-aet", "FUNDUSCAM", str(study))
    assert code == 0
    blocks = {block.split()[0]: block for block in out.split("Series ")[1:]}
    assert "rule 'endoscopy' -> enhance with model 'clahe' -> pacs" in blocks[endo]
    assert "matched 2 of 3: e1.dcm, e3.dcm" in blocks[endo]
    assert "not matched (left alone): e2.dcm" in blocks[endo]
    assert "rule 'fundus' -> enhance with model 'hqg-fundus' -> pacs, archive" in blocks[fundus]
    assert "no rule matched -> unmatched policy: forward -> forward untouched -> archive" in blocks[ct]
    assert f"skipped {study / 'notes.txt'}: the node would refuse it" in out
    assert out.rstrip().endswith("6 files, 3 series: 2 enhance, 1 forward, 0 ignore; 1 skipped")

    # Another sender: the fundus rule (CallingAETitle FUNDUSCAM) no longer applies.
    code, out, _ = run(capsys, "route", "--config", str(config_file), "--calling-aet", "OTHER",
                       str(study / "f1.dcm"))
    assert code == 0 and "no rule matched -> unmatched policy: forward" in out


def test_route_ignore_rule_and_bad_config(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    scout = write(tmp_path / "scout.dcm", "1.2.3.400", 1, Modality="CT", ImageType=["ORIGINAL", "PRIMARY", "LOCALIZER"])
    code, out, _ = run(capsys, "route", "--config", str(config_file), str(scout))
    assert out.startswith("note: some rules match CallingAETitle; without --calling-aet")
    assert code == 0 and "rule 'drop-localizers' -> ignore" in out and "0 enhance, 0 forward, 1 ignore" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: []\n")
    code, _, err = run(capsys, "route", "--config", str(bad), str(scout))
    assert code == EXIT_CONFIG and "rules: at least one rule" in err


def test_route_without_dicom_files_fails(config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    code, out, _ = run(capsys, "route", "--config", str(config_file), str(empty))
    assert code == 1 and "0 files, 0 series" in out


@pytest.mark.slow
def test_installed_command_runs_check_config(config_file: Path) -> None:
    exe = REPO / ".venv" / "bin" / "dicomnode"
    if not exe.exists():
        pytest.skip("the dicomnode entry point is not installed in .venv")
    result = subprocess.run([str(exe), "check-config", str(config_file)], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "OK: 3 rules, 2 models, 2 destinations\n"
