"""Field normalisation (models/fieldnorm.py): inverts smooth lighting/haze fields, keeps structure, colour
within its limit, the surround untouched; options checked at build time; shipped targets reproducible."""

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data

from models import metrics as M
from models.color import limit_chroma
from models.degrade import haze, illumination
from models.fieldnorm import TARGETS_FILE, field_normalise, measure_targets, shipped_targets, targets_from_folder
from models.fov import fov_mask
from models.registry import build_model


@pytest.fixture(scope="module")
def retina() -> np.ndarray:
    rgb = data.retina().astype(np.float32) / 255.0  # 1411 x 1411 with a black surround
    return cv2.resize(rgb, (512, 512), interpolation=cv2.INTER_AREA)


def test_a_hazy_unevenly_lit_fundus_comes_back_closer_to_the_clean_one(retina: np.ndarray) -> None:
    """With targets that describe the clean image the haze and lighting are largely undone (less so when the
    veil's colour may only be corrected by 3 CIELAB units); with the shipped fundus targets (other cameras)
    the result is still closer to the clean image than the input."""
    rng = np.random.default_rng(3)
    field = fov_mask(retina)
    damaged = np.clip(haze(illumination(retina, rng), rng), 0, 1).astype(np.float32)
    damaged[~field] = 0.0  # the camera's mask stays black whatever the optics do
    own = measure_targets([("retina", retina)], "fundus", shipped_targets("fundus").sigma)
    before = M.psnr(damaged, retina, field)
    for targets, limit, least in ((own, 100.0, 4.5), (own, 3.0, 1.0), ("fundus", 3.0, 0.3)):
        out = field_normalise(damaged, targets, chroma_limit=limit)
        assert M.psnr(out, retina, field) - before > least, targets
        if targets is own:  # with another camera's targets this image's fine-structure contrast moves too
            assert M.ssim(out, retina, field) > M.ssim(damaged, retina, field)
            assert M.lassim(out, retina, 3, field) > M.lassim(damaged, retina, 3, field)


def test_the_surround_is_untouched_and_colour_moves_at_most_the_limit(retina: np.ndarray) -> None:
    rng = np.random.default_rng(4)
    damaged = np.clip(illumination(retina, rng), 0, 1).astype(np.float32)  # multiplicative: the surround stays black
    damaged[..., 2] = np.clip(damaged[..., 2] + 0.15 * (damaged[..., 0] > 0.05), 0, 1)  # and a blue cast inside
    field = fov_mask(damaged)
    out = field_normalise(damaged, "fundus", chroma_limit=3.0)
    outside = ~cv2.dilate(field.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(out[outside] - damaged[outside]).max() < 1e-6
    assert M.border_damage(out, damaged, field) < 0.5
    lab_in = cv2.cvtColor(damaged, cv2.COLOR_RGB2Lab)[field][:, 1:]
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2Lab)[field][:, 1:]
    shift = np.sqrt(((lab_out - lab_in) ** 2).sum(axis=1))
    assert np.percentile(shift, 99) <= 3.0 + 0.75  # 8-bit-free float Lab; clipping into [0, 1] may add a little
    kept = field_normalise(damaged, "fundus", chroma_limit=0.0)
    assert M.chroma_shift(kept, damaged, field) < 0.6 < M.chroma_shift(out, damaged, field)


def test_strength_zero_is_the_identity_and_grey_frames_keep_their_level(retina: np.ndarray) -> None:
    np.testing.assert_allclose(field_normalise(retina, "fundus", strength=0.0), retina, atol=3e-3)
    gray = retina[..., 1].copy()
    yy, xx = np.mgrid[: gray.shape[0], : gray.shape[1]] / gray.shape[0]
    uneven = np.clip(gray * (0.6 + 0.8 * xx), 0, 1).astype(np.float32)  # a left-to-right fall-off
    field = fov_mask(uneven)
    left, right = field & (xx < 0.4), field & (xx > 0.6)
    # a narrow window (0.1 of the field's side) follows the fall-off; the shipped ones (0.35-0.6) are nearly global
    narrow = measure_targets([("retina", retina)], "fundus", 0.1)
    for targets in (narrow, "fundus"):
        out = field_normalise(uneven, targets)
        assert abs(out[field].mean() - uneven[field].mean()) < 0.03  # no colour targets: the level is its own
    out = field_normalise(uneven, narrow)
    assert abs(out[left].mean() - out[right].mean()) < 0.5 * abs(uneven[left].mean() - uneven[right].mean())


