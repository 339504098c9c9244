"""scripts/gpu_train.sh --dry-run: the one-command GPU training run (prepare, time-budgeted G and HQG-Net
training, export with a card, guidance cache, validation) works end to end on the CPU, so it is ready the
day a GPU is lent. Runs on a small synthetic CCM-shaped data set (the real one is ../shared, too slow here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def _texture(rng: np.random.Generator, bright: float) -> np.ndarray:
    yy, xx = np.mgrid[:96, :96]
    nerves = (np.sin(xx / 5.0 + rng.uniform(0, 6)) > 0.9).astype(np.float64) * 0.5
    return np.clip(bright + nerves + rng.normal(0, 0.05, (96, 96)) - 0.002 * ((yy - 48) ** 2 + (xx - 48) ** 2) / 10, 0, 1)


def _data(root: Path) -> Path:
    rng = np.random.default_rng(0)
    names = {"ccm/hq": [f"shOD{i:04d}_ns2corr.png" for i in range(8)], "ccm/lq": [f"shOD{i:04d}_raw.png" for i in range(8)]}
    pairs = [f"zxOS{i}_pair.png" for i in range(4)] + [f"shOD{100 + i}_pair.png" for i in range(4)]
    for folder, files in names.items():
        for name in files:
            (root / folder).mkdir(parents=True, exist_ok=True)
            img = _texture(rng, 0.3 if folder.endswith("hq") else 0.15)
            Image.fromarray((img * 255).astype(np.uint8)).save(root / folder / name)
    for name in pairs:
        img = _texture(rng, 0.3)
        for folder, arr in (("ccm/pairs/corrected", img), ("ccm/pairs/raw", img * 0.6)):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.fromarray((arr * 255).astype(np.uint8)).save(root / folder / name)
    return root


@pytest.mark.slow
def test_gpu_train_dry_run_trains_exports_and_validates(tmp_path: Path) -> None:
    data = _data(tmp_path / "data")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable, "OUT": str(out), "DATA": str(data), "GPU_WHEELS": str(tmp_path / "none"),
           "MINUTES": "0.08", "OMP_NUM_THREADS": "2"}
    run = subprocess.run(["bash", str(REPO / "scripts" / "gpu_train.sh"), "--dry-run"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-4000:]
    log = (out / "gpu_train.log").read_text()
    assert "== done (dry run on the CPU)" in log and "CUDA available: " in log
    # what a device call can bring back: at most 8 files, flat, 16 MiB each
    files = sorted(p.name for p in out.iterdir())
    assert files == sorted(["g-card.json", "gpu_train.log", "hqgnet-ccm.guidance-default.json", "hqgnet-ccm.json",
                            "hqgnet-ccm.pt", "hqgnet-log.csv", "validation.json"]), files
    assert all(p.is_file() and p.stat().st_size <= 16 * 2**20 for p in out.iterdir())
    card = json.loads((out / "hqgnet-ccm.json").read_text())
    assert card["config"]["name"] == "lite" and card["weights_dtype"] == "float16"
    # the budget ended both trainings (1,000,000 steps were asked for), checkpointed and exported
    assert 0 < card["iterations"] < 1_000_000 and 0 < card["g"]["iterations"] < 1_000_000
    assert "CPU" in card["hardware"]  # the card names what it trained on (a GPU lease: the GPU)
    assert "ccm" in json.loads((out / "validation.json").read_text())
