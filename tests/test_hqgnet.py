"""HQG-Net networks, torchvision-layout backbones, the registry builder and `models info`."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.backbones.resnet import load_torchvision_state_dict, resnet18, resnet50
from models.hqgnet import (
    AdaLIN,
    GuidanceAutoEncoder,
    HQGNetConfig,
    LossWeights,
    build_discriminator,
    build_hqgnet,
    clamp_rho_,
    enhancement_loss,
    hqgnet_lite,
    hqgnet_paper,
)
from models.losses.gan import discriminator_loss
from models.registry import ModelLoadError, build_model, load_checkpoint
from models.train.common import export_weights


def _torchvision_like(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A state dict with torchvision's keys and shapes, random values (what a .pth from torchvision holds)."""
    g = torch.Generator().manual_seed(0)
    out = {}
    for k, v in model.state_dict().items():
        if not v.is_floating_point():
            out[k] = v.clone()
        elif k.endswith("running_var"):
            out[k] = torch.rand(v.shape, generator=g) + 0.5  # variances are positive
        else:
            out[k] = torch.randn(v.shape, generator=g) * 0.1
    return out


@pytest.fixture(scope="module")
def r50() -> torch.nn.Module:
    return resnet50()


def test_resnet_state_dict_layout_is_torchvisions(r50):
    r18 = resnet18()
    sd50, sd18 = r50.state_dict(), r18.state_dict()
    # torchvision's published parameter counts with the 1000-class fc.
    assert sum(p.numel() for p in r50.parameters()) == 25_557_032
    assert sum(p.numel() for p in r18.parameters()) == 11_689_512
    for key, shape in {
        "conv1.weight": (64, 3, 7, 7),
        "layer1.0.conv1.weight": (64, 64, 1, 1),
        "layer1.0.downsample.0.weight": (256, 64, 1, 1),
        "layer4.2.bn3.running_var": (2048,),
        "layer4.2.bn3.num_batches_tracked": (),
        "fc.weight": (1000, 2048),
    }.items():
        assert tuple(sd50[key].shape) == shape, key
    assert tuple(sd18["layer4.1.bn2.weight"].shape) == (512,)
    assert "layer1.0.conv3.weight" not in sd18


