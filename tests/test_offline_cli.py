"""`dicomnode enhance`: rules, models and derivation over files, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import pydicom
import pytest
from pydicom.uid import generate_uid

from dicomnode.cli import main
from dicomnode.cli.common import EXIT_CONFIG
from dicomnode.derive import read_private

from factories import bundled as sample_path

CONFIG = """
node: {ae_title: OFFLINE}
destinations:
  archive: {folder: ./outbox}
models:
  contrast: {kind: clahe, batch_size: 2}
  flat: {kind: histeq}
rules:
  - name: ct
    match: {Modality: CT}
    model: contrast
    destinations: [archive]
  - name: us-forward
    match: {Modality: US}
    destinations: [archive]
unmatched: {action: ignore}
derive: {series_number_offset: 500, series_description_suffix: " [test]"}
"""




@pytest.fixture
def study(tmp_path: Path) -> Path:
    """A folder with a 3-instance CT series, an MR series, a US series and a stray text file."""
    root = tmp_path / "study"
    (root / "ct").mkdir(parents=True)
    ct = pydicom.dcmread(sample_path("CT_small.dcm"))
    for i in range(3):
        ct.SOPInstanceUID = generate_uid()
        ct.save_as(root / "ct" / f"{i}.dcm", enforce_file_format=True)
    shutil.copy(sample_path("MR_small.dcm"), root / "mr.dcm")
    shutil.copy(sample_path("examples_rgb_color.dcm"), root / "us.dcm")
    (root / "README.txt").write_text("not DICOM")
    return root


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "node.yaml"
    path.write_text(CONFIG)
    return path


def test_enhance_follows_the_rules(study: Path, config_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code = main(["enhance", "--config", str(config_file), "--out", str(out), str(study)])
    stdout = capsys.readouterr().out
    assert code == 0, stdout
    files = sorted(out.iterdir())
    assert len(files) == 3  # the CT series only
    for path in files:
        ds = pydicom.dcmread(path)
        assert ds.SeriesDescription.endswith(" [test]") and ds.StationName == "OFFLINE"
        assert read_private(ds)["model_kind"] == "clahe"
    assert "rule 'ct' -> model 'contrast': 3 of 3 enhanced" in stdout
    assert "rule 'us-forward' -> forward untouched" in stdout
    assert "no rule matched -> ignore" in stdout  # the MR series
    assert "README.txt: the node would refuse it" in stdout  # as `route` and the live node say
    assert "3 written" in stdout and "0 failed" in stdout


def test_model_override_enhances_every_series(study: Path, config_file: Path, tmp_path: Path, capsys):
    out = tmp_path / "out"
    code = main(["enhance", "--config", str(config_file), "--out", str(out), "--model", "flat", str(study / "mr.dcm"),
                 str(study / "us.dcm")])
    stdout = capsys.readouterr().out
    # histogram equalisation lifts the ultrasound's black surround: the gate holds that series back
    assert code == 1 and "series held back by the quality gate" in stdout, stdout
    assert "field-of-view surround changed" in stdout
    kinds = sorted(read_private(pydicom.dcmread(p))["model_kind"] for p in out.rglob("*.dcm"))
    assert kinds == ["histeq", "histeq"]
    assert len(list((out / "gated").glob("*.dcm"))) >= 1
    inspect = tmp_path / "inspect"
    code = main(["enhance", "--config", str(config_file), "--out", str(inspect), "--model", "flat", "--no-gate",
                 str(study / "mr.dcm"), str(study / "us.dcm")])
    assert code == 0 and len(list(inspect.glob("*.dcm"))) == 2


def test_failed_instance_is_reported_and_sets_exit_status(study: Path, config_file: Path, tmp_path: Path, capsys):
    shutil.copy(sample_path("MR_truncated.dcm"), study / "truncated.dcm")
    out = tmp_path / "out"
    code = main(["enhance", "--config", str(config_file), "--out", str(out), "--model", "contrast", str(study)])
    stdout = capsys.readouterr().out
    assert code == 1
    assert "FAILED" in stdout and "truncated.dcm" in stdout and "less than expected" in stdout
    assert len(list(out.iterdir())) == 5  # 3 CT + MR + US; the truncated MR alone failed


def test_bad_arguments_are_named(study: Path, config_file: Path, tmp_path: Path, capsys):
    assert main(["enhance", "--config", str(config_file), "--out", str(tmp_path / "o"), "--model", "nope", str(study)]) == 2
    assert "'nope' is not in the config's models" in capsys.readouterr().err
    assert main(["enhance", "--config", str(config_file), "--out", str(tmp_path / "o"), str(tmp_path / "missing")]) == 2
    assert "input not found" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text(CONFIG.replace("kind: clahe", "kind: clahee"))
    with pytest.raises(SystemExit) as exited:
        main(["enhance", "--config", str(bad), "--out", str(tmp_path / "o"), str(study)])
    assert exited.value.code == EXIT_CONFIG
    assert "clahee" in capsys.readouterr().err
