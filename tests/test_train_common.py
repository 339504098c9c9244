import json

import torch

from models.registry import read_card
from models.train.common import Checkpointer, export_weights, load_state_dict, save_sample_grid


def test_checkpoint_resume_restores_weights_optimizer_and_step(tmp_path):
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(4, 3)).sum().backward()
    opt.step()
    Checkpointer(tmp_path).save(7, {"net": net}, {"opt": opt}, {"note": "x"})
    net2 = torch.nn.Linear(3, 2)
    opt2 = torch.optim.Adam(net2.parameters(), lr=1e-3)
    step, extra = Checkpointer(tmp_path).load({"net": net2}, {"opt": opt2})
    assert step == 7 and extra == {"note": "x"}
    assert torch.equal(net.weight, net2.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]


def test_export_writes_card_with_hash_and_detects_corruption(tmp_path):
    net = torch.nn.Conv2d(1, 2, 3)
    card = export_weights(tmp_path / "m.pt", net.state_dict(), {"kind": "x", "name": "X", "version": "1", "config": {}}, half=True)
    assert read_card(tmp_path / "m.pt").weights_sha256 == card["weights_sha256"]
    sd = load_state_dict(tmp_path / "m.pt")
    assert sd["weight"].dtype == torch.float32
    assert torch.allclose(sd["weight"], net.weight.detach(), atol=1e-3)
    raw = bytearray((tmp_path / "m.pt").read_bytes())
    raw[-10] ^= 0xFF
    (tmp_path / "m.pt").write_bytes(bytes(raw))
    try:
        read_card(tmp_path / "m.pt")
    except RuntimeError as exc:
        assert "corrupt" in str(exc)
    else:
        raise AssertionError("corruption not detected")
    assert json.loads((tmp_path / "m.json").read_text())["weights_dtype"] == "float16"


def test_sample_grid_is_written(tmp_path):
    path = save_sample_grid(tmp_path / "s.png", [torch.rand(2, 1, 8, 8), torch.rand(2, 3, 8, 8)], ["in", "out"])
    from skimage.io import imread

    assert imread(path).shape == (16, 16, 3)
