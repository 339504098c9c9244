"""LaSSIM: SSIM between Laplacian-pyramid levels of two images (LaMEGAN paper, Eq. 1).

It measures whether an enhancer kept the structure of its input without needing a clean
reference: blur barely moves level 3 of the pyramid, while geometric changes (hallucinated or
moved structures) do. This follows the authors' reference implementation step by step so that
scores are comparable with theirs: BT.709 luminance, five OpenCV-style ``pyrDown`` steps, the
level ``l`` residual ``g_l - pyrUp(g_{l+1})`` and scikit-image SSIM with its default settings and
``data_range`` = max - min over both residuals. The pyramid is written with scipy (reflect-101
borders = scipy's ``mirror`` mode) so the library does not depend on OpenCV; a test checks it
against ``cv2.pyrDown``/``cv2.pyrUp`` exactly.
"""

from __future__ import annotations

import numpy as np
from scipy.ndimage import correlate1d
from skimage.metrics import structural_similarity

from models.metrics._common import LUMA_709, same_shape, to_gray

# Burt-Adelson 5-tap binomial kernel, as in OpenCV's pyrDown/pyrUp.
_KERNEL = np.array([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0
# The reference implementation always builds five pyrDown levels, whatever level it reads.
MAX_LEVEL = 5
_SSIM_WIN = 7


def _blur(image: np.ndarray, kernel: np.ndarray) -> np.ndarray:
    out = correlate1d(image, kernel, axis=0, mode="mirror")
    return correlate1d(out, kernel, axis=1, mode="mirror")


def pyr_down(image: np.ndarray) -> np.ndarray:
    """``cv2.pyrDown``: 5x5 Gaussian blur (reflect-101), keep even rows and columns."""
    img = np.asarray(image, dtype=np.float64)
    return _blur(img, _KERNEL)[::2, ::2]


def pyr_up(image: np.ndarray, shape: tuple[int, int] | None = None) -> np.ndarray:
    """``cv2.pyrUp`` with ``dstsize``: zero insertion, the same kernel x4, cropped to ``shape``.

    ``shape`` may be at most one pixel smaller than twice the input per axis (odd sizes), which is
    exactly what OpenCV accepts.
    """
    img = np.asarray(image, dtype=np.float64)
    h, w = img.shape
    out_h, out_w = shape if shape is not None else (2 * h, 2 * w)
    if not (0 <= 2 * h - out_h <= 1 and 0 <= 2 * w - out_w <= 1):
        raise ValueError(f"pyr_up cannot map {img.shape} to {(out_h, out_w)}")
    up = np.zeros((2 * h, 2 * w))
    up[::2, ::2] = img
    return _blur(up, 2.0 * _KERNEL)[:out_h, :out_w]


def gaussian_pyramid(image: np.ndarray, levels: int = MAX_LEVEL) -> list[np.ndarray]:
    """[g0, g1, ..., g_levels] with g0 the image itself."""
    pyramid = [np.asarray(image, dtype=np.float64)]
    for _ in range(levels):
        pyramid.append(pyr_down(pyramid[-1]))
    return pyramid


def laplacian_level(image: np.ndarray, level: int = 3) -> np.ndarray:
    """The level-``level`` residual g_l - pyrUp(g_{l+1}) of a 2-D float image."""
    if not 0 <= level < MAX_LEVEL:
        raise ValueError(f"LaSSIM level must be in 0..{MAX_LEVEL - 1}, got {level}")
    gauss = gaussian_pyramid(image, MAX_LEVEL)
    return gauss[level] - pyr_up(gauss[level + 1], gauss[level].shape)


def lassim(a: np.ndarray, b: np.ndarray, level: int = 3, mask: np.ndarray | None = None) -> float:
    """Laplacian SSIM of two same-shaped images (gray or RGB; uint8, uint16 or float in [0, 1]).

    Symmetric in its arguments; 1 for identical images. Level 3 suits images of about 256-512 px
    (the authors used 272 x 480); the level image must keep at least 7 x 7 pixels.
    """
    a, b = same_shape(a, b)
    min_side = min(a.shape[:2])
    if min_side >> level < _SSIM_WIN:
        raise ValueError(
            f"image of {a.shape[:2]} px is too small for LaSSIM level {level}: "
            f"needs at least {_SSIM_WIN << level} px on the shorter side"
        )
    la = laplacian_level(to_gray(a, LUMA_709, "a"), level)
    lb = laplacian_level(to_gray(b, LUMA_709, "b"), level)
    data_range = max(la.max(), lb.max()) - min(la.min(), lb.min())
    if data_range == 0.0:  # both residuals flat and equal (e.g. two constant images)
        return 1.0
    if mask is None:
        return float(structural_similarity(la, lb, data_range=data_range))
    _, smap = structural_similarity(la, lb, data_range=data_range, full=True)
    m = np.asarray(mask, dtype=bool)
    for _ in range(level):  # the mask at the level's resolution (pyrDown keeps even rows and columns)
        m = m[::2, ::2]
    m = m[: smap.shape[0], : smap.shape[1]]
    return float(smap[m].mean()) if m.any() else float("nan")