def test_a_large_photograph_is_corrected_like_its_working_copy_without_seams(retina: np.ndarray) -> None:
    rng = np.random.default_rng(5)
    damaged = np.clip(illumination(retina, rng), 0, 1).astype(np.float32)
    big = cv2.resize(damaged, (2048, 2048), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    out_big = field_normalise(big, "fundus")
    out_small = field_normalise(damaged, "fundus")
    back = cv2.resize(out_big, (512, 512), interpolation=cv2.INTER_AREA)
    field = fov_mask(damaged)
    assert M.psnr(back, out_small, field) > 30
    # the gain field is smooth: no step between neighbouring rows or columns beyond the image's own
    step = np.abs(np.diff(out_big.mean(axis=2), axis=0)).max(axis=1)
    assert step.max() < np.abs(np.diff(big.mean(axis=2), axis=0)).max(axis=1).max() + 0.05


def test_the_node_builds_it_with_checked_options_and_names_what_ran() -> None:
    model = build_model("fieldnorm", device="cpu", options={"targets": "endoscopy", "strength": 0.9, "fov": True})
    assert model.info.options["targets"] == "endoscopy" and model.info.options["min_gain"] == 1.0
    for bad, match in (({"targets": "retina"}, "unknown fieldnorm targets 'retina'"),
                       ({"strength": 1.5}, "strength must be in"), ({"min_gain": 4.0}, "min_gain"),
                       ({"sigma": 0.3}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            build_model("fieldnorm", device="cpu", options=bad)


def test_shipped_targets_are_named_and_distinct() -> None:
    fundus, endoscopy = shipped_targets("fundus"), shipped_targets("endoscopy")
    assert fundus.mean != endoscopy.mean and fundus.n_images > 50 and "drimdb" in fundus.sources
    record = json.loads(TARGETS_FILE.read_text())
    assert "scripts/fieldnorm_targets.py" in record["note"]


@pytest.mark.slow
def test_shipped_targets_are_what_the_training_hq_images_give(shared_data: Path) -> None:
    """The numbers in models/weights/fieldnorm.targets.json are reproducible from ../shared/data/train."""
    for name in ("fundus", "endoscopy"):
        shipped = shipped_targets(name)
        measured = targets_from_folder(shared_data / "train" / name / "hq", name, shipped.sigma)
        np.testing.assert_allclose(measured.mean, shipped.mean, atol=2e-4)
        np.testing.assert_allclose(measured.std, shipped.std, atol=2e-4)
        for level in ("dark_ratio", "dark_ratio_grey"):  # models.dehaze's r0
            assert getattr(shipped, level) is not None and abs(getattr(measured, level) - getattr(shipped, level)) < 2e-4
        assert measured.sources == shipped.sources


def test_a_colour_brightened_past_the_gamut_keeps_its_hue() -> None:
    """limit_chroma brings colours outside sRGB in at constant hue: channel clipping turns a brightened
    yellow-white optic disc yellow-green (here 83 -> 95 degrees; training fundus discs: worst 5.4 -> 2.6)."""
    disc = np.tile(np.array([0.95, 0.78, 0.45], np.float32), (8, 8, 1))
    out = limit_chroma(disc, disc * np.float32(1.2), 3.0)
    assert out.min() >= 0.0 and out.max() <= 1.0

    def hue(x: np.ndarray) -> float:
        lab = cv2.cvtColor(np.ascontiguousarray(x), cv2.COLOR_RGB2Lab)[0, 0]
        return float(np.degrees(np.arctan2(lab[2], lab[1])))

    assert abs(hue(out) - hue(disc)) < 5.0  # 3.8 measured; channel clipping gives 11.4
    assert cv2.cvtColor(out, cv2.COLOR_RGB2Lab)[0, 0, 0] > cv2.cvtColor(disc, cv2.COLOR_RGB2Lab)[0, 0, 0]


def test_nothing_outside_the_field_changes_and_its_rim_is_corrected(retina: np.ndarray) -> None:
    """The surround is left exactly as it was; the correction reaches the disc's rim (no under-corrected ring)."""
    dark = (retina * 0.35).astype(np.float32)
    field = fov_mask(dark)
    out = field_normalise(dark, "fundus")
    change = np.abs(out - dark).mean(axis=2)
    assert change[~field].max() == 0.0
    rim = ndi.binary_erosion(field, iterations=3) & ~ndi.binary_erosion(field, iterations=6)
    core = ndi.binary_erosion(field, iterations=60)
    assert change[rim].mean() > 0.5 * change[core].mean()
