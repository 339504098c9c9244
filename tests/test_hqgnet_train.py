"""`dicomnode train pretrain-g` and `dicomnode train hqgnet` end to end, on real CCM / Kvasir images
from ../shared/data when present (synthetic look-alikes otherwise), tiny sizes and few steps."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from skimage.io import imsave

from dicomnode.cli import main
from models.hqgnet import GuidanceExtractor, hqgnet_lite
from models.registry import build_model
from models.train.common import export_weights, load_state_dict

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"  # as tests/conftest.py


def _synthetic(folder: Path, n: int, *, degraded: bool, rgb: bool = False, masks: Path | None = None, seed: int = 0) -> Path:
    """Nerve-like bright curves on dark ground; 'degraded' adds vignetting and noise (CCM-like LQ)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[0:96, 0:96] / 95.0
    for i in range(n):
        phase, freq = rng.random() * 6, 3 + rng.random() * 4
        lines = np.exp(-(((yy - 0.5 - 0.3 * np.sin(freq * xx + phase)) * 12) ** 2))
        img = 0.15 + 0.7 * lines
        if degraded:
            img = img * (1 - 0.7 * ((xx - 0.3) ** 2 + (yy - 0.4) ** 2)) + rng.normal(0, 0.05, img.shape)
        img = np.clip(img, 0, 1)
        if rgb:
            img = np.stack([img, img * 0.8, img * 0.6], axis=-1)
        imsave(folder / f"img{i:02d}.png", (img * 255).astype(np.uint8), check_contrast=False)
        if masks is not None:
            masks.mkdir(parents=True, exist_ok=True)
            imsave(masks / f"img{i:02d}.png", ((lines > 0.5) * 255).astype(np.uint8), check_contrast=False)
    return folder


@pytest.fixture(scope="module")
def ccm(tmp_path_factory) -> tuple[Path, Path]:
    """(HQ, LQ) folders: the lab's vignetting-corrected and raw CCM images, else synthetic ones."""
    hq, lq = SHARED_DATA / "ccm" / "vignetting_corrected", SHARED_DATA / "ccm" / "raw"
    if hq.is_dir() and lq.is_dir():
        return hq, lq
    root = tmp_path_factory.mktemp("ccm")
    return _synthetic(root / "hq", 8, degraded=False), _synthetic(root / "lq", 8, degraded=True, seed=1)


@pytest.fixture(scope="module")
def pretrained_g(ccm, tmp_path_factory) -> Path:
    hq, lq = ccm
    out = tmp_path_factory.mktemp("pretrain")
    rc = main(["train", "pretrain-g", "--hq", str(hq), "--lq", str(lq), "--out", str(out), "--size", "32",
               "--iterations", "30", "--batch-size", "4", "--val-every", "30", "--checkpoint-every", "30", "--seed", "3"])
    assert rc == 0
    return out / "hqgnet-g-lite.pt"


def _log(path: Path) -> list[dict[str, str]]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.slow
def test_pretrain_g_lowers_reconstruction_loss(pretrained_g):
    rows = _log(pretrained_g.parent / "log.csv")
    assert [int(r["step"]) for r in rows] == [10, 20, 30]
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])
    card = json.loads(pretrained_g.with_suffix(".json").read_text())
    assert card["kind"] == "hqgnet-g" and card["iterations"] == 30 and card["size"] == 32
    assert card["config"]["name"] == "lite" and card["training_data"]["hq"]["count"] > 0
    g = GuidanceExtractor(hqgnet_lite(card["channels"]))
    g.load_state_dict(load_state_dict(pretrained_g))  # strict: exactly G's keys
    assert (pretrained_g.parent / "samples" / "step_000030.png").is_file()


@pytest.mark.slow
def test_train_hqgnet_exports_loads_and_resumes(ccm, pretrained_g, tmp_path):
    hq, lq = ccm
    common = ["train", "hqgnet", "--lq", str(lq), "--hq", str(hq), "--g", str(pretrained_g), "--out", str(tmp_path),
              "--size", "64", "--val-every", "2", "--checkpoint-every", "2", "--modality", "CCM", "--name", "ccm"]
    assert main(common + ["--iterations", "4"]) == 0
    first = json.loads((tmp_path / "ccm.json").read_text())
    assert first["iterations"] == 4
    assert main(common + ["--iterations", "6", "--resume"]) == 0
    card = json.loads((tmp_path / "ccm.json").read_text())
    assert card["kind"] == "hqgnet" and card["name"] == "HQG-Net" and card["modality"] == "CCM"
    assert card["iterations"] == 6 and card["size"] == 64 and card["config"]["name"] == "lite"
    assert card["training_data"]["g_weights"]["sha256"] == json.loads(pretrained_g.with_suffix(".json").read_text())["weights_sha256"]
    assert {"haar", "fc", "gan", "e", "d"} <= set(card["final_losses"])
    assert len(card["hq_guidance_mean"]) == 64 and card["seconds"] > 0 and card["hardware"] and card["command"]
    assert [int(r["step"]) for r in _log(tmp_path / "log.csv")] == [4, 6]  # every 10 steps and at the end of each run
    assert sorted(p.name for p in (tmp_path / "samples").glob("*.png")) == ["step_000002.png", "step_000004.png", "step_000006.png"]
    assert torch.load(tmp_path / "checkpoint_last.pt", weights_only=False)["step"] == 6

    enh = build_model("hqgnet", weights=tmp_path / "ccm.pt", device="cpu")
    frame = np.random.default_rng(0).random((70, 50), dtype=np.float32)
    out = enh.enhance([frame], np.asarray(card["hq_guidance_mean"], dtype=np.float32))
    assert out[0].shape == (70, 50) and np.isfinite(out[0]).all()