def test_load_torchvision_state_dict_strict(r50, tmp_path):
    tv50 = _torchvision_like(r50)
    torch.save(tv50, tmp_path / "resnet50.pth")
    gray50 = load_torchvision_state_dict(resnet50(in_channels=1, num_classes=None), tmp_path / "resnet50.pth")
    torch.testing.assert_close(gray50.conv1.weight, tv50["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(gray50.state_dict()["layer4.2.bn3.running_var"], tv50["layer4.2.bn3.running_var"])
    with pytest.raises(ValueError, match="not a matching torchvision ResNet"):
        load_torchvision_state_dict(resnet18(), tv50)


def test_gray_adapted_resnet_equals_rgb_on_repeated_image():
    tv18 = _torchvision_like(resnet18())
    rgb = load_torchvision_state_dict(resnet18(num_classes=16), tv18).eval()  # fc differs: ignored
    gray = load_torchvision_state_dict(resnet18(in_channels=1, num_classes=None), tv18).eval()
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(gray(x)[3], rgb(x.repeat(1, 3, 1, 1))[3], rtol=1e-4, atol=1e-4)


def test_resnet_features_strides():
    f = resnet18(in_channels=1, base_width=16, num_classes=None)(torch.rand(1, 1, 64, 96))
    assert [t.shape[1:] for t in f] == [(16, 16, 24), (32, 8, 12), (64, 4, 6), (128, 2, 3)]


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("hw", [(32, 32), (45, 70), (96, 64)])
def test_enhance_shapes_and_range_any_size(channels, hw):
    torch.manual_seed(0)
    net = build_hqgnet(hqgnet_lite(channels)).eval()
    torch.nn.init.normal_(net.gen.out.weight, std=0.5)  # away from the identity start
    x = torch.rand(2, channels, *hw)
    with torch.no_grad():
        v = net.extract_guidance(torch.rand(1, channels, 50, 40))
        out = net.enhance(x, v)
    assert v.shape == (1, 64)
    assert out.shape == x.shape
    assert 0.0 <= out.min() and out.max() <= 1.0
    assert not torch.allclose(out, x)


def test_generator_starts_as_identity():
    net = build_hqgnet(hqgnet_lite(1)).eval()
    x = torch.rand(1, 1, 64, 64) * 0.9 + 0.05
    with torch.no_grad():
        out = net.enhance(x, torch.zeros(1, 64))
    torch.testing.assert_close(out, x, atol=1e-5, rtol=1e-5)


def test_rho_stays_in_unit_interval():
    ada = AdaLIN(4, 80, hidden=8)
    opt = torch.optim.SGD(ada.parameters(), lr=10.0)
    x, cond = torch.randn(2, 4, 8, 8), torch.randn(2, 80)
    (-(ada.rho.sum()) * 100).backward()  # pushes rho far above 1
    opt.step()
    assert ada.rho.max() > 1  # the raw parameter left [0, 1] ...
    out_pushed = ada(x, cond)
    with torch.no_grad():
        ada.rho.fill_(1.0)
    torch.testing.assert_close(out_pushed, ada(x, cond))  # ... but forward used the clamped value
    with torch.no_grad():
        ada.rho.fill_(-3.0)
    clamp_rho_(ada)
    assert ada.rho.min() >= 0 and ada.rho.max() <= 1
    assert torch.all(AdaLIN(3, 80).rho == 0.5)  # paper: initialised at 0.5


def test_adalin_mixes_instance_and_layer_norm():
    ada = AdaLIN(3, 80, hidden=0)
    x = torch.randn(2, 3, 5, 5) * 4 + 2
    cond = torch.zeros(2, 80)  # gamma = 1, beta = 0 (weights are tiny, bias 0)
    torch.nn.init.zeros_(ada.gamma.weight), torch.nn.init.zeros_(ada.beta.weight)
    with torch.no_grad():
        ada.rho.fill_(1.0)
    y = ada(x, cond)
    torch.testing.assert_close(y.mean(dim=(2, 3)), torch.zeros(2, 3), atol=1e-5, rtol=0)
    with torch.no_grad():
        ada.rho.fill_(0.0)
    y = ada(x, cond)
    torch.testing.assert_close(y.mean(dim=(1, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)


def test_gradients_reach_every_parameter_group():
    torch.manual_seed(0)
    cfg = hqgnet_lite(1)
    net, disc = build_hqgnet(cfg), build_discriminator(cfg)
    net.g.requires_grad_(False)
    # Zero-initialised layers (the last conv of the head, the last BN of each residual block) stop
    # gradients at step 0 by design; give them values so the test sees the whole graph.
    torch.nn.init.normal_(net.gen.out.weight, std=0.01)
    for m in net.gen.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            torch.nn.init.ones_(m.weight)
    y, z = torch.rand(2, 1, 64, 64), torch.rand(2, 1, 64, 64)
    y.requires_grad_(True)
    x_hat, v_c = net.gen(y, net.g(z))
    losses = enhancement_loss(net, y, x_hat, v_c, disc(x_hat), LossWeights())
    (losses["e"] + discriminator_loss(disc(z), disc(x_hat.detach()))).backward()
    groups = {"encoder": net.gen.encoder, "FC_e": net.gen.encoder.fc, "decoder": net.gen.conv, "VIN": net.gen.vin, "head": net.gen.field, "D": disc}
    for name, module in groups.items():
        for pname, p in module.named_parameters():
            assert p.grad is not None and p.grad.abs().sum() > 0, f"{name}.{pname} got no gradient"
    assert all(p.grad is None for p in net.g.parameters())  # frozen G ...
    assert y.grad is not None  # ... while gradients still flow through the graph

    ae = GuidanceAutoEncoder(cfg, 64)
    ae(torch.rand(2, 1, 64, 64)).mean().backward()
    assert all(p.grad is not None for p in ae.g.parameters())


def test_config_round_trip_and_errors():
    cfg = hqgnet_lite(3)
    assert HQGNetConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ValueError, match="unknown HQG-Net config keys"):
        HQGNetConfig.from_dict({**cfg.to_dict(), "bogus": 1})
    with pytest.raises(ValueError, match="channels"):
        HQGNetConfig(channels=2)
    # Cards written before the decoder normalisation existed rebuild the un-normalised network.
    old = HQGNetConfig.from_dict({k: v for k, v in cfg.to_dict().items() if k != "norm"})
    assert cfg.norm == "group" and old.norm == "none"
    assert not any(isinstance(m, torch.nn.GroupNorm) for m in build_hqgnet(old).modules())
    assert any(isinstance(m, torch.nn.GroupNorm) for m in build_hqgnet(cfg).gen.modules())
    with pytest.raises(ValueError, match="multiples of 32"):
        build_hqgnet(cfg).gen(torch.rand(1, 3, 40, 64), torch.zeros(1, 64))


def test_paper_config_lands_near_table_iv():
    from dicomnode.cli.modelinfo import measure

    rows = {name: (p, m) for name, p, m, _ in measure("hqgnet", 384)}
    params = rows["G"][0] + rows["E_gen"][0]
    macs = rows["G"][1] + rows["E_gen"][1]
    assert params == pytest.approx(66.42, rel=0.03)
    assert macs == pytest.approx(87.33, rel=0.03)
    assert rows["G"][0] == pytest.approx(11.21, abs=0.01)  # ResNet-18 + FC(512 -> 64)
    assert hqgnet_paper().cond_dim == 80


def _export(tmp_path, net, channels=1, size=64):
    card = {"kind": "hqgnet", "name": "HQG-Net", "version": "test", "config": net.cfg.to_dict(), "channels": channels, "size": size}
    path = tmp_path / "hqgnet.pt"
    export_weights(path, net.state_dict(), card)
    return path


def test_save_load_identical_outputs(tmp_path):
    torch.manual_seed(1)
    net = build_hqgnet(hqgnet_lite(1))
    torch.nn.init.normal_(net.gen.out.weight, std=0.1)
    net.eval()
    path = _export(tmp_path, net)
    raw = {"clip_guard": False}  # the network's own output (random weights make fields the guard would soften)
    enh = build_model("hqgnet", weights=path, device="cpu", options=raw)
    assert enh.uses_guidance and enh.info.kind == "hqgnet" and enh.info.weights_sha256
    rng = np.random.default_rng(0)
    hq = rng.random((64, 64), dtype=np.float32)
    frames = [rng.random((50, 70), dtype=np.float32), rng.random((64, 64), dtype=np.float32), rng.random((50, 70), dtype=np.float32)]
    guidance = enh.extract_guidance([hq])
    assert guidance.shape == (1, 64) and guidance.dtype == np.float32
    with torch.no_grad():
        want_v = net.extract_guidance(torch.from_numpy(hq)[None, None])
        torch.testing.assert_close(torch.from_numpy(guidance), want_v, rtol=1e-5, atol=1e-5)
        out = enh.enhance(frames, guidance)
        for f, o in zip(frames, out):
            want = net.enhance(torch.from_numpy(f)[None, None], want_v)[0, 0].numpy()
            assert o.shape == f.shape and o.dtype == np.float32
            np.testing.assert_allclose(o, want, atol=1e-5)
    again = load_checkpoint(path, device="cpu", options=raw).enhance(frames, guidance)
    for a, b in zip(out, again):
        np.testing.assert_array_equal(a, b)


def test_enhancer_channel_mismatch_and_errors(tmp_path):
    torch.manual_seed(2)
    net = build_hqgnet(hqgnet_lite(1))
    torch.nn.init.normal_(net.gen.out.weight, std=0.1)
    enh = build_model("hqgnet-lite", weights=_export(tmp_path, net.eval()), device="cpu")
    rgb = np.random.default_rng(0).random((40, 48, 3), dtype=np.float32)
    g = enh.extract_guidance([rgb])
    out = enh.enhance([rgb, rgb[..., 0]], g)
    assert out[0].shape == (40, 48, 3) and out[1].shape == (40, 48)
    assert 0 <= out[0].min() and out[0].max() <= 1
    with pytest.raises(ValueError, match="needs a guidance vector"):
        enh.enhance([rgb])
    with pytest.raises(ValueError, match="guidance must have shape"):
        enh.enhance([rgb], np.zeros(10, dtype=np.float32))


def test_builder_refuses_missing_and_corrupt_weights(tmp_path):
    with pytest.raises(ModelLoadError, match="not found"):
        build_model("hqgnet", weights=tmp_path / "none.pt", device="cpu")
    with pytest.raises(ModelLoadError, match="needs trained weights"):
        build_model("hqgnet", device="cpu")
    path = _export(tmp_path, build_hqgnet(hqgnet_lite(1)))
    with open(path, "r+b") as fh:
        fh.seek(200)
        fh.write(b"\x00garbage\x00")
    with pytest.raises(ModelLoadError, match="corrupt"):
        build_model("hqgnet", weights=path, device="cpu")


def test_models_info_prints_parts(capsys):
    from dicomnode.cli import main

    assert main(["models", "info", "hqgnet-lite", "--size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = [line.split()[0] for line in lines[1:]]
    assert names == ["G", "E_gen", "discriminator", "total"]
    total = lines[-1].split()
    g, e = lines[1].split(), lines[2].split()
    assert float(total[1]) == pytest.approx(float(g[1]) + float(e[1]), abs=0.011)
    assert "M params" in lines[-1] and "G MACs" in lines[-1]
    assert main(["models", "info", "hqgnet", "--size", "384"]) == 0
    assert "published" in capsys.readouterr().out


def test_field_smoothing_low_passes_the_correction_and_names_itself() -> None:
    """Smoothed fields vary less from pixel to pixel; the option is a pixel option (it reaches the derived UIDs)."""
    import torch

    from models.hqgnet import HQGNet, HQGNetConfig

    torch.manual_seed(0)
    net = HQGNet(HQGNetConfig(name="lite", channels=1, head="affine")).eval()
    with torch.no_grad():
        net.gen.out.weight.normal_(0, 0.05)  # a non-identity head, so the fields have structure to smooth
        x = torch.rand(1, 1, 96, 128)
        v = torch.randn(1, net.cfg.guidance_dim)
        raw = net.correction(x, v)
        smooth = net.correction(x, v, smooth=0.1)
    assert raw.shape == smooth.shape
    roughness = lambda f: (f[..., 1:, :] - f[..., :-1, :]).abs().mean()  # noqa: E731
    assert roughness(smooth) < 0.5 * roughness(raw)
    assert torch.allclose(raw.mean(), smooth.mean(), atol=0.02)  # the overall correction is kept


@pytest.mark.parametrize("batch_size", [1, 3])
def test_a_frames_pixels_do_not_depend_on_its_neighbours(batch_size: int) -> None:
    """One frame alone, first of two and last of four gives the same bits (kernels pick algorithms by batch shape;
    an identical request must give identical pixels and the same derived UIDs)."""
    from dicomnode import guidance as gd
    from dicomnode.configtypes import builtin_dir
    from models.hqgnet_enhancer import build

    enh = build(weights=builtin_dir() / "hqgnet-ccm.pt", device="cpu", options={"batch_size": batch_size})
    assert enh.info.options["batch_size"] == batch_size
    vec = gd.load(builtin_dir() / "hqgnet-ccm.guidance-default.json").vector
    rng = np.random.default_rng(3)
    frames = [np.clip(rng.normal(0.4, 0.15, (96, 128)), 0, 1).astype(np.float32) for _ in range(4)]
    alone = enh.enhance(frames[:1], vec)[0]
    assert np.array_equal(alone, enh.enhance(frames[:2], vec)[0])
    assert np.array_equal(alone, enh.enhance(frames[1:] + frames[:1], vec)[3])


def test_a_large_frame_at_the_working_resolution_matches_native_inference_without_seams() -> None:
    """A 1200 x 900 fundus photograph through the shipped colour model at its working side (512) against the
    same model at native resolution: close (the correction is a smooth field carried back to full size) and
    continuous (no tile borders: the difference between the two never jumps from one pixel to the next)."""
    from skimage.data import retina
    from skimage.transform import resize

    from dicomnode import guidance as gd
    from dicomnode.configtypes import builtin_dir
    from models.hqgnet_enhancer import build
    from models.metrics import psnr

    img = resize(retina(), (900, 1200), anti_aliasing=True).astype(np.float32)
    vec = gd.load(builtin_dir() / "hqgnet-color.guidance-OP.json").vector
    work = build(weights=builtin_dir() / "hqgnet-color.pt", device="cpu", options={})
    native = build(weights=builtin_dir() / "hqgnet-color.pt", device="cpu", options={"max_side": None})
    assert work.max_side == 512
    a, b = work.enhance([img], vec)[0], native.enhance([img], vec)[0]
    assert a.shape == b.shape == img.shape
    agreement = psnr(a, b)
    assert agreement > 38.0, f"working-resolution output {agreement:.1f} dB from native inference"
    diff = a - b
    assert np.abs(np.diff(diff, axis=0)).max() < 0.06 and np.abs(np.diff(diff, axis=1)).max() < 0.06
    assert np.abs(a - img).mean() > 0.01  # the model did change the frame


def test_clip_guard_keeps_a_region_from_burning_out_and_leaves_the_rest() -> None:
    """A contrast stretch whose pivot lies below a bright corner's intensities would paint the corner
    white; the guard softens the fields there (the corner keeps its structure) and nowhere else."""
    from models.hqgnet import apply_fields, limit_fields

    rng = np.random.default_rng(0)
    h = w = 64
    x = np.full((1, 1, h, w), 0.4, np.float32)
    x[..., :20, :20] = 0.75  # a bright corner
    x += rng.normal(0, 0.03, x.shape).astype(np.float32)  # texture
    x = torch.from_numpy(np.clip(x, 0, 1))
    fields = torch.zeros(1, 2, h, w)
    fields[:, 0] = float(np.log(2.5))  # gain 2.5 around a pivot of 0.5: fine at 0.4, past white at 0.75
    fields[:, 1] = -0.75
    with torch.no_grad():
        raw = apply_fields(x, fields)
        guarded_fields = limit_fields(x, fields, sigma=3.0)
        guarded = apply_fields(x, guarded_fields)
    corner = (slice(4, 16), slice(4, 16))
    assert (raw[0, 0][corner] >= 1.0).float().mean() > 0.9  # burnt out without the guard
    assert (guarded[0, 0][corner] >= 1.0).float().mean() < 0.05
    assert guarded[0, 0][corner].std() > 0.5 * x[0, 0][corner].std()  # its texture is still there
    assert torch.allclose(guarded_fields[..., 40:60, 40:60], fields[..., 40:60, 40:60])  # untouched where it fits
    assert torch.allclose(guarded[..., 40:60, 40:60], raw[..., 40:60, 40:60])

    rgb = x.repeat(1, 3, 1, 1)
    rgb[:, 0] *= 0.8  # the channels differ, so their limits differ
    f3 = torch.cat([fields[:, :1].repeat(1, 3, 1, 1), fields[:, 1:].repeat(1, 3, 1, 1)], dim=1)
    g3 = limit_fields(rgb, f3, sigma=3.0)
    t = (g3[:, 3:] / f3[:, 3:])  # offsets scale by the blend t
    assert torch.allclose(t[:, 0], t[:, 1]) and torch.allclose(t[:, 1], t[:, 2])  # one blend per pixel: no tint
    with pytest.raises(ValueError, match="do not match"):
        limit_fields(x, f3, sigma=3.0)

    # a field of view's black surround is not a dark region: darkening the disc by 0.1 is left alone up to its rim
    yy, xx = np.mgrid[:h, :w]
    disc = torch.from_numpy(((yy - 32) ** 2 + (xx - 32) ** 2 < 28**2).astype(np.float32))
    eye = (0.3 + 0.02 * torch.from_numpy(rng.standard_normal((h, w)).astype(np.float32))) * disc
    darker = torch.zeros(1, 2, h, w)
    darker[:, 1] = -0.1
    kept = limit_fields(eye[None, None], darker, sigma=3.0)
    assert torch.allclose(kept[0, :, disc > 0], darker[0, :, disc > 0])


def test_clip_guard_has_no_edge_around_a_region_the_source_already_clips() -> None:
    """A bright optic disc already at white: the correction cannot brighten it without clipping, so the
    guard holds it back there, but smoothly; switching it off at the disc's edge drew a hard ellipse."""
    from models.hqgnet import limit_fields

    h = w = 96
    yy, xx = np.mgrid[:h, :w]
    disc = ((yy - 48) ** 2 + (xx - 48) ** 2 < 16**2)
    x = torch.from_numpy(np.where(disc, 1.0, 0.6).astype(np.float32))[None, None]
    fields = torch.zeros(1, 2, h, w)
    fields[:, 0] = float(np.log(1.3))  # brighten everything by 30 %
    guarded = limit_fields(x, fields, sigma=4.0)
    log_gain = guarded[0, 0]
    step = max(float((log_gain[1:] - log_gain[:-1]).abs().max()), float((log_gain[:, 1:] - log_gain[:, :-1]).abs().max()))
    assert step < 0.05 * float(np.log(1.3)) * 4  # no jump: at most ~a fifth of the correction per pixel
    assert float(log_gain[48, 48]) < 0.2 * float(np.log(1.3))  # held back on the disc
    assert float(log_gain[5, 5]) > 0.9 * float(np.log(1.3))  # full correction far from it


def test_clip_guard_is_a_pixel_option(tmp_path) -> None:
    """On by default and named in the options (provenance, derived UIDs); ``clip_guard: false`` is named by
    its absence, as before the guard existed; anything but a bool is refused."""
    from models.hqgnet import HQGNet, HQGNetConfig

    net = HQGNet(HQGNetConfig(name="lite", channels=1, head="affine"))
    path = tmp_path / "m.pt"
    export_weights(path, net.state_dict(), {"kind": "hqgnet", "name": "HQG-Net", "version": "t", "config": net.cfg.to_dict(),
                                            "channels": 1, "size": 64})
    assert build_model("hqgnet", weights=path, device="cpu").info.options["clip_guard"] is True
    off = build_model("hqgnet", weights=path, device="cpu", options={"clip_guard": False})
    assert "clip_guard" not in off.info.options and off.clip_guard is False
    with pytest.raises(ModelLoadError, match="clip_guard"):
        build_model("hqgnet", weights=path, device="cpu", options={"clip_guard": "yes"})


def test_wide_blurs_run_coarse_and_agree_with_the_direct_kernel() -> None:
    """Field smoothing and the clip guard blur with sigmas of 20-50 px; those run on block means and must
    match the direct 6-sigma kernel (edges, odd sizes and the replicated border included)."""
    from models.hqgnet import _direct_blur, gaussian_blur

    rng = np.random.default_rng(1)
    h, w = 301, 389  # not multiples of any block size
    yy, xx = np.mgrid[:h, :w]
    img = 0.3 + 0.4 * (((yy - 150) ** 2 + (xx - 180) ** 2) < 120**2) + 0.2 * (xx > 350)
    img = np.clip(img + rng.normal(0, 0.05, img.shape), 0, 1).astype(np.float32)
    x = torch.from_numpy(img)[None, None].repeat(1, 2, 1, 1)
    for sigma in (9.6, 25.6, 38.4):
        err = (gaussian_blur(x, sigma) - _direct_blur(x, sigma)).abs()
        assert float(err.max()) < 4e-3 and float(err.mean()) < 5e-4, (sigma, float(err.max()), float(err.mean()))


def test_clip_guard_at_a_working_scale_window() -> None:
    """The bright-corner case at the CCM working size, where the guard's window (0.1 x 384 px) takes the
    coarse path: the corner still keeps its texture and the rest keeps its correction."""
    from models.hqgnet import apply_fields, limit_fields

    rng = np.random.default_rng(0)
    h = w = 384
    x = np.full((1, 1, h, w), 0.4, np.float32)
    x[..., :120, :120] = 0.75
    x = torch.from_numpy(np.clip(x + rng.normal(0, 0.03, x.shape).astype(np.float32), 0, 1))
    fields = torch.zeros(1, 2, h, w)
    fields[:, 0], fields[:, 1] = float(np.log(2.5)), -0.75
    with torch.no_grad():
        guarded = apply_fields(x, limit_fields(x, fields, sigma=38.4))
        raw = apply_fields(x, fields)
    corner = (slice(10, 60), slice(10, 60))
    assert (raw[0, 0][corner] >= 1.0).float().mean() > 0.9
    assert (guarded[0, 0][corner] >= 1.0).float().mean() < 0.05
    assert guarded[0, 0][corner].std() > 0.5 * x[0, 0][corner].std()
    assert torch.allclose(guarded[..., 340:, 340:], raw[..., 340:, 340:], atol=1e-4)  # beyond 2 + 3 sigma


def test_keep_detail_keeps_the_regional_change_and_the_fine_structure() -> None:
    """A gain below 1 is how the model darkens a bright region; it also flattens the vessels in it. With
    keep_detail the region is darkened by as much (local mean) while its texture keeps the input's contrast;
    gains above 1 are left as they are."""
    from models.hqgnet import apply_fields, gaussian_blur, keep_detail_fields

    rng = np.random.default_rng(3)
    h = w = 96
    x = np.clip(0.7 + 0.08 * rng.standard_normal((1, 1, h, w)), 0, 1).astype(np.float32)
    x = torch.from_numpy(x)
    fields = torch.zeros(1, 2, h, w)
    fields[:, 0, :, :48] = float(np.log(0.5))  # left half: gain 0.5 (darken, flatten)
    fields[:, 0, :, 48:] = float(np.log(1.5))  # right half: gain 1.5, offset -0.3
    fields[:, 1, :, 48:] = -0.3
    with torch.no_grad():
        kept = keep_detail_fields(x, fields, sigma=4.0)
        raw_out, kept_out = apply_fields(x, fields), apply_fields(x, kept)
    assert float(kept[:, 0].min()) >= 0.0  # no gain below 1
    assert torch.allclose(kept[:, :, :, 60:], fields[:, :, :, 60:])  # gains above 1 untouched
    left = (slice(None), slice(None), slice(10, 86), slice(4, 36))
    local = (gaussian_blur(kept_out, 4.0) - gaussian_blur(raw_out, 4.0))[left].abs().mean()
    assert float(local) < 0.01  # the region is darkened by as much
    assert float(kept_out[left].std()) > 0.9 * float(x[left].std()) > 1.6 * float(raw_out[left].std())
    with pytest.raises(ValueError, match="do not match"):
        keep_detail_fields(x, torch.zeros(1, 6, h, w), sigma=4.0)


def test_keep_detail_is_a_pixel_option(tmp_path) -> None:
    from models.hqgnet import HQGNet, HQGNetConfig

    net = HQGNet(HQGNetConfig(name="lite", channels=1, head="affine"))
    path = tmp_path / "m.pt"
    export_weights(path, net.state_dict(), {"kind": "hqgnet", "name": "HQG-Net", "version": "t", "config": net.cfg.to_dict(),
                                            "channels": 1, "size": 64})
    assert "keep_detail" not in build_model("hqgnet", weights=path, device="cpu").info.options  # off unless the card says
    on = build_model("hqgnet", weights=path, device="cpu", options={"keep_detail": True})
    assert on.info.options["keep_detail"] is True and on.keep_detail is True
    with pytest.raises(ModelLoadError, match="keep_detail"):
        build_model("hqgnet", weights=path, device="cpu", options={"keep_detail": "yes"})


def test_detail_boost_restores_local_contrast_as_a_pixel_option(tmp_path) -> None:
    """detail_boost adds the output's own mid-scale detail back (local contrast up, level kept, no change on a
    flat frame); it is off unless the card or the config says, reaches provenance, and is range-checked."""
    from models.hqgnet import HQGNet, HQGNetConfig

    net = HQGNet(HQGNetConfig(name="lite", channels=1, head="affine"))
    path = tmp_path / "m.pt"
    export_weights(path, net.state_dict(), {"kind": "hqgnet", "name": "HQG-Net", "version": "t", "config": net.cfg.to_dict(),
                                            "channels": 1, "size": 64})
    plain = build_model("hqgnet", weights=path, device="cpu")
    assert "detail_boost" not in plain.info.options
    boosted = build_model("hqgnet", weights=path, device="cpu", options={"detail_boost": 0.2})
    assert boosted.info.options["detail_boost"] == 0.2
    yy, xx = np.mgrid[:128, :128]
    frame = (0.45 + 0.1 * np.sin(xx / 3.0) * np.sin(yy / 4.0)).astype(np.float32)  # nerve-scale texture
    vec = np.zeros(net.cfg.guidance_dim, np.float32)
    a, b = plain.enhance([frame], vec)[0], boosted.enhance([frame], vec)[0]
    assert b.std() > 1.1 * a.std()  # more local contrast ...
    assert abs(float(b.mean()) - float(a.mean())) < 0.01  # ... at the same level
    flat = np.full((64, 64), 0.4, np.float32)
    assert np.allclose(boosted.enhance([flat], vec)[0], plain.enhance([flat], vec)[0], atol=1e-3)
    for bad in (-0.1, 1.5, "much"):
        with pytest.raises(ModelLoadError, match="detail_boost"):
            build_model("hqgnet", weights=path, device="cpu", options={"detail_boost": bad})
