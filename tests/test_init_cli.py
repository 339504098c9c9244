"""`dicomnode init --dir DIR`: an editable, valid config with absolute storage paths and the shipped models."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.configtypes import builtin_dir


def test_init_writes_a_valid_config_with_absolute_paths_and_builtin_models(tmp_path: Path, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert main(["init", "--dir", "site"]) == 0
    path = tmp_path / "site" / "config.yaml"
    text = path.read_text()
    data = yaml.safe_load(text)
    assert data["storage"]["root"] == str(tmp_path / "site" / "var")
    assert data["destinations"]["outbox"]["folder"] == str(tmp_path / "site" / "var" / "outbox")
    assert data["models"]["hqgnet-color"]["weights"] == "builtin:hqgnet-color.pt"
    assert "# a series is complete after" in text  # the default's comments are kept: the file is for editing
    config = load_config(path)
    assert config.models["hqgnet-ccm"].weights == builtin_dir() / "hqgnet-ccm.pt"
    assert [r.name for r in config.rules] == [r.name for r in load_config(None).rules]
    assert config.missing_files() == []
    assert oct(path.stat().st_mode & 0o777) == "0o640"
    assert "wrote" in capsys.readouterr().out

    # The file works from anywhere: nothing in it depends on the working directory.
    os.chdir("/")
    assert load_config(path).storage.root == tmp_path / "site" / "var"


def test_init_with_identity_and_a_pacs(tmp_path: Path) -> None:
    assert main(["init", "--dir", str(tmp_path), "--storage", str(tmp_path / "data"), "--ae-title", "ENHANCER",
                 "--port", "2104", "--pacs", "ORTHANC@pacs.example:4242"]) == 0
    config = load_config(tmp_path / "config.yaml")
    assert (config.node.ae_title, config.node.port, config.storage.root) == ("ENHANCER", 2104, tmp_path / "data")
    pacs = config.destinations["pacs"]
    assert (pacs.ae_title, pacs.host, pacs.port) == ("ORTHANC", "pacs.example", 4242)
    assert all(rule.destinations == ["outbox", "pacs"] for rule in config.rules)


def test_init_never_overwrites_without_force_and_refuses_a_bad_pacs(tmp_path: Path, capsys) -> None:
    assert main(["init", "--dir", str(tmp_path)]) == 0
    path = tmp_path / "config.yaml"
    path.write_text(path.read_text() + "# mine\n")
    assert main(["init", "--dir", str(tmp_path)]) == 1
    assert path.read_text().endswith("# mine\n")
    assert "exists" in capsys.readouterr().err
    assert main(["init", "--dir", str(tmp_path), "--force"]) == 0
    assert not path.read_text().endswith("# mine\n")
    with pytest.raises(SystemExit):
        main(["init", "--dir", str(tmp_path / "x"), "--port", "nope"])
    assert main(["init", "--dir", str(tmp_path / "y"), "--pacs", "no-port"]) == 2
    assert not (tmp_path / "y" / "config.yaml").exists()
