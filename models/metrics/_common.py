"""Input handling shared by every metric: dtype scaling, shape checks, luminance.

Metrics accept what users actually hold: gray (H, W) or RGB (H, W, 3) arrays as uint8, uint16 or
float in [0, 1] (what the enhancers produce). Integer images are scaled by their dtype's full range
so that a uint16 CT frame and the same frame as float compare equal.
"""

from __future__ import annotations

import numpy as np

# Luminance weights of scikit-image's rgb2gray (ITU-R BT.709), used by LaSSIM's reference code.
LUMA_709 = np.array([0.2125, 0.7154, 0.0721])
# MATLAB rgb2gray (ITU-R BT.601), used by the NIQE/BRISQUE/PIQE reference implementations.
LUMA_601 = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])


def check_image(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Return ``image`` as an array of shape (H, W) or (H, W, 3); (H, W, 1) is squeezed."""
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3):
        raise ValueError(f"{name}: expected a gray (H, W) or RGB (H, W, 3) image, got shape {arr.shape}")
    if arr.size == 0:
        raise ValueError(f"{name}: empty image")
    return arr


def dtype_range(dtype: np.dtype) -> float:
    """The full-scale value of a dtype: 255 for uint8, 65535 for uint16, 1 for floats and bools."""
    dtype = np.dtype(dtype)
    if dtype == np.uint8:
        return 255.0
    if dtype == np.uint16:
        return 65535.0
    if dtype.kind in "fb":
        return 1.0
    raise ValueError(f"unsupported image dtype {dtype}: use uint8, uint16 or float in [0, 1]")


def to_float(image: np.ndarray, name: str = "image") -> np.ndarray:
    """float64 copy scaled to [0, 1] by dtype (floats are taken as already in [0, 1])."""
    arr = check_image(image, name)
    out = arr.astype(np.float64) / dtype_range(arr.dtype)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name}: contains NaN or infinite values")
    return out


def to_gray(image: np.ndarray, weights: np.ndarray = LUMA_709, name: str = "image") -> np.ndarray:
    """float64 (H, W) luminance in [0, 1]; gray input is only scaled."""
    img = to_float(image, name)
    return img @ weights if img.ndim == 3 else img


def to_uint8(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Round to 8 bits, the scale the NR-IQA models were fitted on."""
    return np.clip(np.round(to_float(image, name) * 255.0), 0, 255).astype(np.uint8)


def same_shape(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = check_image(a, "a"), check_image(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    return a, b
