import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage import data

from models.registry import ModelLoadError, build_model


@pytest.mark.parametrize("kind", ["clahe", "histeq", "retinex"])
def test_classical_keeps_shape_and_range_and_raises_contrast(kind):
    rgb = data.retina()[::6, ::6].astype(np.float32) / 255.0
    low = 0.3 + 0.3 * rgb  # a washed-out copy
    model = build_model(kind, device="cpu")
    out_rgb, out_gray = model.enhance([low, low[..., 1]])
    assert out_rgb.shape == low.shape and out_gray.shape == low.shape[:2]
    for out in (out_rgb, out_gray):
        assert out.dtype == np.float32 and out.min() >= 0 and out.max() <= 1
    assert out_gray.std() > low[..., 1].std() * 1.2
    assert model.info.weights_sha256 is None and not model.uses_guidance


def test_unknown_kind_and_bad_option_are_named():
    with pytest.raises(ModelLoadError, match="unknown model kind 'nope'"):
        build_model("nope")
    with pytest.raises(ValueError, match="clip_limt"):
        build_model("clahe", options={"clip_limt": 0.1})


@pytest.mark.parametrize("kind", ["clahe", "histeq", "retinex"])
def test_uniform_frames_pass_through_and_black_rgb_pixels_match_gray(kind):
    model = build_model(kind, device="cpu")
    black, flat = np.zeros((16, 16), np.float32), np.full((16, 16, 3), 0.3, np.float32)
    out_black, out_flat = model.enhance([black, flat])
    assert np.array_equal(out_black, black) and np.array_equal(out_flat, flat)
    ramp = np.linspace(0, 1, 24 * 24, dtype=np.float32).reshape(24, 24)
    gray_out, rgb_out = model.enhance([ramp, np.repeat(ramp[..., None], 3, axis=2)])
    np.testing.assert_allclose(rgb_out, np.repeat(gray_out[..., None], 3, axis=2), atol=1e-6)


def test_bad_option_values_fail_at_build_time():
    with pytest.raises(ValueError, match="retinex: invalid option"):
        build_model("retinex", options={"sigmas": []})
    with pytest.raises(ValueError, match="clahe: invalid option.*clip_limit"):
        build_model("clahe", options={"clip_limit": -1})
    with pytest.raises(ValueError, match="histeq: invalid option"):
        build_model("histeq", options={"nbins": "many"})


def test_fov_option_keeps_the_black_surround_of_a_colour_frame():
    """CLAHE lifts a fundus disc's black surround; with fov: true the surround is left exactly as it was."""
    from skimage.data import retina
    from skimage.transform import resize

    from models.fov import fov_mask
    from models.registry import build_model

    img = resize(retina(), (256, 256), anti_aliasing=True).astype(np.float32)
    outside = ~fov_mask(img)
    plain = build_model("clahe").enhance([img])[0]
    kept = build_model("clahe", options={"fov": True}).enhance([img])[0]
    eroded = outside & np.roll(outside, 4, 0) & np.roll(outside, -4, 0) & np.roll(outside, 4, 1) & np.roll(outside, -4, 1)
    assert np.abs(plain - img)[eroded].max() > 1 / 255  # plain CLAHE touches it
    assert np.abs(kept - img)[eroded].max() < 1e-6
    assert np.abs(kept - plain)[~outside].mean() < 0.01  # inside the field it is the same CLAHE
    assert build_model("clahe", options={"fov": True}).info.options["fov"] is True  # in the derived UIDs


def test_colour_preserving_output_keeps_the_inputs_chroma_and_takes_the_new_lightness() -> None:
    """keep_chroma (HQG-Net's luminance mode) on a real photograph: the chroma shift the gate and the tables
    measure stays near zero while the lightness follows the enhanced frame."""
    from skimage.data import retina

    from models.color import keep_chroma, rgb_to_lab
    from models.metrics.color import chroma_shift

    img = (retina()[::4, ::4] / 255.0).astype(np.float32)
    brighter = np.clip(img * 1.3 + 0.05, 0, 1)
    tinted = brighter.copy()
    tinted[..., 1] *= 0.7  # the enhanced frame also shifted the colour: keep_chroma must undo that
    out = keep_chroma(img, tinted)
    assert out.dtype == np.float32 and out.shape == img.shape
    assert chroma_shift(out, img) < 0.5 < chroma_shift(tinted, img)
    field = img.max(axis=2) > 0.1
    lightness = np.abs(rgb_to_lab(out)[..., 0] - rgb_to_lab(tinted)[..., 0])[field]
    assert float(np.median(lightness)) < 1.0


def test_a_lightness_beyond_the_gamut_keeps_its_hue_instead_of_turning_yellow() -> None:
    """A saturated orange (an optic disc) brightened past what its chroma allows in sRGB: clipping each
    channel turns it towards yellow and darkens it; keep_chroma lowers the chroma at constant L* and hue."""
    import cv2

    from models.color import keep_chroma, rgb_to_lab

    def hue_chroma_l(rgb: np.ndarray) -> tuple[float, float, float]:
        lab = rgb_to_lab(rgb.reshape(1, 1, 3).astype(np.float32))[0, 0]
        return float(np.degrees(np.arctan2(lab[2], lab[1]))), float(np.hypot(lab[1], lab[2])), float(lab[0])

    orange = np.array([[[0.9, 0.45, 0.1], [0.95, 0.55, 0.15], [0.3, 0.5, 0.2]]], np.float32)
    brighter = np.array([[[0.98, 0.8, 0.6], [1.0, 0.95, 0.85], [0.35, 0.55, 0.25]]], np.float32)
    out = keep_chroma(orange, brighter)
    lab = cv2.cvtColor(orange, cv2.COLOR_RGB2Lab)
    lab[..., 0] = cv2.cvtColor(brighter, cv2.COLOR_RGB2Lab)[..., 0]
    clipped = np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0, 1)
    for i in range(2):  # the two oranges leave the gamut
        h_in, c_in, _ = hue_chroma_l(orange[0, i])
        h_out, c_out, l_out = hue_chroma_l(out[0, i])
        h_clip, _, l_clip = hue_chroma_l(clipped[0, i])
        _, _, l_target = hue_chroma_l(brighter[0, i])
        assert abs(h_out - h_in) < 1.0 < 10.0 < abs(h_clip - h_in)
        assert abs(l_out - l_target) < 0.5 < 5.0 < l_target - l_clip
        assert c_out < c_in
    # a colour that fits is converted as before
    np.testing.assert_allclose(out[0, 2], np.clip(cv2.cvtColor(lab, cv2.COLOR_Lab2RGB), 0, 1)[0, 2], atol=1e-3)


def test_keep_surround_leaves_the_black_surround_and_keeps_the_field() -> None:
    from skimage.data import retina

    from models.fov import fov_mask, keep_surround

    img = (retina()[::4, ::4] / 255.0).astype(np.float32)
    lifted = np.clip(img + 0.2, 0, 1)
    out = keep_surround(img, lifted)
    mask = fov_mask(img)
    assert 0.3 < mask.mean() < 0.95
    inner = ndi.binary_erosion(mask, iterations=6)
    assert np.allclose(out[inner], lifted[inner], atol=1e-3)
    assert np.array_equal(out[~mask], img[~mask])  # not one surround pixel moves, even next to the rim
    from models import metrics as M

    assert M.border_damage(out, img, mask) == 0.0
    gray = img.max(axis=2)
    assert np.array_equal(keep_surround(gray, gray), gray)  # nothing changed: the same pixels back
