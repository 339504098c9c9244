"""executor: {kind: ray}: enhancement on Ray actors, the rest in the node.

The slow tests run a real Ray cluster on loopback (``ray start --head`` and a worker node, one CPU each; see
tests/raycluster.py), the node as a process with the shipped HQG-Net colour model, dcmtk as modality and PACS.
The fast one checks the node's side of "no actor answers": the job waits and runs again, nothing is failed.
"""

from __future__ import annotations

import json
import os
import re
import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode.config import parse_config
from dicomnode.ledger import JobState
from dicomnode.resident import ResidentModels
from dicomnode.server import Server, ServerOptions
from dicomnode.tools.demo import send
from models.registry import Enhancer, EnhancerUnavailable, ModelInfo

from conftest import require_tools
from factories import free_port, image_dataset, write
from installs import fundus_series
from raycluster import DRIVER_ENV, RayCluster, ray_available
from reliability import LedgerView, NodeProcess, StoreSCP, dcmsend, node_config, wait_until

SHIPPED = {"kind": "hqgnet", "weights": "builtin:hqgnet-color.pt",
           "guidance": {"OP": "builtin:hqgnet-color.guidance-OP.json"}}


# --------------------------------------------------------------------------- the node's side, no Ray


class Flaky(Enhancer):
    """An identity model whose executor is away for its first ``away`` calls."""

    def __init__(self, away: int) -> None:
        self.info = ModelInfo(kind="clahe", name="flaky", version="1")
        self.away = away
        self.calls = 0

    def enhance(self, images, guidance=None):
        self.calls += 1
        if self.calls <= self.away:
            raise EnhancerUnavailable("no Ray actor answered (test)")
        return [np.asarray(i, dtype=np.float32) for i in images]


def test_a_job_whose_executor_is_away_waits_and_runs_again_whole(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = parse_config({
        "node": {"host": "127.0.0.1", "port": free_port(), "series_quiet_seconds": 0.3},
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(out)}},
        "models": {"flaky": {"kind": "clahe"}},
        "rules": [{"name": "all", "model": "flaky", "destinations": ["out"], "gate": {"enabled": False}}],
        "executor": {"retry_seconds": 0.5},
    }, tmp_path)
    flaky = Flaky(away=2)
    server = Server(cfg, models=ResidentModels.single("flaky", flaky), options=ServerOptions(drain_seconds=5, dispatch_poll_seconds=0.1))
    server.start()
    try:
        rng = np.random.default_rng(0)
        files = [write(image_dataset(rng.integers(0, 255, (32, 32), dtype=np.uint8), study="away", index=i),
                       tmp_path / "src" / f"{i}.dcm") for i in range(3)]
        assert send(files, "127.0.0.1", server.port, "DICOMNODE") == [0, 0, 0]
        wait_until(lambda: len(list(out.glob("*.dcm"))) == 3, 30, what="3 outputs after the executor came back")
        (job,) = server.spool.ledger.jobs()
        assert job.state in (JobState.DERIVED, JobState.DONE), job
        assert flaky.calls >= 3  # two refused attempts, then the run that worked
        assert not server.spool.ledger.jobs(JobState.FAILED)
    finally:
        server.stop()


def _config(tmp_path: Path, **executor) -> object:
    return parse_config({"storage": {"root": str(tmp_path / "var")}, "destinations": {"out": {"folder": str(tmp_path / "out")}},
                         "models": {"hqgnet-color": SHIPPED},
                         "rules": [{"name": "op", "match": {"Modality": "OP"}, "model": "hqgnet-color", "destinations": ["out"]}],
                         "executor": executor}, tmp_path)


def test_executor_config_defaults_to_local_and_ray_changes_wait_for_a_restart(tmp_path: Path) -> None:
    from dicomnode import reconfig

    local = _config(tmp_path)
    assert local.executor.kind == "local" and local.executor.actors == 1
    ray_cfg = _config(tmp_path, kind="ray", address="127.0.0.1:6379", actors=2, num_gpus=1)
    plan = reconfig.plan(local, ray_cfg)
    assert {"executor.kind", "executor.address", "executor.actors", "executor.num_gpus"} <= set(plan.restart_required)
    assert plan.config.executor.kind == "local"  # the running node keeps its executor until restarted
    with pytest.raises(Exception, match="executor.actors"):
        _config(tmp_path, kind="ray", actors=0)


def test_without_ray_the_models_fail_with_the_reason_and_check_config_says_so(tmp_path: Path, monkeypatch) -> None:
    import importlib.util

    from dicomnode import executor
    from dicomnode.configerrors import environment_problems
    from models.registry import ModelLoadError

    cfg = _config(tmp_path, kind="ray")

    def no_ray():
        raise ModelLoadError("executor.kind is ray but Ray is not installed (test); pip install 'dicomnode[ray]'")

    monkeypatch.setattr(executor, "_ray", no_ray)
    models = executor.load_models(cfg)
    assert not models.models and "Ray is not installed" in models.failures["hqgnet-color"]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    assert ("executor.kind", "ray needs the Ray package on this node: pip install 'dicomnode[ray]'") in environment_problems(cfg)
    assert executor.portable_weights(cfg.models["hqgnet-color"].weights) == "builtin:hqgnet-color.pt"
    assert executor.portable_weights(tmp_path / "x.pt") == str(tmp_path / "x.pt")


# --------------------------------------------------------------------------- a real Ray cluster


