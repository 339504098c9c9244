"""Small things an admin met (issue 14): the rejection log names the real reason, a missing weights file does not
stop `serve`, a corrupt one fails `check-config`, and the docs' commands match the code."""

from __future__ import annotations

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicomnode.cli import main
from dicomnode.config import load_config

from conftest import REPO
from factories import free_port, start_receiver
from reliability import NodeProcess, node_config


def _associate(port: int, called: str, calling: str) -> bool:
    ae = AE(ae_title=calling)
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    ok = assoc.is_established
    if ok:
        assoc.release()
    return ok


def test_rejection_log_names_the_called_ae(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    receiver, spool = start_receiver(tmp_path / "var", allowed_calling_aets=["MODALITY"])
    try:
        with caplog.at_level(logging.WARNING, logger="dicomnode.receive"):
            assert not _associate(receiver.port, "WRONGNAME", "MODALITY")
            assert not _associate(receiver.port, "DICOMNODE", "STRANGER")
            assert _associate(receiver.port, "DICOMNODE", "MODALITY")
    finally:
        receiver.stop()
        spool.close()
    lines = [r.getMessage() for r in caplog.records if "rejected" in r.getMessage()]
    assert "called AE 'WRONGNAME' is not ours ('DICOMNODE'" in lines[0] and "calling AE" not in lines[0]
    assert "calling AE 'STRANGER' is not in node.allowed_calling_aets" in lines[1] and "called AE" not in lines[1]


@pytest.mark.slow
def test_serve_keeps_serving_when_a_weights_file_is_missing(tmp_path: Path) -> None:
    models = {"clahe": {"kind": "clahe"}, "gone": {"kind": "hqgnet", "weights": str(tmp_path / "missing.pt")}}
    rules = [{"name": "op", "match": {"Modality": "OP"}, "model": "gone", "destinations": ["out"]},
             {"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["out"]}]
    config = node_config(tmp_path / "var", free_port(), {"out": {"folder": str(tmp_path / "out")}}, rules=rules,
                         models=models, extra={"admin": {"enabled": False}})
    with NodeProcess(tmp_path / "node", config) as node:
        assert node.alive()
    log = node.stderr()
    assert "models.gone.weights" in log and "the rules using this model fail" in log and "rule 'op' cannot run" in log


def test_check_config_fails_a_corrupt_weights_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shipped = REPO / "models" / "weights"
    for name in ("hqgnet-ccm.pt", "hqgnet-ccm.json"):
        shutil.copy(shipped / name, tmp_path / name)
    config = {"storage": {"root": str(tmp_path / "var")}, "destinations": {"out": {"folder": str(tmp_path / "out")}},
              "models": {"ccm": {"kind": "hqgnet", "weights": str(tmp_path / "hqgnet-ccm.pt"),
                                 "guidance": {"default": str(shipped / "hqgnet-ccm.guidance-default.json")}}},
              "rules": [{"name": "all", "match": {}, "model": "ccm", "destinations": ["out"]}]}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["check-config", str(path)]) == 0
    with (tmp_path / "hqgnet-ccm.pt").open("r+b") as fh:  # one flipped byte in the middle of the weights
        fh.seek(fh.seek(0, 2) // 2)
        byte = fh.read(1)
        fh.seek(-1, 1)
        fh.write(bytes([byte[0] ^ 0xFF]))
    capsys.readouterr()
    assert main(["check-config", str(path)]) == 2
    assert "models.ccm.weights" in capsys.readouterr().err


def test_docs_describe_the_code() -> None:
    default = load_config(None)
    readme = (REPO / "README.md").read_text()
    operations = (REPO / "docs" / "operations.md").read_text()
    evaluation = (REPO / "docs" / "evaluation.md").read_text()
    for model in re.findall(r"dicomnode enhance .*--model ([\w.-]+)", readme):  # the model must be in the default config
        assert model in default.models, model
    kinds = {m.kind for m in default.models.values()}
    assert "CLAHE" not in operations.split("## What happens")[0] or "clahe" in kinds
    for weights in re.findall(r"models/weights/([\w.-]+\.pt)", readme + evaluation + operations):
        assert (REPO / "models" / "weights" / weights).is_file(), weights
    for config in re.findall(r"--config (deploy/[\w./-]+\.yaml)", readme + operations):
        assert (REPO / config).is_file(), config
    help_text = subprocess.run([str(REPO / ".venv" / "bin" / "dicomnode"), "--help"], capture_output=True, text=True).stdout
    for command in re.findall(r"dicomnode (jobs|echo|models list|reprocess|resend|status)\b", readme + operations):
        assert command.split()[0] in help_text, command
