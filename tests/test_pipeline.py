"""One pipeline: the live node, `dicomnode enhance` and the demo give the same bytes for the same series."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from dicomnode.cli import main
from dicomnode.config import DEFAULT_CONFIG
from dicomnode.tools.demo import Sample, run_demo, synthetic_ccm

from conftest import require_tools
from factories import free_port, image_dataset, write
from reliability import NodeProcess, dcmsend


def _ccm_series(folder: Path) -> list[Path]:
    """A 2-instance corneal-confocal series (matched by the default rules' CCM rule)."""
    return [write(image_dataset((synthetic_ccm(seed=i) * 255).round().astype(np.uint8), study="same", series="ccm",
                                index=i, modality="OP", description="Corneal confocal microscopy"), folder / f"{i}.dcm")
            for i in range(2)]


def _site_config(root: Path, out: Path, port: int) -> dict:
    """The embedded default's models, rules and derive settings with a folder destination."""
    data = yaml.safe_load(DEFAULT_CONFIG.read_text())
    data["node"] = {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port, "series_quiet_seconds": 1.0}
    data["storage"] = {"root": str(root / "var")}
    data["destinations"] = {"out": {"folder": str(out)}}
    data["rules"] = [{**r, "destinations": ["out"]} for r in data["rules"]]
    data["logging"] = {"level": "INFO"}
    return data


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob("*.dcm"))}


@pytest.mark.slow
def test_live_node_offline_enhance_and_demo_give_identical_bytes(tmp_path: Path) -> None:
    require_tools("dcmsend")
    sources = _ccm_series(tmp_path / "series")

    live_out = tmp_path / "live"
    with NodeProcess(tmp_path / "node", _site_config(tmp_path / "node", live_out, free_port())) as node:
        assert dcmsend(node.port, sources).returncode == 0
        deadline = time.monotonic() + 180
        while len(list(live_out.glob("*.dcm"))) < 2 and time.monotonic() < deadline:
            time.sleep(0.2)
    live = _files(live_out)
    assert len(live) == 2

    offline_out = tmp_path / "offline"
    config_file = tmp_path / "site.yaml"
    config_file.write_text(yaml.safe_dump(_site_config(tmp_path / "cli", tmp_path / "unused", free_port())))
    assert main(["enhance", "--config", str(config_file), "--out", str(offline_out), *map(str, sources)]) == 0
    offline = _files(offline_out)

    sample = Sample("ccm", "CCM", "OP", True, files=sources)
    run_demo(tmp_path / "demo", samples=[sample], timeout=180, show_progress=False)
    demo = _files(tmp_path / "demo" / "dicom")

    assert live.keys() == offline.keys() == demo.keys()
    for name in live:
        assert live[name] == offline[name] == demo[name], f"{name} differs between the three paths"
