"""StillGAN (Ma et al., IEEE TMI 2021): CycleGAN-style unpaired enhancement with two ResUNet
generators and two 70 x 70 PatchGAN discriminators, plus illumination regularisation
(``models.losses.illumination``) and a structure loss (``models.losses.structure``).

Generator (paper Fig. 3, authors' code): ``depth`` encoder levels, each a residual block followed by
2x2 max pooling, and no block at the bottom; ``depth`` decoder levels, each nearest upsampling and a
3x3 conv-norm-LeakyReLU, concatenation with the skip, and a residual block; residual block = two 3x3
conv-norm-LeakyReLU(0.2) with a 1x1 conv + norm shortcut; instance norm and a tanh output. With depth
8 and widths 64..512 this is the official network: 78.65 M parameters for RGB (measured on the
authors' code: 78.6 M). The official network accepts only multiples of 256; here any size works: the
input is reflect-padded to the next multiple of 2**depth and the output cropped back. Training
initialises every network N(0, 0.02) (``init_normal``), as the authors' (CycleGAN) code does.

The GAN loss is least squares (``lsgan_loss``), as in the authors' code, rather than the paper's
log loss: the published results were trained with it, and it keeps giving the generators gradient
when the discriminators win early, which the log loss (through a sigmoid) does not.

Images enter and leave the networks in [0, 1] (mapped to [-1, 1] inside), the convention of the
node's Enhancer interface and of the losses.

This module also holds the pieces the two cycle GANs share: the PatchGAN discriminator, the
least-squares GAN loss, the history pool of generated images, and the pad/crop helper.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from models.padding import pad_to_multiple

VERSION = "2.0"  # 2.0: the official generator (up-convs, 1x1 shortcuts, no bottleneck block)
# Paper weights (Sec. IV-B): cycle 10, identity 5, illumination alpha 1, structure beta 5.
LAMBDA_CYCLE = 10.0
LAMBDA_IDENTITY = 5.0
ALPHA_ILLUMINATION = 1.0
BETA_STRUCTURE = 5.0




def _norm(kind: str, channels: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(channels, affine=False)
    if kind == "batch":
        return nn.BatchNorm2d(channels)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {kind!r}; use instance, batch or none")


class ResBlock(nn.Module):
    """Two 3x3 conv-norm-LeakyReLU layers with a 1x1 conv + norm shortcut (always, as the authors' code)."""

    def __init__(self, cin: int, cout: int, norm: str = "instance"):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1), _norm(norm, cout),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1), _norm(norm, cout))
        self.act = nn.LeakyReLU(0.2, inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.body(x) + self.shortcut(x))


class UpConv(nn.Module):
    """Nearest 2x upsampling to the skip's size, then a 3x3 conv-norm-LeakyReLU to the skip's width."""

    def __init__(self, cin: int, cout: int, norm: str = "instance"):
        super().__init__()
        self.conv = nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1), _norm(norm, cout), nn.LeakyReLU(0.2, inplace=True))

    def forward(self, x: torch.Tensor, size: torch.Size) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))


@dataclass(frozen=True)
class StillGANConfig:
    """Generator architecture; ``depth`` 8 with widths 64..512 is the official network (78.6 M parameters RGB)."""

    channels: int = 1
    depth: int = 8
    base_channels: int = 64
    max_channels: int = 512
    norm: str = "instance"

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if not 1 <= self.depth <= 10:
            raise ValueError(f"depth must be 1..10, got {self.depth}")
        if self.base_channels < 1 or self.max_channels < self.base_channels:
            raise ValueError("need 1 <= base_channels <= max_channels")

    def widths(self) -> list[int]:
        """Width of encoder (and matching decoder) levels 0..depth-1."""
        return [min(self.base_channels * 2**i, self.max_channels) for i in range(self.depth)]

    @property
    def multiple(self) -> int:
        return 2**self.depth

    def to_dict(self) -> dict:
        return asdict(self)


