import numpy as np
import pytest
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