@pytest.mark.slow
def test_bilevel_mode_trains_with_masks(tmp_path):
    kvasir = SHARED_DATA / "endoscopy" / "kvasir_seg"
    if (kvasir / "images").is_dir():
        lq, masks, hq = kvasir / "images", kvasir / "masks", SHARED_DATA / "endoscopy" / "frames"
    else:
        lq = _synthetic(tmp_path / "lq", 4, degraded=True, rgb=True, masks=tmp_path / "masks")
        masks, hq = tmp_path / "masks", _synthetic(tmp_path / "hq", 4, degraded=False, rgb=True)
    out = tmp_path / "run"
    assert main(["train", "hqgnet", "--lq", str(lq), "--hq", str(hq), "--masks", str(masks), "--out", str(out),
                 "--size", "64", "--iterations", "2", "--val-every", "2"]) == 0
    card = json.loads((out / "hqgnet-lite.json").read_text())
    assert card["name"] == "HQG-Net+" and card["loss_weights"]["lambda3"] == 5.0 and card["channels"] == 3
    losses = card["final_losses"]
    assert losses["total"] == pytest.approx(losses["seg"] + 5.0 * losses["e"], rel=1e-4)
    assert (out / "hqgnet-lite-segmenter.pt").is_file()


def test_mismatched_g_is_refused(tmp_path):
    hq = _synthetic(tmp_path / "hq", 2, degraded=False)
    lq = _synthetic(tmp_path / "lq", 2, degraded=True)
    cfg = hqgnet_lite(1)
    g_path = tmp_path / "g.pt"
    export_weights(g_path, GuidanceExtractor(cfg).state_dict(), {"kind": "hqgnet-g", "name": "G", "version": "t", "config": cfg.to_dict()})
    with pytest.raises(SystemExit, match="does not fit"):
        main(["train", "hqgnet", "--lq", str(lq), "--hq", str(hq), "--g", str(g_path), "--channels", "3",
              "--out", str(tmp_path / "run"), "--size", "32", "--iterations", "1"])
    with pytest.raises(SystemExit, match="multiple of 32"):
        main(["train", "hqgnet", "--lq", str(lq), "--hq", str(hq), "--out", str(tmp_path / "run"), "--size", "50"])
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no images"):
        main(["train", "pretrain-g", "--lq", str(lq), "--hq", str(tmp_path / "empty"), "--out", str(tmp_path / "run2"), "--size", "64"])


def test_backbones_start_from_torchvision_weights(tmp_path):
    from models.backbones.resnet import resnet18
    from models.train.hqgnet import init_from_torchvision

    tv = {k: (v + 0.25 if v.is_floating_point() else v) for k, v in resnet18().state_dict().items()}  # torchvision layout
    path = tmp_path / "resnet18.pth"
    torch.save(tv, path)
    g = resnet18(in_channels=1, num_classes=64)  # the paper's G backbone, gray
    init_from_torchvision(g, path, "--init-weights")
    torch.testing.assert_close(g.conv1.weight, tv["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(g.layer4[1].bn2.running_var, tv["layer4.1.bn2.running_var"])
    assert g.fc.out_features == 64  # our FC is kept, torchvision's classifier ignored
    lite = GuidanceExtractor(hqgnet_lite(1)).backbone  # half width: must be refused, not silently half-loaded
    with pytest.raises(SystemExit, match="does not fit"):
        init_from_torchvision(lite, path, "--init-weights")
    with pytest.raises(SystemExit, match="not found"):
        init_from_torchvision(lite, tmp_path / "missing.pth", "--encoder-weights")


def test_resume_keeps_the_checkpoints_architecture(tmp_path):
    from dataclasses import replace

    from models.train.hqgnet import resumed_config

    preset = hqgnet_lite(1)
    path = tmp_path / "checkpoint_last.pt"
    assert resumed_config(path, preset) == preset  # nothing to resume: the preset
    torch.save({"step": 5, "modules": {"net": {"gen.conv.0.weight": torch.zeros(1)}}, "extra": {}}, path)
    assert resumed_config(path, preset).norm == "none"  # written before the decoder normalisation existed
    stored = replace(preset, dec_channels=(32, 32, 64, 64))
    torch.save({"step": 5, "modules": {"net": {}}, "extra": {"config": stored.to_dict()}}, path)
    assert resumed_config(path, preset) == stored
