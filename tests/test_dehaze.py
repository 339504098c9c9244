"""Veil removal (models/dehaze.py): a veil is taken off, a dark or clear frame is left alone, the surround and
the colour stay within their limits, large frames match their working copy; options checked at build time."""

import cv2
import numpy as np
import pytest
from skimage import data

from models import metrics as M
from models.degrade import haze
from models.dehaze import dark_ratio, dehaze
from models.fieldnorm import measure_targets, shipped_targets
from models.fov import fov_mask
from models.registry import build_model


def _octagon(h: int, w: int) -> np.ndarray:
    """An endoscope's field: the frame with its corners cut, as CVC-ClinicDB and Kvasir frames have."""
    cut = h // 6
    pts = np.array([[cut, 8], [w - cut, 8], [w - 8, cut], [w - 8, h - cut], [w - cut, h - 8], [cut, h - 8],
                    [8, h - cut], [8, cut]], np.int32)
    mask = np.zeros((h, w), np.uint8)
    cv2.fillPoly(mask, [pts], 1)
    return mask.astype(bool)


@pytest.fixture(scope="module")
def scope() -> tuple[np.ndarray, np.ndarray]:
    """A warm, textured photograph in an endoscope's black frame, 288 x 384 (CVC-ClinicDB's size)."""
    rgb = cv2.resize(data.coffee().astype(np.float32) / 255.0, (384, 288), interpolation=cv2.INTER_AREA)
    field = _octagon(288, 384)
    rgb[~field] = 0.0
    return rgb, field


def _veiled(clean: np.ndarray, field: np.ndarray, seed: int) -> np.ndarray:
    out = np.clip(haze(clean, np.random.default_rng(seed)), 0, 1).astype(np.float32)
    out[~field] = 0.0  # the scope's mask stays black whatever the optics do
    return out


def test_a_veiled_frame_comes_back_closer_to_the_clean_one(scope: tuple[np.ndarray, np.ndarray]) -> None:
    clean, field = scope
    own = measure_targets([("coffee", clean)], "endoscopy", 0.35)  # r0 = this image's own clear ratio
    assert own.dark_ratio is not None and abs(own.dark_ratio - dark_ratio(clean)) < 1e-5  # stored to 5 decimals
    for seed in (1, 2, 3):
        veiled = _veiled(clean, field, seed)
        out = dehaze(veiled, own, min_transmission=0.35, chroma_limit=100.0)
        assert M.psnr(out, clean, field) > M.psnr(veiled, clean, field) + 3.0, seed
        assert M.ssim(out, clean, field) > M.ssim(veiled, clean, field), seed
        assert M.lassim(out, clean, 3, field) > M.lassim(veiled, clean, 3, field), seed
        assert out[field].mean() < veiled[field].mean()  # the veil's light is taken away, not added to
        # the shipped endoscopy ratio (other images) and defaults (gain <= 1.33, colour within 3 CIELAB
        # units) still help
        shipped = dehaze(veiled, "endoscopy")
        assert M.psnr(shipped, clean, field) > M.psnr(veiled, clean, field) + 1.0, seed
        assert M.lassim(shipped, clean, 3, field) > M.lassim(veiled, clean, 3, field), seed


def test_a_dark_bright_or_clear_frame_is_left_alone(scope: tuple[np.ndarray, np.ndarray]) -> None:
    """No lifting of a dark lumen into grey, and no veil found in brighter light: the dark channel / mean
    ratio does not move with exposure, so a frame at its clear ratio keeps t = 1 whatever its level."""
    clean, field = scope
    for gain in (1.0, 0.5, 0.25, 1.3):  # under-exposed frames are dark, not veiled; a nearer lamp is brighter
        frame = np.clip(clean * gain, 0, 1).astype(np.float32)
        out = dehaze(frame, "endoscopy")
        assert M.lassim(out, frame, 3, field) > 0.97, gain
        assert abs(out[field].mean() - frame[field].mean()) < 0.02, gain
        assert np.abs(out - frame)[field].mean() < 0.02 * frame[field].mean(), gain  # measured 0.3-1.6 %


