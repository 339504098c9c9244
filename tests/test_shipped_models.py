"""The shipped HQG-Net-lite weights: consistent cards and guidance, loaded by the default config,
and a series through the running node that comes back enhanced, deterministic and better."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest

from dicomnode import guidance as gd
from dicomnode.config import parse_config
from dicomnode.configtypes import builtin_dir
from dicomnode.resident import ResidentModels
from dicomnode.tools.demo import demo_config, send
from models.guidance import GUIDANCE_METHODS
from models.io import load_image
from models.registry import read_card

from factories import free_port, image_dataset, write

WEIGHTS = builtin_dir()
SHIPPED = {"hqgnet-ccm": ("default",), "hqgnet-color": ("default", "OP", "ES", "XC")}
SC_IMAGE = "1.2.840.10008.5.1.4.1.1.7"


def test_cards_weights_and_guidance_are_consistent() -> None:
    total = 0
    for name, modalities in SHIPPED.items():
        weights = WEIGHTS / f"{name}.pt"
        card = read_card(weights)  # verifies the sha256
        total += weights.stat().st_size
        assert card.kind == "hqgnet" and card.config["name"] == "lite"
        shipped = card.extra["shipped"]
        assert shipped["evaluation"]["table"] and "input" in shipped["evaluation"]["table"]
        assert shipped["guidance_measurement"]["chosen"] in GUIDANCE_METHODS
        assert (WEIGHTS / f"{name}.md").is_file()
        for modality in modalities:
            g = gd.load(WEIGHTS / f"{name}.guidance-{modality}.json")
            gd.check_weights(g, card.weights_sha256, name)
            assert g.modality == modality and g.vector.shape == (card.config["guidance_dim"],)
            assert shipped["guidance"][modality]["id"] == g.id
    assert total < 50e6, f"shipped weights are {total / 1e6:.1f} MB (limit 50 MB)"


def test_default_config_loads_both_models_with_guidance(tmp_path: Path) -> None:
    cfg = demo_config(None, tmp_path / "var", tmp_path / "out", free_port())
    resident = ResidentModels.load(cfg)
    assert resident.failures == {}
    assert set(SHIPPED) <= set(resident.models)
    bound = resident.bind("hqgnet-color", "OP")
    assert bound.guidance_id == gd.load(WEIGHTS / "hqgnet-color.guidance-OP.json").id
    assert resident.bind("hqgnet-color", "SM").guidance_id == gd.load(WEIGHTS / "hqgnet-color.guidance-default.json").id
    assert resident.bind("hqgnet-ccm", "OP").guidance_id == gd.load(WEIGHTS / "hqgnet-ccm.guidance-default.json").id


def test_corrupt_shipped_weights_fail_start_up_clearly(tmp_path: Path) -> None:
    bad = tmp_path / "hqgnet-ccm.pt"
    shutil.copyfile(WEIGHTS / "hqgnet-ccm.pt", bad)
    shutil.copyfile(WEIGHTS / "hqgnet-ccm.json", tmp_path / "hqgnet-ccm.json")
    data = bytearray(bad.read_bytes())
    data[len(data) // 2] ^= 0xFF
    bad.write_bytes(bytes(data))
    cfg = parse_config({
        "storage": {"root": str(tmp_path / "var")},
        "destinations": {"out": {"folder": str(tmp_path / "out")}},
        "models": {"hqgnet-ccm": {"kind": "hqgnet", "weights": str(bad)},
                   "hqgnet-color": {"kind": "hqgnet", "weights": str(WEIGHTS / "hqgnet-color.pt")}},
        "rules": [{"name": "ccm", "match": {"Modality": "OP"}, "model": "hqgnet-ccm", "destinations": ["out"]},
                  {"name": "es", "match": {"Modality": "ES"}, "model": "hqgnet-color", "destinations": ["out"]}],
    }, tmp_path)
    resident = ResidentModels.load(cfg)
    assert "hqgnet-ccm" in resident.failures and "corrupt" in resident.failures["hqgnet-ccm"]
    assert "hqgnet-color" in resident.models  # the other model still serves


def _series(folder: Path, img: np.ndarray, count: int) -> list[Path]:
    """One series of ``count`` instances with the pixels of ``img``, described as confocal microscopy."""
    pixels = (np.clip(img, 0, 1) * 255).round().astype(np.uint8)
    return [write(image_dataset(pixels, study=folder.name, series="ccm", index=i, modality="OP",
                                description="Corneal confocal microscopy"), folder / f"i{i}.dcm") for i in range(count)]


@pytest.mark.slow
def test_series_through_the_node_is_enhanced_better_and_deterministic(tmp_path: Path, shared_data: Path) -> None:
    """A real held-out CCM image (never trained on) through the running node with the default config."""
    import time

    from dicomnode.server import Server, ServerOptions
    from models.metrics import illumination_uniformity, niqe

    raw = load_image(shared_data / "ccm" / "raw" / "zxOD174.jpg", 1)
    out = tmp_path / "out"
    cfg = demo_config(None, tmp_path / "var", out, free_port())
    server = Server(cfg, options=ServerOptions(drain_seconds=10, dispatch_poll_seconds=0.1))
    server.start()
    try:
        assert server.models.failures == {}
        first = _series(tmp_path / "a", raw, 2)
        second = _series(tmp_path / "b", raw, 1)  # the same pixels again: another request
        assert send(first, "127.0.0.1", server.port, "DICOMNODE") == [0, 0]
        assert send(second, "127.0.0.1", server.port, "DICOMNODE") == [0]
        deadline = time.monotonic() + 300
        while len(list(out.glob("*.dcm"))) < 3 and time.monotonic() < deadline:
            time.sleep(0.2)
        outputs = [pydicom.dcmread(p) for p in sorted(out.glob("*.dcm"))]
        assert len(outputs) == 3, [j.error for j in server.spool.ledger.jobs("failed")]
    finally:
        server.stop()
    sent = pydicom.dcmread(first[0]).pixel_array
    gid = gd.load(WEIGHTS / "hqgnet-ccm.guidance-default.json").id
    arrays = []
    for ds in outputs:
        assert ds.SOPClassUID == SC_IMAGE
        assert "HQG-Net" in ds.DerivationDescription and gid in ds.DerivationDescription
        arr = ds.pixel_array
        assert arr.shape == sent.shape
        assert np.abs(arr.astype(int) - sent.astype(int)).mean() > 1.0, "output pixels must differ from the input"
        arrays.append(arr)
    assert all(np.array_equal(arrays[0], a) for a in arrays[1:]), "identical requests must give identical pixels"
    # the model's job on CCM is the vignetting: illumination must get more even, NIQE must not get worse
    assert illumination_uniformity(arrays[0]) < 0.9 * illumination_uniformity(sent)
    assert niqe(arrays[0]) < niqe(sent)
