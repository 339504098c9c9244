"""LaMEGAN structure-preserving loss L_stp (Eq. 7): L1 between VGG features (after the 2nd pooling
layer) of Laplacian-pyramid level l of an image and of its translation; l = 3, weight 0.25.

The pyramid follows OpenCV's pyrDown/pyrUp (5-tap [1, 4, 6, 4, 1]/16 separable blur with
reflect-101 borders; keep even rows/columns; pyrUp = zero insertion + the same blur x4), written
in torch so it is differentiable and batched. Unlike the authors' code, which needs sizes divisible
by 32, any size works: each pyrDown keeps ceil(n/2) samples, each pyrUp is cropped back to the finer
level's size, tiny levels fall back to edge replication where reflection is impossible, and the
level-l residual is zero-padded (a residual is zero-mean) to a multiple of 4 before VGG's two
poolings so no border row is dropped.

VGG input: gray residuals are tiled to 3 channels (as the official code does); residuals are divided
by the ImageNet std, the scale torchvision-convention weights expect (no mean shift: a band-pass
signal has none).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from models.backbones.vgg import IMAGENET_STD, VGG, load_features

LEVEL = 3
LAMBDA = 0.25
_TAPS = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0]) / 16.0


def _blur(x: torch.Tensor, gain: float = 1.0) -> torch.Tensor:
    """Separable 5-tap binomial blur, reflect-101 borders (replicate when a side is < 3)."""
    c = x.shape[1]
    taps = (_TAPS * gain**0.5).to(device=x.device, dtype=x.dtype)
    mode = "reflect" if min(x.shape[-2:]) > 2 else "replicate"
    x = F.pad(x, (2, 2, 2, 2), mode=mode)
    x = F.conv2d(x, taps.view(1, 1, 1, 5).expand(c, 1, 1, 5), groups=c)
    return F.conv2d(x, taps.view(1, 1, 5, 1).expand(c, 1, 5, 1), groups=c)


def pyr_down(x: torch.Tensor) -> torch.Tensor:
    """Blur then keep even rows and columns: (H, W) -> (ceil(H/2), ceil(W/2))."""
    return _blur(x)[..., ::2, ::2]


def pyr_up(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Zero insertion then blur x4, cropped to ``size`` (the finer level's shape)."""
    b, c, h, w = x.shape
    up = x.new_zeros(b, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x
    return _blur(up, gain=4.0)[..., : size[0], : size[1]]


def laplacian_level(x: torch.Tensor, level: int = LEVEL) -> torch.Tensor:
    """Residual h_l = g_l - pyrUp(g_{l+1}) of a batch (B, C, H, W); l = 0 is full resolution."""
    if x.ndim != 4:
        raise ValueError(f"expected a (B, C, H, W) batch, got shape {tuple(x.shape)}")
    if level < 0:
        raise ValueError(f"pyramid level must be >= 0, got {level}")
    g = x
    for _ in range(level):
        g = pyr_down(g)
    return g - pyr_up(pyr_down(g), g.shape[-2:])


class LaplacianPerceptualLoss(nn.Module):
    """L1 distance of frozen VGG16 features (to the 2nd pooling) of the level-l Laplacian residuals.

    ``vgg_state`` is a torchvision-layout ``features.*`` state dict (see ``models.pretrained``);
    None keeps the random init. The VGG's parameters are frozen; gradients flow to the inputs.
    """

    def __init__(self, vgg_state: dict[str, torch.Tensor] | None = None, *, level: int = LEVEL, arch: str = "vgg16"):
        super().__init__()
        self.level = level
        self.vgg = VGG(arch, until_pool=2)
        if vgg_state is not None:
            load_features(self.vgg, vgg_state)
        self.vgg.eval()
        for p in self.vgg.parameters():
            p.requires_grad_(False)
        self.register_buffer("inv_std", 1.0 / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    def train(self, mode: bool = True) -> LaplacianPerceptualLoss:
        super().train(mode)
        self.vgg.eval()  # no dropout/BN here, but keep the extractor fixed whatever the caller does
        return self

    def features(self, x: torch.Tensor) -> torch.Tensor:
        r = laplacian_level(x, self.level)
        if r.shape[1] == 1:
            r = r.expand(-1, 3, -1, -1)
        elif r.shape[1] != 3:
            raise ValueError(f"Laplacian perceptual loss takes 1 or 3 channels, got {r.shape[1]}")
        h, w = r.shape[-2:]
        r = F.pad(r, (0, (-w) % 4, 0, (-h) % 4))
        return self.vgg(r * self.inv_std.to(r.dtype))

    def forward(self, output: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        """|phi(LP_l(output)) - phi(LP_l(source))|_1 averaged; 0 when the two are identical."""
        if output.shape != source.shape:
            raise ValueError(f"shapes differ: {tuple(output.shape)} vs {tuple(source.shape)}")
        return F.l1_loss(self.features(output), self.features(source))
