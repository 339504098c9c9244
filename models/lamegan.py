"""LaMEGAN (Tran et al.): CycleGAN (ResNet-9-blocks generators, 70 x 70 PatchGAN discriminators,
least-squares GAN loss, cycle weight beta = 10) plus the structure-preserving perceptual loss in
Laplacian-pyramid space (``models.losses.laplacian``, lambda = 0.25, level 3).

Generator (CycleGAN's ``resnet_9blocks``): reflect-pad 7x7 conv, two stride-2 downsampling convs,
``n_blocks`` residual blocks (reflect-padded 3x3 conv-IN-ReLU-conv-IN), two transposed-conv
upsamplings, reflect-pad 7x7 conv, tanh. It works at any size because the input is padded to a
multiple of 4 (two stride-2 stages) and the output cropped back. Images in and out are [0, 1].
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from models.stillgan import pad_to_multiple

VERSION = "1.0"
LAMBDA_STP = 0.25
LAMBDA_CYCLE = 10.0
PYRAMID_LEVEL = 3


@dataclass(frozen=True)
class LaMEGANConfig:
    channels: int = 3
    ngf: int = 64
    n_blocks: int = 9

    def __post_init__(self) -> None:
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.ngf < 1 or self.n_blocks < 0:
            raise ValueError("need ngf >= 1 and n_blocks >= 0")

    def to_dict(self) -> dict:
        return asdict(self)


class _ResnetBlock(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim), nn.ReLU(inplace=True),
            nn.ReflectionPad2d(1), nn.Conv2d(dim, dim, 3), nn.InstanceNorm2d(dim),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class ResnetGenerator(nn.Module):
    """[0, 1] images (B, C, H, W) of any size (>= 2 px) -> same shape in [0, 1]."""

    MULTIPLE = 4

    def __init__(self, config: LaMEGANConfig):
        super().__init__()
        self.config = config
        c, ngf = config.channels, config.ngf
        layers: list[nn.Module] = [nn.ReflectionPad2d(3), nn.Conv2d(c, ngf, 7), nn.InstanceNorm2d(ngf), nn.ReLU(True)]
        for mult in (1, 2):
            layers += [nn.Conv2d(ngf * mult, ngf * mult * 2, 3, stride=2, padding=1),
                       nn.InstanceNorm2d(ngf * mult * 2), nn.ReLU(True)]
        layers += [_ResnetBlock(ngf * 4) for _ in range(config.n_blocks)]
        for mult in (4, 2):
            layers += [nn.ConvTranspose2d(ngf * mult, ngf * mult // 2, 3, stride=2, padding=1, output_padding=1),
                       nn.InstanceNorm2d(ngf * mult // 2), nn.ReLU(True)]
        layers += [nn.ReflectionPad2d(3), nn.Conv2d(ngf, c, 7), nn.Tanh()]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        # ReflectionPad2d(3) at the 1/1 level needs >= 4 px; tiny inputs are padded further.
        multiple = self.MULTIPLE if min(h, w) >= 4 else 8
        x, _ = pad_to_multiple(x * 2 - 1, multiple)
        return (self.net(x)[..., :h, :w] + 1) / 2


def build_generator(config: LaMEGANConfig | dict) -> ResnetGenerator:
    cfg = config if isinstance(config, LaMEGANConfig) else LaMEGANConfig(**config)
    return ResnetGenerator(cfg)


def model_parts(channels: int = 3) -> list[tuple]:
    """(name, module, run(module, size), counted at inference) for `dicomnode models info`."""
    from models.stillgan import PatchDiscriminator

    cfg = LaMEGANConfig(channels=channels)

    def run(module: nn.Module, size: int) -> torch.Tensor:
        return module(torch.empty(1, channels, size, size))

    return [
        ("G_LQ->HQ", build_generator(cfg).eval(), run, True),
        ("G_HQ->LQ", build_generator(cfg).eval(), run, False),
        ("D_HQ", PatchDiscriminator(channels), run, False),
        ("D_LQ", PatchDiscriminator(channels), run, False),
    ]
