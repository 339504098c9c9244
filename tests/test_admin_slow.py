"""The admin surface against real outside programs (slow): Debian's Prometheus scraping ``dicomnode serve``, and
the web page driven in a real headless Chromium (selenium + Debian's chromium-driver).

The Chromium test keeps its screenshots in ``tests/artifacts/`` (ignored by git): the dashboard with the
processed series, a job's page with its before/after thumbnails, and the rule test dialog.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.ledger import JobState

from conftest import REPO, require_tools
from factories import free_port, node_with_admin_service, sample_series
from reliability import NodeProcess, dcmsend, node_config, wait_until

ARTIFACTS = REPO / "tests" / "artifacts"
TOKEN = "chromium-test-token-0123456789"


def ct_series(folder: Path, count: int) -> list[Path]:
    return sample_series("CT_small.dcm", folder, count, description="abdomen")


# ------------------------------------------------------------------------------------------- Prometheus
@pytest.mark.slow
def test_prometheus_scrapes_the_node(tmp_path: Path) -> None:
    require_tools("prometheus", "dcmsend")
    admin_port, prom_port = free_port(), free_port()
    config = node_config(tmp_path / "var", free_port(), {"out": {"folder": str(tmp_path / "out")}},
                         extra={"admin": {"host": "127.0.0.1", "port": admin_port}})
    files = ct_series(tmp_path / "in", 7)
    prom_config = tmp_path / "prometheus.yml"
    prom_config.write_text(yaml.safe_dump({
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": [{"job_name": "dicomnode", "static_configs": [{"targets": [f"127.0.0.1:{admin_port}"]}]}],
    }))
    with NodeProcess(tmp_path / "node", config) as node:
        wait_until(lambda: b"admin API" in Path(node.stderr_path).read_bytes(), 30, what="the admin port")
        prom = subprocess.Popen(["prometheus", f"--config.file={prom_config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{prom_port}"],
                                stdout=subprocess.DEVNULL, stderr=(tmp_path / "prometheus.log").open("wb"))
        try:
            sent = dcmsend(node.port, files)
            assert sent.returncode == 0, sent.stderr

            def query(expr: str) -> list[dict[str, Any]]:
                url = f"http://127.0.0.1:{prom_port}/api/v1/query?query={urllib.request.quote(expr)}"
                try:
                    with urllib.request.urlopen(url, timeout=5) as response:
                        return json.loads(response.read())["data"]["result"]
                except OSError:
                    return []

            def received() -> float | None:
                result = query("dicomnode_instances_received_total")
                return float(result[0]["value"][1]) if result else None

            wait_until(lambda: received() == len(files), 90, 0.5, what="Prometheus to report the instances received")
            assert received() == 7.0
            up = query('up{job="dicomnode"}')
            assert up and up[0]["value"][1] == "1"
            wait_until(lambda: bool(query('dicomnode_jobs{state="done"} == 1')), 90, 0.5, what="the job done in Prometheus")
            assert query('dicomnode_stage_duration_seconds_count{stage="model"}')[0]["value"][1] == "1"
            assert float(query("dicomnode_received_bytes_total")[0]["value"][1]) > sum(p.stat().st_size for p in files) * 0.9
        finally:
            prom.terminate()
            prom.wait(20)


# ------------------------------------------------------------------------------------------- Chromium
@pytest.fixture
def node_with_admin(tmp_path: Path) -> Any:
    (tmp_path / "tokens").write_text(f"web:{TOKEN}\n")
    config_path = tmp_path / "node.yaml"
    config_path.write_text(yaml.safe_dump({
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.5},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"viewer": {"folder": str(tmp_path / "out")},
                         "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port(), "timeout_seconds": 2}},
        "models": {"clahe": {"kind": "clahe"}},
        "rules": [{"name": "mr", "match": {"Modality": "MR"}, "model": "clahe", "destinations": ["viewer"]},
                  {"name": "ct", "match": {"Modality": "CT"}, "model": "clahe", "destinations": ["viewer", "pacs"]}],
        "dispatch": {"max_attempts": 1, "backoff_initial_seconds": 0.1},
        "admin": {"host": "127.0.0.1", "port": free_port(), "token_file": str(tmp_path / "tokens")},
    }))
    with node_with_admin_service(config_path) as (server, admin):
        yield server, admin


def _chromium() -> Any:
    require_tools("chromium", "chromedriver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or "chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1050",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=shutil.which("chromedriver")), options=options)


@pytest.mark.slow
def test_web_page_in_chromium(node_with_admin: Any, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    from dicomnode.tools.demo import send

    server, admin = node_with_admin
    files = ct_series(tmp_path / "in", 3)
    assert send(files, "127.0.0.1", server.port, "DICOMNODE") == [0, 0, 0]
    ledger = server.spool.ledger
    wait_until(lambda: any(j.state == JobState.FAILED for j in ledger.jobs()), 60, what="the job (dead letters to pacs)")
    job = ledger.jobs()[0]
    assert len(ledger.deliveries(job_id=job.id, state="dead_letter")) == 3

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    browser = _chromium()
    wait = WebDriverWait(browser, 30)
    try:
        browser.get(admin.url + "/")
        assert "Dashboard" in browser.title
        row = browser.find_element(By.CSS_SELECTOR, f"tr[data-job='{job.id}']")
        assert "ct" in row.text and "clahe" in row.text and "failed" in row.text
        browser.find_element(By.ID, "token-input").send_keys(TOKEN)
        browser.find_element(By.CSS_SELECTOR, "#token-form button[type=submit]").click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "token-state"), "token set"))

        # resend a dead letter by clicking
        browser.get(admin.url + "/deliveries")
        buttons = browser.find_elements(By.CSS_SELECTOR, "button.resend")
        assert len(buttons) == 3
        buttons[0].click()
        wait.until(ec.text_to_be_present_in_element((By.ID, "flash"), "back to pending"))
        assert "3 dead-lettered deliveries of job" in browser.find_element(By.ID, "flash").text
        audit = [e for e in admin.context.audit.recent() if e["action"] == "deliveries.resend"]
        assert audit and audit[0]["who"] == "web" and audit[0]["status"] == 200
        wait_until(lambda: len(ledger.deliveries(job_id=job.id, state="dead_letter")) == 3
                   and ledger.job(job.id).state == JobState.FAILED, 60, what="the resent deliveries to fail again")

        # the rule test dialog on the job
        browser.get(admin.url + "/rules")
        assert not browser.find_elements(By.CSS_SELECTOR, ".rule-verdict")
        browser.find_element(By.ID, "rule-test-open").click()
        browser.find_element(By.ID, "rule-test-job").send_keys(str(job.id))
        browser.find_element(By.ID, "rule-test-run").click()
        verdict = wait.until(ec.visibility_of_element_located((By.CSS_SELECTOR, ".rule-verdict")))
        assert "by rule ct" in verdict.text and "clahe" in verdict.text and "viewer, pacs" in verdict.text
        result = browser.find_element(By.ID, "rule-test-result").text
        assert "Modality" in result and "MR" in result  # why the rule before did not match
        browser.save_screenshot(str(ARTIFACTS / "admin-rule-test.png"))

        # the job's page with its thumbnails (the token is in the tab's session)
        browser.get(f"{admin.url}/jobs/{job.id}")
        wait.until(lambda b: all(img.get_attribute("src") for img in b.find_elements(By.CSS_SELECTOR, ".thumbs img")))
        assert all(b.execute_script("return arguments[0].naturalWidth", img) > 0
                   for b, img in ((browser, i) for i in browser.find_elements(By.CSS_SELECTOR, ".thumbs img")))
        browser.save_screenshot(str(ARTIFACTS / "admin-job.png"))

        browser.get(admin.url + "/")
        assert "Recent admin actions" in browser.page_source  # the page changed: the resend is listed
        browser.save_screenshot(str(ARTIFACTS / "admin-dashboard.png"))
    finally:
        browser.quit()
    assert (ARTIFACTS / "admin-dashboard.png").stat().st_size > 10_000


@pytest.mark.slow
def test_sighup_reloads_the_config(tmp_path: Path) -> None:
    import signal

    config = node_config(tmp_path / "var", free_port(), {"out": {"folder": str(tmp_path / "out")}},
                         extra={"admin": {"enabled": False}})
    with NodeProcess(tmp_path / "node", config) as node:
        assert node.proc is not None
        data = yaml.safe_load(node.config_path.read_text())
        data["rules"][0]["name"] = "ct-renamed"
        data["models"]["clahe"]["kind"] = "clahey"  # invalid first: nothing changes, the log says why
        node.config_path.write_text(yaml.safe_dump(data))
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config not reloaded, nothing changed" in node.stderr(), 30, what="the refusal")
        assert "models.clahe.kind" in node.stderr()
        data["models"]["clahe"]["kind"] = "clahe"
        node.config_path.write_text(yaml.safe_dump(data))
        node.proc.send_signal(signal.SIGHUP)
        wait_until(lambda: "config reloaded from" in node.stderr(), 30, what="the reload")
        sent = dcmsend(node.port, ct_series(tmp_path / "in", 2))
        assert sent.returncode == 0, sent.stderr
        wait_until(lambda: "rule 'ct-renamed'" in node.stderr(), 60, what="a series routed by the reloaded rule")
        assert node.alive()
