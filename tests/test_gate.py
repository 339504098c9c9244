"""The quality gate: a red tint, erased structure, a flat or clipped frame and a lifted surround never reach PACS.

Unit checks on a real photograph (skimage's retina), the pipeline holding a series back, and the live
node with a real storescp as the PACS: the job is ``gated``, nothing arrives, ``status`` shows the
figures and ``resend --force`` sends it once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pydicom
import pytest
import yaml
from scipy import ndimage as ndi
from skimage.data import retina
from skimage.transform import resize

from dicomnode import cli as node_cli
from dicomnode import gate
from dicomnode.config import GatePolicy, parse_config
from dicomnode.domain import Instance, Series
from dicomnode.pipeline import GATED_DIR, Pipeline
from dicomnode.resident import ResidentModel, ResidentModels
from dicomnode.server import Server, ServerOptions
from models.registry import Enhancer, ModelInfo, build_model

from conftest import require_tools
from factories import image_dataset, write
from reliability import StoreSCP, dcmsend, wait_until

POLICY = GatePolicy()


@pytest.fixture(scope="module")
def fundus() -> np.ndarray:
    """A real fundus photograph with its black surround, float RGB at reading size."""
    return resize(retina(), (384, 384), anti_aliasing=True).astype(np.float32)


def red_tint(img: np.ndarray) -> np.ndarray:
    out = img.copy()
    out[..., 0] = np.clip(out[..., 0] * 1.25 + 0.15, 0, 1)
    out[..., 1:] *= 0.8
    return out


def erase_structure(img: np.ndarray) -> np.ndarray:
    sigma = (8, 8, 0) if img.ndim == 3 else 8
    return ndi.gaussian_filter(img, sigma).astype(np.float32)


def lift_surround(img: np.ndarray) -> np.ndarray:
    return np.clip(img + 0.12, 0, 1).astype(np.float32)


def burn_patch(img: np.ndarray) -> np.ndarray:
    """A fifth by a fifth of the frame (4 % of it), inside the field of view, painted white."""
    out = img.copy()
    h, w = img.shape[:2]
    out[2 * h // 5 : 3 * h // 5, w // 5 : 2 * w // 5] = 1.0
    return out


def verdict(source: np.ndarray, output: np.ndarray) -> list[str]:
    return gate.reasons(gate.measure(source, output), POLICY)


def test_good_outputs_pass(fundus: np.ndarray):
    assert verdict(fundus, fundus) == []
    clahe = build_model("clahe").enhance([fundus])[0]
    assert verdict(fundus, clahe) == [], gate.measure(fundus, clahe)
    brighter = np.clip(fundus ** 0.8, 0, 1)  # a gamma lift keeps hue, structure and the black surround
    assert verdict(fundus, brighter) == [], gate.measure(fundus, brighter)


@pytest.mark.parametrize(("damage", "expected"), [
    (red_tint, "colour cast"),
    (erase_structure, "structure lost"),
    (lift_surround, "field-of-view surround changed"),
    (lambda img: np.full_like(img, 0.4), "flat output"),
    (lambda img: np.clip(img * 6.0, 0, 1), "newly clipped"),
    (burn_patch, "region burnt out"),
])
def test_each_failure_is_stopped_with_its_reason(fundus: np.ndarray, damage, expected: str):
    reasons = verdict(fundus, damage(fundus))
    assert any(expected in r for r in reasons), reasons


def test_a_burnt_region_is_stopped_where_scattered_clipping_is_not() -> None:
    """A region burnt to white fails; more clipping spread over the frame (the cores of bright nerves)
    passes. The whole-frame clipping figure cannot tell them apart."""
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:384, :384]
    ccm = np.clip(rng.normal(0.35, 0.05, (384, 384)), 0, 1)
    for k in range(12):  # bright nerves across the frame
        ccm[np.abs(yy - (16 + 32 * k + 8 * np.sin(xx / 30 + k))) < 1.6] = 0.9
    ccm = ccm.astype(np.float32)
    burnt = burn_patch(ccm)
    nerves_clipped = np.clip(ccm * 1.2, 0, 1)
    assert gate.measure(ccm, burnt)["saturated"] < gate.measure(ccm, nerves_clipped)["saturated"] < POLICY.max_saturated
    assert gate.measure(ccm, burnt)["saturated_region"] > 0.75  # the grid need not align with the patch
    assert gate.measure(ccm, nerves_clipped)["saturated_region"] < 0.25
    assert any("region burnt out" in r for r in verdict(ccm, burnt))
    assert verdict(ccm, nerves_clipped) == []
    assert gate.saturated_region(ccm, ccm) == 0.0
    assert gate.saturated_region(burnt, burnt) == 0.0  # what the source already clips is not counted


@pytest.mark.slow
def test_the_default_routes_outputs_on_held_out_images_pass(shared_data: Path, tmp_path: Path) -> None:
    """The calibration's promise (docs/quality-gate.md), checked: with the default gate, the default config's
    models pass on held-out images they never saw (CCM by the shipped HQG-Net, fundus by field normalisation,
    endoscopy by veil removal), and the same images tinted red or blurred are stopped."""
    from dicomnode.tools.demo import demo_config
    from models.io import list_images, load_image, resize_long_side

    from factories import free_port

    cfg = demo_config(None, tmp_path / "var", tmp_path / "out", free_port())
    models = ResidentModels.load(cfg, only=["hqgnet-ccm", "dehaze-endoscopy", "fieldnorm-fundus"])
    assert models.failures == {}
    cases = [("ccm/real_lq", 1, models.bind("hqgnet-ccm", "OP").enhancer),
             ("ccm/real_pairs/raw", 1, models.bind("hqgnet-ccm", "OP").enhancer),
             ("fundus/real_lq", 3, models.bind("fieldnorm-fundus", "OP").enhancer),
             ("endoscopy/real_lq", 3, models.bind("dehaze-endoscopy", "ES").enhancer)]
    for folder, channels, enhancer in cases:
        paths = list_images(shared_data / "holdout" / folder)[:4]
        assert paths, folder
        for path in paths:
            img = resize_long_side(load_image(path, channels), 512)
            out = enhancer.enhance([img])[0]
            assert verdict(img, out) == [], f"{folder}/{path.name}: {gate.measure(img, out)}"
            if channels == 3:
                assert any("colour" in r for r in verdict(img, red_tint(img))), path.name
            blurred = verdict(img, erase_structure(img))
            assert any("detail lost" in r for r in blurred), (path.name, blurred)
            if folder.startswith(("ccm", "fundus")):  # endoscopy has too little fine structure for LaSSIM alone
                assert any("structure" in r for r in blurred), path.name


def test_a_mild_blur_of_a_smooth_colour_frame_is_stopped_for_lost_detail(fundus: np.ndarray):
    """A blur LaSSIM lets through on a frame with little fine structure is still stopped by the detail check;
    a gain that only brightens (detail ratio above 1) and the frame itself pass."""
    soft = ndi.gaussian_filter(fundus, (3, 3, 0)).astype(np.float32)
    figures = gate.measure(fundus, soft)
    assert figures["lassim"] >= POLICY.min_lassim and figures["detail"] < POLICY.min_detail, figures
    assert any("detail lost" in r for r in gate.reasons(figures, POLICY))
    assert gate.measure(fundus, fundus)["detail"] == 1.0
    assert gate.measure(fundus, np.clip(fundus * 1.2, 0, 1))["detail"] > 1.0
    flat = np.zeros_like(fundus)
    assert gate.detail_ratio(flat, fundus) == 1.0  # nothing to lose in a flat source


def test_gray_images_are_checked_for_structure_not_for_a_surround():
    ct = pydicom.dcmread(pydicom.data.get_testdata_file("CT_small.dcm")).pixel_array.astype(np.float32)
    ct = (ct - ct.min()) / (ct.max() - ct.min())
    figures = gate.measure(ct, np.clip(ct * 1.1, 0, 1))
    assert figures["border_change"] == 0.0 if "border_change" in figures else True
    assert gate.reasons(figures, POLICY) == []
    assert any("structure lost" in r for r in gate.reasons(gate.measure(ct, erase_structure(ct)), POLICY))


def test_long_cines_are_measured_on_evenly_spaced_frames():
    assert gate.measured_frames(5) == set(range(5))
    picked = gate.measured_frames(300)
    assert len(picked) == gate.MAX_MEASURED_FRAMES and 0 in picked and 299 in picked


class Damaging(Enhancer):
    """A model that misbehaves in a chosen way (and records how often it ran)."""

    def __init__(self, damage) -> None:  # type: ignore[no-untyped-def]
        self.damage = damage
        self.info = ModelInfo(kind="test-damage", name="Damaging", version="1")
        self.calls = 0

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        self.calls += 1
        return [self.damage(np.asarray(img, dtype=np.float32)) for img in images]


def fundus_files(folder: Path, fundus: np.ndarray, count: int = 2) -> list[Path]:
    pixels = (fundus * 255).astype(np.uint8)
    return [write(image_dataset(pixels, study="gate-study", series="gate-series", index=i, modality="OP"),
                  folder / f"op{i}.dcm") for i in range(count)]


def test_pipeline_holds_back_a_red_series_and_passes_a_good_one(tmp_path: Path, fundus: np.ndarray):
    files = fundus_files(tmp_path / "in", fundus)
    series = Series("p", "1.2", "1.2.3", tuple(Instance(p, {"Modality": "OP"}) for p in files))
    red = Pipeline(None, ResidentModels.single("red", Damaging(red_tint))).run(series, tmp_path / "red", model="red")
    assert red.held_back and red.gate is not None and red.gate["failed"] == 2
    assert all(p.parent == tmp_path / "red" / GATED_DIR for p in red.outputs)
    assert "colour cast" in red.gate["failures"][0]["reasons"][0]
    assert red.gate["worst"]["chroma_shift"] > POLICY.max_chroma_shift
    good = Pipeline(None, ResidentModels.single("same", Damaging(lambda x: x))).run(series, tmp_path / "ok", model="same")
    assert not good.held_back and good.gate is not None and good.gate["passed"]
    assert all(p.parent == tmp_path / "ok" for p in good.outputs)


def test_live_node_gates_the_job_and_resend_force_sends_it_once(tmp_path: Path, free_port: int, fundus: np.ndarray,
                                                                 capsys: pytest.CaptureFixture[str]):
    require_tools("dcmsend", "storescp")
    with StoreSCP(tmp_path / "pacs") as pacs:
        def at_pacs() -> list[Path]:
            return [p for p in pacs.folder.rglob("*") if p.is_file() and not p.name.startswith(".")]

        data = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port, "series_quiet_seconds": 0.3},
            "storage": {"root": str(tmp_path / "var")},
            "destinations": {"pacs": {"type": "dicom", "ae_title": "PACS", "host": "127.0.0.1", "port": pacs.port}},
            "models": {"red": {"kind": "clahe"}},
            "rules": [{"name": "fundus", "match": {"Modality": "OP"}, "model": "red", "destinations": ["pacs"]}],
            "dispatch": {"backoff_initial_seconds": 0.2, "backoff_max_seconds": 1.0},
        }
        cfg = parse_config(data, tmp_path)
        model = Damaging(red_tint)
        server = Server(cfg, models=ResidentModels({"red": ResidentModel("red", model, "cpu", 4)}, {}),
                        options=ServerOptions(drain_seconds=5))
        server.start()
        try:
            assert dcmsend(server.port, fundus_files(tmp_path / "in", fundus)).returncode == 0
            ledger = server.spool.ledger
            wait_until(lambda: [j.state for j in ledger.jobs()] == ["gated"], 60, what="the job to be gated")
            (job,) = ledger.jobs()
            assert "colour cast" in (job.error or "") and job.details["gate"]["failed"] == 2
            assert ledger.deliveries(job.id) == [] and at_pacs() == []
            config_path = tmp_path / "node.yaml"
            config_path.write_text(yaml.safe_dump(data))
            assert node_cli.main(["status", "--config", str(config_path)]) == 0
            shown = capsys.readouterr().out
            assert "held back by the quality gate" in shown and f"job {job.id}" in shown and "chroma_shift" in shown
            assert node_cli.main(["resend", "--config", str(config_path), "--all-dead", "--force"]) == 2  # one job only
            assert node_cli.main(["resend", "--config", str(config_path), "--job", str(job.id), "--force"]) == 0
            assert "2 deliveries queued despite the quality gate" in capsys.readouterr().out
            wait_until(lambda: len(at_pacs()) == 2, 60, what="the forced series at the PACS")
            wait_until(lambda: ledger.job(job.id).state == "done", 30, what="the job done")
            assert "resend --force" in (ledger.job(job.id).error or "")
            assert node_cli.main(["resend", "--config", str(config_path), "--job", str(job.id), "--force"]) == 1
            assert model.calls >= 1
        finally:
            assert server.stop()
