"""`dicomnode jobs list|show|reprocess|cancel`, `dicomnode echo DEST`, `dicomnode models list` on a real ledger."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from dicomnode.cli import main
from dicomnode.config import load_config
from dicomnode.ledger import JobState, Ledger
from dicomnode.server import Server, ServerOptions
from dicomnode.tools.demo import send

from factories import free_port, write_series


def test_jobs_echo_and_models_commands(tmp_path: Path, capsys) -> None:
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.3},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(tmp_path / "out")},
                         "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "timeout_seconds": 2}},
        "models": {"clahe": {"kind": "clahe"}},
        "rules": [{"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["out"]}],
        "admin": {"enabled": False},
    }))
    config = load_config(config_path)
    server = Server(config, options=ServerOptions(drain_seconds=5, dispatch_poll_seconds=0.1))
    server.start()
    try:
        assert send(write_series(tmp_path / "in", "s", "x", 2), "127.0.0.1", server.port, "DICOMNODE") == [0, 0]
        deadline = time.monotonic() + 60
        while not server.spool.ledger.jobs(JobState.DONE):
            assert time.monotonic() < deadline, "job not done"
            time.sleep(0.1)
    finally:
        server.stop()
    cfg = ["--config", str(config_path)]
    capsys.readouterr()

    assert main(["jobs", "list", *cfg]) == 0
    out = capsys.readouterr().out
    assert "1 jobs" in out and "done" in out and "clahe" in out
    assert main(["jobs", "list", "--json", "--state", "done", *cfg]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["total"] == 1 and listing["items"][0]["outputs"] == 2 and "model" in listing["items"][0]["timings"]
    assert main(["jobs", "list", "--state", "bogus", *cfg]) == 2
    assert main(["jobs", "show", "1", *cfg]) == 0
    out = capsys.readouterr().out
    assert "rule ct -> model clahe" in out and "seconds:" in out and "quality gate: passed" in out
    assert main(["jobs", "show", "9", *cfg]) == 1
    assert main(["jobs", "cancel", "1", *cfg]) == 1
    assert "is done already" in capsys.readouterr().err
    assert main(["jobs", "reprocess", "1", *cfg]) == 0
    ledger = Ledger(tmp_path / "var" / "ledger.sqlite3", readonly=True)
    assert ledger.job(1).state == JobState.COMPLETE
    ledger.close()
    assert main(["jobs", "cancel", "1", *cfg]) == 0
    assert "cancelled by cli:" in capsys.readouterr().out
    audit = [json.loads(line) for line in (tmp_path / "var" / "admin-audit.jsonl").read_text().splitlines()]
    assert [(a["action"], a["status"]) for a in audit] == [("job.cancel", 409), ("job.reprocess", 200), ("job.cancel", 200)]
    assert all(a["who"].startswith("cli:") for a in audit)

    assert main(["echo", "out", *cfg]) == 0
    assert "out: OK" in capsys.readouterr().out
    assert main(["echo", "pacs", *cfg]) == 1
    assert "pacs: FAILED" in capsys.readouterr().out
    assert main(["echo", "nope", *cfg]) == 2

    assert main(["models", "list", *cfg]) == 0
    assert "clahe: clahe on auto" in capsys.readouterr().out
    assert main(["models", "list", "--verify"]) == 0  # the embedded default: shipped weights match their cards
    assert "hqgnet-color" in capsys.readouterr().out
