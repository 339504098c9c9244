"""The admin HTTP API against a live node in this process: every endpoint with the token, changes refused
without it (nothing changes), read-only views from loopback, live config reload, metrics, audit, progress."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
import yaml

from dicomnode.admin.auth import AUDIT_FILE, is_loopback
from dicomnode.config import load_config
from dicomnode.ledger import JobState
from dicomnode.tools.demo import send

from factories import free_port, node_with_admin_service, write_series

TOKEN = "s3cret-admin-token-for-tests"


def _wait(predicate: Any, timeout: float = 60.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def node_yaml(root: Path, *, rules: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.5},
        "storage": {"root": str(root / "var")},
        "destinations": {"out": {"folder": str(root / "out")},
                         # nothing listens there: each delivery dead-letters at its first attempt
                         "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "timeout_seconds": 2}},
        "models": {"clahe": {"kind": "clahe"}},
        "rules": rules or [
            {"name": "mr-only", "match": {"Modality": "MR"}, "model": "clahe", "destinations": ["out"]},
            {"name": "ct", "match": {"Modality": "CT", "SeriesDescription": {"regex": "(?i)keep.*"}}, "model": "clahe",
             "destinations": ["out", "pacs"]},
            {"name": "ct-any", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["out", "pacs"]},
        ],
        "dispatch": {"max_attempts": 1, "backoff_initial_seconds": 0.1},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token_file": str(root / "tokens")},
    }


@pytest.fixture
def running(tmp_path: Path) -> Any:
    (tmp_path / "tokens").write_text(f"# admins\nalice:{TOKEN}\n")
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(node_yaml(tmp_path)))
    with node_with_admin_service(config_path) as (server, admin):
        yield server, admin, config_path


def test_loopback() -> None:
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("127.3.4.5") and is_loopback("::ffff:127.0.0.1")
    assert not is_loopback("10.0.0.1") and not is_loopback("testclient") and not is_loopback(None)


def test_admin_api_end_to_end(running: Any, tmp_path: Path) -> None:
    server, admin, config_path = running
    base = admin.url
    auth = {"Authorization": f"Bearer {TOKEN}"}
    http = httpx.Client(base_url=base, timeout=30)

    assert http.get("/healthz").json()["status"] == "ok"
    ready = http.get("/readyz")
    assert ready.status_code == 200 and ready.json()["ready"] is True
    assert "/api/jobs" in http.get("/openapi.json").json()["paths"]

    files = write_series(tmp_path / "in", "1.2.3.4", "1.2.3.4.5", 3)
    series_uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
    assert send(files, "127.0.0.1", server.port, "DICOMNODE") == [0, 0, 0]
    ledger = server.spool.ledger
    job = _wait(lambda: next(iter(ledger.jobs(JobState.FAILED)), None), what="the job to fail on its dead letters")
    assert ledger.deliveries(job_id=job.id, state="dead_letter")

    # read-only views, from loopback without a token
    listing = http.get("/api/jobs", params={"state": "failed"}).json()
    assert listing["total"] == 1 and listing["items"][0]["id"] == job.id
    item = listing["items"][0]
    assert item["rule"] == "ct-any" and item["model"] == "clahe" and item["instances"] == 3 and item["outputs"] == 3
    assert {"decode", "model", "encode", "total"} <= set(item["timings"])
    assert item["deliveries"]["dead_letter"] == 3 and item["deliveries"]["sent"] == 3
    assert http.get("/api/jobs", params={"state": "nonsense"}).status_code == 422
    detail = http.get(f"/api/jobs/{job.id}").json()
    assert len(detail["instance_list"]) == 3 and detail["series_uid"] == series_uid
    text = json.dumps(detail)
    assert "PatientName" not in text and "Doe" not in text  # factories' patient: never shown
    assert http.get("/api/jobs/999").status_code == 404
    assert http.get("/api/deliveries", params={"state": "dead_letter"}).json()["count"] == 3
    assert [r["name"] for r in http.get("/api/rules").json()["rules"]] == ["mr-only", "ct", "ct-any"]
    dests = {d["name"]: d for d in http.get("/api/destinations").json()["items"]}
    assert dests["pacs"]["deliveries"] == {"dead_letter": 3} and dests["out"]["deliveries"] == {"sent": 3}
    models = http.get("/api/models").json()
    assert models["items"][0]["status"] == "loaded" and models["loaded"] == 1

    # rule test: a job id, and uploaded files; earlier rules say why they did not match
    tested = http.post("/api/rules/test", data={"job": str(job.id)}).json()["series"][0]
    assert tested["rule"] == "ct-any" and tested["destinations"] == ["out", "pacs"]
    why = {r["rule"]: r for r in tested["rules_tried"]}
    assert why["mr-only"]["why"][0]["key"] == "Modality" and why["mr-only"]["why"][0]["seen"] == ["CT"]
    assert why["ct"]["why"][0]["key"] == "SeriesDescription"
    uploaded = http.post("/api/rules/test", files=[("files", (p.name, p.read_bytes())) for p in files],
                         data={"calling_aet": "MODALITY"}).json()
    assert uploaded["series"][0]["rule"] == "ct-any" and uploaded["series"][0]["instances"] == 3
    assert http.post("/api/rules/test", data={}).status_code == 422

    # every change without the token: 401 and nothing changes
    before = (ledger.counts(), ledger.job(job.id))
    for url, body in [(f"/api/jobs/{job.id}/reprocess", None), (f"/api/jobs/{job.id}/cancel", None),
                      ("/api/deliveries/resend", {"job": job.id}), ("/api/destinations/out/echo", None),
                      ("/api/config/reload", None)]:
        for headers in ({}, {"Authorization": "Bearer wrong-token-wrong-token"}, {"Authorization": "Basic x"}):
            r = http.post(url, json=body, headers=headers)
            assert r.status_code == 401, (url, headers, r.text)
    assert (ledger.counts(), ledger.job(job.id)) == before
    assert http.get(f"/api/jobs/{job.id}/thumbnail/before").status_code == 401  # patient images: token only

    # with the token
    thumb = http.get(f"/api/jobs/{job.id}/thumbnail/after", headers=auth)
    assert thumb.status_code == 200 and thumb.content[:8] == b"\x89PNG\r\n\x1a\n"
    echo = http.post("/api/destinations/out/echo", headers=auth).json()
    assert echo["ok"] is True
    assert http.post("/api/destinations/pacs/echo", headers=auth).json()["ok"] is False
    assert http.post("/api/destinations/nope/echo", headers=auth).status_code == 404
    resent = http.post("/api/deliveries/resend", json={"job": job.id}, headers=auth).json()
    assert resent["queued"] == 3
    _wait(lambda: ledger.job(job.id).state == JobState.FAILED and len(ledger.deliveries(job_id=job.id, state="dead_letter")) == 3,
          what="the resent deliveries to dead-letter again")
    assert http.post(f"/api/jobs/{job.id}/cancel", headers=auth).status_code == 409  # failed already
    r = http.post(f"/api/jobs/{job.id}/reprocess", headers=auth)
    assert r.status_code == 200 and r.json()["was"] == "failed"
    _wait(lambda: ledger.job(job.id).state == JobState.FAILED and ledger.job(job.id).attempts == 1,
          what="the reprocessed job to finish")

    # metrics
    text = http.get("/metrics").text
    assert "dicomnode_instances_received_total 3.0" in text
    assert 'dicomnode_jobs{state="failed"} 1.0' in text
    assert 'dicomnode_deliveries{destination="pacs",state="dead_letter"} 3.0' in text
    assert 'dicomnode_stage_duration_seconds_count{stage="model"}' in text and "dicomnode_models_loaded 1.0" in text
    assert "dicomnode_received_bytes_total" in text and 'dicomnode_queue_depth{queue="jobs"} 0.0' in text
    calls = re.search(r'dicomnode_inference_calls_total\{device="cpu"\} (\d+)', text)
    assert calls and int(calls.group(1)) >= 1, text
    assert 'dicomnode_inference_calls_merged_total{device="cpu"} 0.0' in text  # one worker: nothing to merge

    # live config: an invalid file changes nothing and says why; a valid one applies without a restart
    good = config_path.read_text()
    config_path.write_text(good.replace("kind: clahe", "kind: clahey"))
    bad = http.post("/api/config/reload", headers=auth)
    assert bad.status_code == 422 and bad.json()["errors"][0]["key"] == "models.clahe.kind"
    assert [r.name for r in server.config.rules] == ["mr-only", "ct", "ct-any"]
    data = yaml.safe_load(good)
    data["rules"] = [{"name": "ct-only-out", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["out"]}]
    data["destinations"]["extra"] = {"folder": str(tmp_path / "extra")}
    data["node"]["port"] = free_port()
    config_path.write_text(yaml.safe_dump(data))
    plan = http.post("/api/config/reload", headers=auth).json()
    assert plan["sections_changed"] == ["rules", "destinations"] and plan["restart_required"] == ["node.port"]
    assert plan["destinations_rebuilt"] == ["extra"] and plan["models_loaded"] == []
    assert [r["name"] for r in http.get("/api/rules").json()["rules"]] == ["ct-only-out"]
    assert http.post("/api/destinations/extra/echo", headers=auth).json()["ok"] is True
    assert server.port != data["node"]["port"]  # the listening socket is untouched

    # the audit log: who, what, result; refusals too; no patient data
    entries = [json.loads(line) for line in (Path(server.config.storage.root) / AUDIT_FILE).read_text().splitlines()]
    actions = [(e["who"], e["action"], e["status"]) for e in entries]
    assert ("anonymous", "job.reprocess", 401) in actions and ("alice", "deliveries.resend", 200) in actions
    assert ("alice", "config.reload", 422) in actions and ("alice", "config.reload", 200) in actions
    assert all(e["peer"] == "127.0.0.1" for e in entries)
    assert http.get("/api/audit").json()["items"][0]["action"] == "destination.echo"

    # the web page renders every view
    for page in ("/", "/jobs", f"/jobs/{job.id}", "/rules", "/deliveries", "/destinations", "/models", "/audit"):
        r = http.get(page)
        assert r.status_code == 200 and "dicomnode" in r.text, page
    assert series_uid[-18:] in http.get("/").text


def test_non_loopback_reads_need_the_token(tmp_path: Path) -> None:
    from fastapi.testclient import TestClient

    from dicomnode.admin.api import AdminContext, create_app
    from dicomnode.admin.auth import Tokens
    from dicomnode.ledger import Ledger

    (tmp_path / "tokens").write_text(f"bob:{TOKEN}\n")
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump(node_yaml(tmp_path)))
    config = load_config(config_path)
    (tmp_path / "var").mkdir()
    ledger = Ledger(tmp_path / "var" / "ledger.sqlite3")
    ctx = AdminContext(config=config, ledger=ledger, tokens=Tokens(tmp_path / "tokens"))
    remote = TestClient(create_app(ctx), client=("192.0.2.7", 40000))
    assert remote.get("/healthz").status_code == 200
    assert remote.get("/api/jobs").status_code == 401 and remote.get("/").status_code == 401
    assert remote.get("/api/jobs", headers={"Authorization": f"Bearer {TOKEN}"}).json()["total"] == 0
    remote.cookies.set("dicomnode_token", TOKEN)
    assert remote.get("/").status_code == 200  # the page's cookie: viewing only
    assert remote.post("/api/jobs/1/cancel").status_code == 401  # never a change
    local = TestClient(create_app(ctx), client=("127.0.0.1", 40000))
    assert local.get("/api/jobs").status_code == 200


def test_admin_port_is_loopback_by_default() -> None:
    assert load_config(None).admin.host == "127.0.0.1"


def test_progress_of_long_jobs_is_logged_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    import logging

    from dicomnode.observe import ProgressBoard

    board = ProgressBoard(log_every=0.0)
    board.start(7, "1.2.3", frames_total=40, instances_total=2)
    with caplog.at_level(logging.INFO, logger="dicomnode.observe"):
        board.frames(7, 8)
        board.frames(7, 12)
        board.instances(7)
    assert board.get(7) == {**board.get(7), "frames_done": 20, "frames_total": 40, "instances_done": 1, "percent": 50.0}
    assert "job 7 series 1.2.3: 20 of 40 frames enhanced, 0 of 2 instances done" in caplog.text
    assert list(board.snapshot()) == [7]
    board.finish(7)
    assert board.get(7) is None and board.snapshot() == {}
