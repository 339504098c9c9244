"""Faults: a PACS down then up, dead letters and resend, and the node SIGKILLed at every stage.

All with ``dicomnode serve`` as a subprocess, dcmsend as the modality and storescp (``+uf``: every
re-delivery is kept as its own file) as the PACS. Accounting is by SOP Instance UID: every instance
the node acknowledged must end up at the PACS as exactly one distinct derived UID (re-deliveries of
the same UID after a crash are allowed: C-STORE of the same UID is idempotent at a PACS), or be
visibly failed in the ledger; no instance may vanish and no redo may invent new UIDs.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pydicom
import pytest

from conftest import require_tools
from reliability import LedgerView, NodeProcess, StoreSCP, dcmsend, free_port, node_config, tool_env, wait_until, write_series

pytestmark = pytest.mark.slow

def pacs_objects(folder: Path) -> list[pydicom.Dataset]:
    out = []
    for path in sorted(folder.glob("*")):
        if path.is_file() and not path.name.startswith("."):
            try:
                out.append(pydicom.dcmread(path, stop_before_pixels=True))
            except Exception:  # noqa: BLE001 - storescp may be writing it right now
                continue
    return out


def sources_of(objects: list[pydicom.Dataset]) -> set[str]:
    """The source SOP Instance UIDs the derived objects reference (SourceImageSequence)."""
    return {str(item.ReferencedSOPInstanceUID) for ds in objects for item in ds.get("SourceImageSequence", [])}


def _config(tmp: Path, node_port: int, pacs_port: int, **dispatch) -> dict:
    return node_config(
        tmp / "var", node_port,
        {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs_port, "timeout_seconds": 5}},
        node={"series_quiet_seconds": 1.5},
        dispatch={"max_attempts": 5, "backoff_initial_seconds": 0.3, "backoff_max_seconds": 1.0, **dispatch},
        log_file=tmp / "node.log",
    )


def test_pacs_down_retry_dead_letter_and_resend(tmp_path: Path) -> None:
    require_tools("dcmsend", "storescp")
    pacs_port, node_port = free_port(), free_port()
    pacs = StoreSCP(tmp_path / "pacs", port=pacs_port)
    ledger = LedgerView(tmp_path / "var")
    with NodeProcess(tmp_path, _config(tmp_path, node_port, pacs_port)) as node:
        # A: PACS down when the first series is ready; it comes up between retries -> delivered
        first = write_series(tmp_path / "in", "faults", "retry", 3)
        assert dcmsend(node_port, first).returncode == 0
        wait_until(lambda: ledger.retried() > 0, 30, 0.05, "a failed first attempt")
        pacs.start()
        wait_until(lambda: len(pacs_objects(pacs.folder)) >= 3 and ledger.settled(), 30, 0.2, "delivery after retry")
        assert ledger.jobs() == {"done": 1}
        assert len({o.SOPInstanceUID for o in pacs_objects(pacs.folder)}) == 3

        # B: PACS down for good -> dead letter after max_attempts, job failed, visible in status
        pacs.stop()
        second = write_series(tmp_path / "in", "faults", "dead", 2)
        assert dcmsend(node_port, second).returncode == 0
        wait_until(lambda: ledger.deliveries().get("dead_letter") == 2 and ledger.jobs().get("failed") == 1,
                   40, 0.2, "dead letters")
        attempts = {r[0] for r in ledger._rows("SELECT attempts FROM deliveries WHERE state='dead_letter'")}
        assert attempts == {5}
        status = json.loads(node.cli("status", "--json").stdout)
        assert status["deliveries"]["dead_letter"] == 2 and status["jobs"]["failed"] == 1
        assert all("Association" in d["last_error"] or "connect" in d["last_error"].lower()
                   for d in status["dead_letters"]), status["dead_letters"]

        # C: PACS back, `dicomnode resend` -> delivered, job done
        pacs.start()
        resent = node.cli("resend", "--all-dead")
        assert resent.returncode == 0 and resent.stdout.startswith("2 dead-lettered"), resent.stdout
        wait_until(lambda: ledger.settled() and ledger.jobs() == {"done": 2}, 30, 0.2, "delivery after resend")
    pacs.stop()
    objects = pacs_objects(pacs.folder)
    assert len({o.SOPInstanceUID for o in objects}) == 5
    assert sources_of(objects) == {str(pydicom.dcmread(p).SOPInstanceUID) for p in first + second}


def _kill_when(node: NodeProcess, predicate, what: str, timeout: float = 60) -> None:
    wait_until(predicate, timeout, 0.01, what)
    node.kill()


def test_sigkill_at_every_stage_loses_nothing(tmp_path: Path) -> None:
    """SIGKILL while receiving, after spooling, during enhancement and during sending; restart each time."""
    require_tools("dcmsend", "storescp")
    pacs_port, node_port = free_port(), free_port()
    cfg = _config(tmp_path, node_port, pacs_port, batch_size=4)
    node = NodeProcess(tmp_path, cfg)
    ledger = LedgerView(tmp_path / "var")
    sent: list[Path] = []
    observed: dict[str, str] = {}
    with StoreSCP(tmp_path / "pacs", port=pacs_port):
        # 1. while receiving: kill once part of a series is in; the modality resends what failed
        node.start()
        series = write_series(tmp_path / "in", "kill", "receiving", 40, rows=64, cols=64)
        sender = subprocess.Popen(["dcmsend", "-aet", "MODALITY", "-aec", "DICOMNODE", "127.0.0.1", str(node_port),
                                   *map(str, series)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  env=tool_env())
        _kill_when(node, lambda: len(ledger.instances()) >= 5, "first instances spooled")
        sender.wait(60)
        observed["receiving"] = f"{len(ledger.instances())} of {len(series)} instances in when killed"
        node.start()
        assert dcmsend(node_port, series).returncode == 0  # the sender retries the whole series
        sent += series

        # 2. after spooling: the whole series acknowledged, node killed before the series is quiet
        series = write_series(tmp_path / "in", "kill", "spooled", 5)
        assert dcmsend(node_port, series).returncode == 0
        node.kill()
        observed["spooled"] = str(ledger.jobs())
        sent += series
        node.start()

        # 3. during enhancement: kill while a job is processing
        series = write_series(tmp_path / "in", "kill", "enhancing", 30, rows=256, cols=256)
        assert dcmsend(node_port, series).returncode == 0
        _kill_when(node, lambda: ledger.jobs().get("processing", 0) > 0, "a job processing")
        observed["enhancing"] = str(ledger.jobs())
        sent += series

        # 4. during sending: the restarted node redoes that job and sends its outputs in batches of 4;
        #    kill once some are sent and others still pending
        base = ledger.deliveries().get("sent", 0)
        node.start()
        # (no job processing: on a loaded machine an earlier job's deliveries can satisfy the rest while the redo
        # still runs, and a second kill there is a second crash of the job, which quarantines it as poison)
        _kill_when(node, lambda: not ledger.jobs().get("processing", 0) and ledger.deliveries().get("sent", 0) > base
                   and ledger.deliveries().get("pending", 0), "deliveries half sent, no job processing")
        observed["sending"] = str(ledger.deliveries())

        # final restart: the ledger says what is left; wait until nothing is unfinished
        node.start()
        wait_until(ledger.settled, 120, 0.2, "all work settled after the last restart")
        node.stop()
        time.sleep(0.5)  # storescp children finish writing
    objects = pacs_objects(tmp_path / "pacs")
    expected = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sent}
    failed = ledger._rows("SELECT id, error FROM jobs WHERE state='failed'")
    assert not failed, failed  # nothing here is undeliverable: every job must end done
    assert ledger.instances() >= expected  # every instance sent was received...
    assert sources_of(objects) == expected  # ...and delivered as an enhanced object
    distinct = {o.SOPInstanceUID for o in objects}
    assert len(distinct) == len(expected), "a redo produced different UIDs for the same source"
    print(f"\nSIGKILL stages {observed}; {len(expected)} instances, {len(distinct)} distinct at the PACS, "
          f"{len(objects) - len(distinct)} re-deliveries of an already stored UID, 0 lost")
