"""StillGAN structure loss (Ma et al., Eq. 6): 1 - mean over local windows of the SSIM
structure term (sigma_xy + c) / (sigma_x sigma_y + c) between an image and its translation.

As in the authors' code: 11 x 11 Gaussian window with sigma 1.5, computed per channel, c = 0.03^2 / 2
for data in [0, 1], and a small noise (std 0.01) shared by both images. The noise keeps every
local variance above zero, so sigma_x sigma_y = sqrt(var_x var_y) has a finite gradient on flat
regions; being the same for both images, it leaves the loss of two identical images at 0.
Everything is plain tensor arithmetic (depthwise convolution), so it runs on CPU and GPU alike.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

WINDOW = 11
SIGMA = 1.5
C = 0.03**2 / 2
NOISE_STD = 0.01


def gaussian_window(size: int = WINDOW, sigma: float = SIGMA, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """Normalised 2-D Gaussian window (size, size)."""
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def structure_map(
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    window: int = WINDOW,
    sigma: float = SIGMA,
    c: float = C,
    noise_std: float = NOISE_STD,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Per-window structure similarity (B, C, H', W') of two batches (B, C, H, W) in [0, 1]."""
    if x.shape != y.shape or x.ndim != 4:
        raise ValueError(f"structure loss needs two (B, C, H, W) batches of the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.float(), y.float()
    if noise_std > 0:
        noise = torch.randn(x.shape, generator=generator, device="cpu" if generator is not None else x.device)
        noise = noise.to(x.device) * noise_std
        x, y = x + noise, y + noise
    channels = x.shape[1]
    size = min(window, x.shape[-2], x.shape[-1])  # tiny images: the window shrinks to fit
    kernel = gaussian_window(size, sigma, device=x.device).expand(channels, 1, size, size).contiguous()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(t, kernel, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = (blur(x * x) - mu_x**2).clamp_min(0)
    var_y = (blur(y * y) - mu_y**2).clamp_min(0)
    cov = blur(x * y) - mu_x * mu_y
    return (cov + c) / (torch.sqrt(var_x * var_y + 1e-12) + c)


def structure_loss(x: torch.Tensor, y: torch.Tensor, **kwargs) -> torch.Tensor:
    """1 - mean structure similarity: ~0 for identical images, up to 2 for inverted structure."""
    return 1.0 - structure_map(x, y, **kwargs).mean()