class ResUNetGenerator(nn.Module):
    """StillGAN generator: [0, 1] images (B, C, H, W) of any size -> same shape in [0, 1].

    ``depth`` levels of residual block + 2x2 max pooling; no block at the bottom: the last pooled
    map goes straight to the decoder, whose levels are upsample + 3x3 conv, concatenation with the
    skip, residual block. A 1x1 conv and tanh make the image. Every normalised map is at least
    2 x 2 (the input is padded to a multiple of 2**depth), so instance norm is always defined.
    """

    def __init__(self, config: StillGANConfig):
        super().__init__()
        self.config = config
        widths = config.widths()
        self.encoders = nn.ModuleList()
        cin = config.channels
        for w in widths:
            self.encoders.append(ResBlock(cin, w, config.norm))
            cin = w
        self.ups = nn.ModuleList()
        self.decoders = nn.ModuleList()
        below = widths[-1]
        for w in reversed(widths):
            self.ups.append(UpConv(below, w, config.norm))
            self.decoders.append(ResBlock(2 * w, w, config.norm))
            below = w
        self.head = nn.Conv2d(widths[0], config.channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, (h, w) = pad_to_multiple(x * 2 - 1, self.config.multiple)
        skips = []
        for enc in self.encoders:
            x = enc(x)
            skips.append(x)
            x = F.max_pool2d(x, 2)
        for up, dec, skip in zip(self.ups, self.decoders, reversed(skips)):
            x = dec(torch.cat([up(x, skip.shape[-2:]), skip], dim=1))
        return (torch.tanh(self.head(x)[..., :h, :w]) + 1) / 2


def init_normal(module: nn.Module, std: float = 0.02) -> nn.Module:
    """The official CycleGAN/StillGAN initialisation: conv weights N(0, std), biases 0, norm scales N(1, std)."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d)) and m.weight is not None:
            nn.init.normal_(m.weight, 1.0, std)
            nn.init.zeros_(m.bias)
    return module


class PatchDiscriminator(nn.Module):
    """70 x 70 PatchGAN: five 4x4 convolutions, stride 2 in the first three and 1 in the last two,
    LeakyReLU(0.2) after the first four, normalisation in the middle three; one score per patch.

    No sigmoid: with the least-squares GAN loss the raw score is regressed to 1 (real) / 0 (fake).
    Input in [0, 1] (mapped to [-1, 1] like the generators').
    """

    def __init__(self, channels: int = 1, ndf: int = 64, norm: str = "instance"):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(channels, ndf, 4, 2, 1), nn.LeakyReLU(0.2, inplace=True)]
        cin = ndf
        for cout, stride in ((ndf * 2, 2), (ndf * 4, 2), (ndf * 8, 1)):
            layers += [nn.Conv2d(cin, cout, 4, stride, 1), _norm(norm, cout), nn.LeakyReLU(0.2, inplace=True)]
            cin = cout
        layers.append(nn.Conv2d(cin, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x * 2 - 1)


def lsgan_loss(scores: torch.Tensor, real: bool) -> torch.Tensor:
    """Least-squares GAN loss (Mao et al.): mean (D(x) - target)^2, target 1 for real, 0 for fake."""
    scores = scores.float()
    return F.mse_loss(scores, torch.full_like(scores, 1.0 if real else 0.0))


class ImagePool:
    """History of generated images (Shrivastava et al.; CycleGAN uses 50): the discriminator sees
    a mix of current and older fakes, which damps oscillation between G and D."""

    def __init__(self, size: int = 50, rng: random.Random | None = None):
        self.size = size
        self.images: list[torch.Tensor] = []
        self.rng = rng or random.Random(0)

    def query(self, images: torch.Tensor) -> torch.Tensor:
        if self.size <= 0:
            return images
        out = []
        for img in images.detach():
            img = img[None]
            if len(self.images) < self.size:
                self.images.append(img)
                out.append(img)
            elif self.rng.random() < 0.5:
                i = self.rng.randrange(self.size)
                out.append(self.images[i].clone())
                self.images[i] = img
            else:
                out.append(img)
        return torch.cat(out, dim=0)


def build_generator(config: StillGANConfig | dict) -> ResUNetGenerator:
    cfg = config if isinstance(config, StillGANConfig) else StillGANConfig(**config)
    return ResUNetGenerator(cfg)


def model_parts(channels: int = 3, depth: int = 8) -> list[tuple]:
    """(name, module, run(module, size), counted at inference) for `dicomnode models info`."""
    cfg = StillGANConfig(channels=channels, depth=depth)

    def run(module: nn.Module, size: int) -> torch.Tensor:
        return module(torch.empty(1, channels, size, size))

    return [
        ("G_LQ->HQ", build_generator(cfg).eval(), run, True),
        ("G_HQ->LQ", build_generator(cfg).eval(), run, False),
        ("D_HQ", PatchDiscriminator(channels), run, False),
        ("D_LQ", PatchDiscriminator(channels), run, False),
    ]
