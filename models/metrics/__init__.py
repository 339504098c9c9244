"""Image-quality metrics for evaluating enhancers: plain functions on numpy images.

Images are gray (H, W) or RGB (H, W, 3), uint8, uint16 or float in [0, 1]. Families:
full-reference (``psnr``, ``ssim``), structure preservation (``lassim``), no-reference
(``average_gradient``, ``entropy``, ``niqe``, ``brisque``, ``piqe``), StillGAN's CCM measures
(``snr``, ``illumination_uniformity``) and downstream segmentation (``dice``, ``auc``,
``sensitivity``, ``specificity``, ``g_mean``).
"""

from models.metrics.color import border_damage, chroma_shift, delta_e
from models.metrics.fullref import psnr, ssim
from models.metrics.illumination import SNR_RADII, illumination_uniformity, snr
from models.metrics.lassim import gaussian_pyramid, laplacian_level, lassim, pyr_down, pyr_up
from models.metrics.noref import average_gradient, brisque, entropy, niqe, piqe
from models.metrics.segmentation import auc, dice, g_mean, sensitivity, specificity

__all__ = [
    "border_damage",
    "chroma_shift",
    "delta_e",
    "psnr",
    "ssim",
    "lassim",
    "pyr_down",
    "pyr_up",
    "gaussian_pyramid",
    "laplacian_level",
    "average_gradient",
    "entropy",
    "niqe",
    "brisque",
    "piqe",
    "snr",
    "SNR_RADII",
    "illumination_uniformity",
    "dice",
    "auc",
    "sensitivity",
    "specificity",
    "g_mean",
]
