"""StillGAN illumination regularisation (Ma et al., Eq. 5).

The enhanced image's local brightness should match its global brightness: the image is split into
p x p patches, each patch mean minus the global mean forms the illumination difference matrix E,
E is bicubically upsampled back to the image size and the mean absolute value is the loss. The
paper averages patch sizes 48 and 96. The loss works on intensity (the channel mean), since
illumination is a brightness property and colour is left to the other terms.

Any image size works: edge patches that do not fit are averaged over the pixels they cover, and a
patch size larger than half the shorter side is reduced to it so there are always at least two
patches per side (otherwise a single patch equals the global mean and the loss is always 0).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

PATCH_SIZES: tuple[int, ...] = (48, 96)


def illumination_map(image: torch.Tensor, patch: int) -> torch.Tensor:
    """Upsampled illumination difference R (B, 1, H, W) of images (B, C, H, W) for one patch size."""
    if image.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(image.shape)}")
    if patch < 1:
        raise ValueError(f"patch size must be >= 1, got {patch}")
    h, w = image.shape[-2:]
    p = max(1, min(patch, math.ceil(min(h, w) / 2)))
    intensity = image.float().mean(dim=1, keepdim=True)
    # Subtracting the global mean before pooling (same result) keeps a flat image at exactly 0.
    centred = intensity - intensity.mean(dim=(2, 3), keepdim=True)
    diff = F.avg_pool2d(centred, kernel_size=p, stride=p, ceil_mode=True, count_include_pad=False)
    return F.interpolate(diff, size=(h, w), mode="bicubic", align_corners=False)


def illumination_loss(image: torch.Tensor, patch_sizes: Sequence[int] = PATCH_SIZES) -> torch.Tensor:
    """Mean |R| averaged over ``patch_sizes``: 0 for uniform illumination, larger for vignetting."""
    if not patch_sizes:
        raise ValueError("patch_sizes must not be empty")
    return torch.stack([illumination_map(image, p).abs().mean() for p in patch_sizes]).mean()