@pytest.fixture(scope="module")
def cluster():
    if not ray_available():
        pytest.skip("needs Ray (pip install 'dicomnode[ray]'; `make setup` installs it)")
    with RayCluster(workers=1) as c:
        yield c


def _pacs_counts(folder: Path, sources: list[Path]) -> dict[str, int]:
    """sent / delivered / lost / duplicated, from what the PACS holds (storescp +uf keeps every copy)."""
    refs: list[str] = []
    sops: list[str] = []
    for path in folder.iterdir():
        if path.is_file() and not path.name.startswith("."):
            try:
                ds = pydicom.dcmread(path, stop_before_pixels=True)
            except Exception:  # noqa: BLE001 - storescp temp file
                continue
            sops.append(str(ds.SOPInstanceUID))
            refs += [str(i.ReferencedSOPInstanceUID) for i in ds.get("SourceImageSequence", [])]
    sent = {str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    return {"sent": len(sent), "delivered": len(set(sops)), "lost": len(sent - set(refs)),
            "duplicated": len(sops) - len(set(sops))}


def _ray_node(tmp_path: Path, cluster: RayCluster, pacs: StoreSCP, *, actors: int, batch_size: int = 4) -> NodeProcess:
    cfg = node_config(tmp_path / "var", free_port(), {"pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
                      models={"hqgnet-color": {**SHIPPED, "batch_size": batch_size}},
                      rules=[{"name": "fundus", "match": {"Modality": "OP"}, "model": "hqgnet-color", "destinations": ["pacs"]}],
                      extra={"executor": {"kind": "ray", "address": cluster.address, "actors": actors, "num_cpus": 1,
                                          "retries": 3, "call_timeout_seconds": 120, "start_timeout_seconds": 180}})
    return NodeProcess(tmp_path / "node", cfg, env=DRIVER_ENV)


@contextmanager
def _started(node: NodeProcess) -> Iterator[NodeProcess]:
    node.start(timeout=240)  # actors are placed and load their model before the node listens
    try:
        yield node
    finally:
        node.stop()


@pytest.mark.slow
def test_ray_actors_enhance_a_series_through_the_node(tmp_path: Path, cluster: RayCluster) -> None:
    require_tools("dcmsend", "storescp")
    sources = fundus_series(tmp_path / "study", 4, study="ray-study")
    with StoreSCP(tmp_path / "pacs") as pacs, _started(_ray_node(tmp_path, cluster, pacs, actors=2)) as node:
        assert re.search(r"model hqgnet-color \(hqgnet\) on 2 Ray actor\(s\)", node.stderr()), node.stderr()[-3000:]
        assert dcmsend(node.port, sources).returncode == 0
        wait_until(lambda: _pacs_counts(pacs.folder, sources)["delivered"] == 4, 300, what=f"4 at the PACS\n{node.stderr()[-3000:]}")
        wait_until(LedgerView(tmp_path / "var").settled, 60, what="the ledger settled")
    counts = _pacs_counts(tmp_path / "pacs", sources)
    assert counts == {"sent": 4, "delivered": 4, "lost": 0, "duplicated": 0}
    ds = pydicom.dcmread(next(p for p in (tmp_path / "pacs").iterdir() if p.suffix != ".log" and p.is_file()))
    assert "HQG-Net" in str(ds.DerivationDescription)


@pytest.mark.slow
def test_killing_the_actor_mid_series_loses_and_duplicates_nothing(tmp_path: Path, cluster: RayCluster) -> None:
    require_tools("dcmsend", "storescp")
    count = 10
    sources = fundus_series(tmp_path / "study", count, study="ray-fault", size=320)
    with StoreSCP(tmp_path / "pacs") as pacs, _started(_ray_node(tmp_path, cluster, pacs, actors=1, batch_size=1)) as node:
        started = re.search(r"Ray actor\(s\) in [\d.]+ s: pid (\d+) on", node.stderr())
        assert started, node.stderr()[-3000:]
        pid = int(started.group(1))
        assert dcmsend(node.port, sources).returncode == 0
        outgoing = tmp_path / "var" / "outgoing"
        wait_until(lambda: len(list(outgoing.rglob("*.dcm"))) >= 2, 300, interval=0.05, what="the series under way")
        written_before = len(list(outgoing.rglob("*.dcm")))
        os.kill(pid, signal.SIGKILL)  # the actor's worker process, as an OOM kill or a crashed GPU driver would
        wait_until(lambda: _pacs_counts(pacs.folder, sources)["delivered"] >= count, 300,
                   what=f"{count} at the PACS\n{node.stderr()[-3000:]}")
        wait_until(LedgerView(tmp_path / "var").settled, 60, what="the ledger settled")
        time.sleep(1.0)  # anything sent twice would arrive now
        log = node.stderr()
    counts = _pacs_counts(tmp_path / "pacs", sources)
    resent = len(re.findall(r"sending it again", log))
    print("\nray fault test:", json.dumps({**counts, "outputs_before_kill": written_before, "parts_resent": resent}))
    assert written_before < count, "the series finished before the kill: not a mid-series fault"
    assert resent >= 1, log[-3000:]
    assert counts == {"sent": count, "delivered": count, "lost": 0, "duplicated": 0}
    jobs = LedgerView(tmp_path / "var").job_records()
    assert [j.state for j in jobs] == [JobState.DONE] and not jobs[0].error