def test_noise_is_not_amplified_with_the_detail(scope: tuple[np.ndarray, np.ndarray]) -> None:
    """Under a veil, 1 / t would amplify sensor noise with the structure; the guard keeps the noise at its
    input amplitude, so the output is closer to the clean frame."""
    clean, field = scope
    own = measure_targets([("coffee", clean)], "endoscopy", 0.35)
    for seed in (1, 2, 3):
        veiled = _veiled(clean, field, seed)
        noisy = np.clip(veiled + np.random.default_rng(seed).normal(0, 0.03, veiled.shape), 0, 1).astype(np.float32)
        noisy[~field] = 0.0
        guarded = dehaze(noisy, own, min_transmission=0.35)  # gains up to 2.9: noise would be amplified as much
        plain = dehaze(noisy, own, min_transmission=0.35, noise_guard=0.0)
        assert M.ssim(guarded, clean, field) > M.ssim(plain, clean, field) + 0.01, seed  # measured +0.015-0.03
        assert M.psnr(guarded, clean, field) > M.psnr(plain, clean, field), seed
        # the level is the same: only the noise-sized part of the finest detail is held back
        assert abs(guarded[field].mean() - plain[field].mean()) < 0.005, seed


def test_the_surround_is_untouched_and_colour_moves_at_most_the_limit(scope: tuple[np.ndarray, np.ndarray]) -> None:
    clean, field = scope
    veiled = _veiled(clean, field, 4)
    assert (fov_mask(veiled) == field).mean() > 0.95
    out = dehaze(veiled, "endoscopy", chroma_limit=3.0)
    outside = ~cv2.dilate(field.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
    assert np.abs(out[outside] - veiled[outside]).max() < 1e-6
    assert M.border_damage(out, veiled, field) < 0.5
    lab_in = cv2.cvtColor(veiled, cv2.COLOR_RGB2Lab)[field][:, 1:]
    lab_out = cv2.cvtColor(out, cv2.COLOR_RGB2Lab)[field][:, 1:]
    shift = np.sqrt(((lab_out - lab_in) ** 2).sum(axis=1))
    assert np.percentile(shift, 99) <= 3.0 + 0.75  # float Lab; clipping into [0, 1] may add a little
    free = dehaze(veiled, "endoscopy", chroma_limit=100.0)
    assert M.chroma_shift(free, veiled, field) > M.chroma_shift(out, veiled, field)


def test_grey_frames_and_large_frames(scope: tuple[np.ndarray, np.ndarray]) -> None:
    clean, field = scope
    veiled = _veiled(clean, field, 5)
    own = measure_targets([("coffee", clean)], "endoscopy", 0.35)
    grey_clean, grey_veiled = clean.mean(axis=2), veiled.mean(axis=2)
    grey = dehaze(grey_veiled, own, min_transmission=0.35)
    assert grey.shape == grey_veiled.shape
    assert M.psnr(grey, grey_clean, field) > M.psnr(grey_veiled, grey_clean, field) + 1.5  # measured +1.7
    # a 4x larger frame is corrected like its working copy (the transmission is smooth): no seams, no drift
    big = cv2.resize(veiled, (1536, 1152), interpolation=cv2.INTER_CUBIC).clip(0, 1)
    back = cv2.resize(dehaze(big, "endoscopy"), (384, 288), interpolation=cv2.INTER_AREA)
    assert M.psnr(back, dehaze(veiled, "endoscopy"), field) > 30


def test_the_node_builds_it_with_checked_options_and_names_what_ran() -> None:
    model = build_model("dehaze", device="cpu", options={"targets": "endoscopy", "omega": 0.9, "fov": True})
    assert model.info.options["targets"] == "endoscopy" and model.info.options["omega"] == 0.9
    assert model.info.options["min_transmission"] == 0.75 and model.info.options["chroma_limit"] == 3.0
    assert model.info.options["noise_guard"] == 3.0
    for bad, match in (({"targets": "retina"}, "unknown fieldnorm targets 'retina'"),
                       ({"omega": 1.5}, "omega must be in"), ({"min_transmission": 0.0}, "min_transmission"),
                       ({"noise_guard": -1}, "noise_guard"), ({"patch": 0.1}, "unknown option")):
        with pytest.raises(ValueError, match=match):
            build_model("dehaze", device="cpu", options=bad)
    for name in ("endoscopy", "fundus"):
        prior = shipped_targets(name)
        assert prior.dark_ratio is not None and prior.dark_ratio_grey is not None
        assert 0 < prior.dark_ratio < prior.dark_ratio_grey < 1
