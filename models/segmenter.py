"""A small U-Net: the downstream segmenter Theta of HQG-Net+'s cooperative training (Eqs. 15-18).

The paper uses task-specific networks (CS-Net for CCM nerves, PNS-Net for polyps); any
differentiable segmenter fits the bi-level scheme, and a small U-Net trains on CPU alongside
the enhancer. It reads the enhanced image and returns one logit map per class (binary: one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["UNetConfig", "SmallUNet", "segmentation_loss"]


@dataclass
class UNetConfig:
    channels: int = 1
    classes: int = 1
    width: int = 16
    depth: int = 3  # down-sampling steps; inputs need sides divisible by 2**depth (padded otherwise)


def _double_conv(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True),
    )


class SmallUNet(nn.Module):
    def __init__(self, cfg: UNetConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or UNetConfig()
        widths = [cfg.width * 2**i for i in range(cfg.depth + 1)]
        self.down = nn.ModuleList([_double_conv(cfg.channels, widths[0])] + [_double_conv(widths[i], widths[i + 1]) for i in range(cfg.depth)])
        self.up = nn.ModuleList([nn.ConvTranspose2d(widths[i + 1], widths[i], 2, stride=2) for i in range(cfg.depth)])
        self.merge = nn.ModuleList([_double_conv(widths[i] * 2, widths[i]) for i in range(cfg.depth)])
        self.out = nn.Conv2d(widths[0], cfg.classes, 1)

    def forward(self, x: Tensor) -> Tensor:
        m = 2**self.cfg.depth
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % m, 0, (-h) % m), mode="replicate")
        skips = []
        for i, block in enumerate(self.down):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(self.cfg.depth)):
            x = self.merge[i](torch.cat([self.up[i](x), skips[i]], dim=1))
        return self.out(x)[..., :h, :w]


def segmentation_loss(logits: Tensor, mask: Tensor) -> Tensor:
    """L^d: BCE + soft Dice (binary masks in {0, 1}); Dice keeps thin structures (nerves) from vanishing."""
    logits, mask = logits.float(), mask.float()
    bce = F.binary_cross_entropy_with_logits(logits, mask)
    prob = torch.sigmoid(logits)
    inter = (prob * mask).sum(dim=(1, 2, 3))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3)) + mask.sum(dim=(1, 2, 3)) + 1)
    return bce + dice.mean()
