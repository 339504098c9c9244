"""Train StillGAN (unpaired LQ -> HQ, illumination + structure losses) from two image/DICOM folders.

Objective (Ma et al., Eq. 7): adversarial + 10 * cycle L1 + 5 * identity L1 + 1 * illumination
regularisation on G_LQ->HQ(a) + 5 * structure loss (a vs G_LQ->HQ(a), b vs G_HQ->LQ(b)).
GAN loss: least squares, as in the authors' code (the paper writes the log loss; LSGAN gives
non-saturating, better-conditioned gradients and is what the published results were trained with).
Adam (0.5, 0.999), lr 2e-4 constant for the first half of the steps, then linearly to 0 (CycleGAN).

This module also holds the cycle-GAN loop shared with ``models.train.lamegan``.
"""

from __future__ import annotations

import argparse
import itertools
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.train.common import (
    Checkpointer,
    LossLog,
    Precision,
    Timer,
    add_common_arguments,
    count_parameters,
    dataset_description,
    export_weights,
    hardware_description,
    infer_channels,
    pick_device,
    save_sample_grid,
    seed_everything,
)
from models.train.data import DomainBatches, ImageFolder, folder_args, infinite, manifest_arg

# The extra objective terms of one model: (real_lq, real_hq, fake_hq, fake_lq) -> named losses,
# already weighted; they are added to the generators' loss.
ExtraLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], Mapping[str, torch.Tensor]]


@dataclass
class CycleGANSpec:
    """What differs between the cycle GANs: networks, loss weights, extra terms, card fields."""

    kind: str
    name: str
    version: str
    generator_config: dict[str, Any]
    make_generator: Callable[[dict[str, Any]], nn.Module]
    make_discriminator: Callable[[], nn.Module]
    lambda_cycle: float
    lambda_identity: float
    extra_loss: ExtraLoss | None = None
    card_extra: dict[str, Any] = field(default_factory=dict)


def add_cycle_arguments(parser: argparse.ArgumentParser, *, lambda_identity: float, size: int = 256) -> None:
    """Flags shared by the cycle-GAN trainers (paper defaults: batch 1, lr 2e-4)."""
    parser.add_argument("--lq", type=Path, default=None, help="folder of low-quality images or DICOM files")
    parser.add_argument("--hq", type=Path, default=None, help="folder of high-quality images or DICOM files (unpaired)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="instead of --lq/--hq: a training manifest (scripts/release_weights.py prepare), i.e. the "
                             "shipped HQG-Net's images, source weights, working scale and field-of-view crops; each "
                             "step pairs LQ and HQ crops of one domain")
    add_common_arguments(parser, size=size, iterations=20000, batch_size=1, lr=2e-4)
    parser.add_argument("--ndf", type=int, default=64, help="discriminator base width (default 64)")
    parser.add_argument("--lambda-cycle", type=float, default=10.0, help="cycle-consistency L1 weight (default 10)")
    parser.add_argument("--lambda-identity", type=float, default=lambda_identity,
                        help=f"identity-mapping L1 weight (default {lambda_identity:g})")
    parser.add_argument("--pool-size", type=int, default=50, help="history of generated images shown to D (0 = off)")
    parser.add_argument("--log-every", type=int, default=10, help="steps between loss-log rows")


def _lr_factor(step: int, total: int) -> float:
    """CycleGAN schedule: constant for the first half, then linear decay to zero."""
    half = total // 2
    if step < half:
        return 1.0
    return max(0.0, 1.0 - (step - half) / max(1, total - half))


def _set_requires_grad(modules: list[nn.Module], flag: bool) -> None:
    for m in modules:
        for p in m.parameters():
            p.requires_grad_(flag)


@dataclass
class CycleData:
    """Where a cycle GAN's unpaired crops come from: two folders, or a release manifest."""

    channels: int
    batches: Callable[[int, int], Callable[[], tuple[torch.Tensor, torch.Tensor]]]  # (batch, seed) -> next (LQ, HQ)
    fixed: torch.Tensor  # LQ crops for the sample grids
    working_max_side: int  # the longer side the model learnt at: the node serves it at this scale
    fov: bool
    description: dict[str, Any]


def _training_data(args: argparse.Namespace) -> CycleData:
    if args.manifest is not None:
        if args.lq is not None or args.hq is not None:
            raise SystemExit("give either --manifest or --lq/--hq, not both")
        manifest = manifest_arg(args.manifest)
        channels = int(manifest["channels"])
        if args.channels not in (None, channels):
            raise SystemExit(f"--channels {args.channels} disagrees with the manifest ({channels})")
        domains = DomainBatches(manifest, args.size, seed=args.seed)
        first_lq = next(iter(domains.sets.values()))[0]
        rng = np.random.default_rng(args.seed)
        fixed = torch.stack([first_lq.crop(i, rng, augment=False)[0] for i in range(min(4, len(first_lq)))])

        def manifest_batches(batch: int, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
            domains.rng = np.random.default_rng(seed)

            def pair() -> tuple[torch.Tensor, torch.Tensor]:
                _, y, _, z, _ = domains.next(batch)
                return y, z

            return pair

        return CycleData(channels, manifest_batches, fixed, int(manifest["max_side"]), bool(manifest.get("fov", False)),
                         {"manifest": str(args.manifest), "max_side": int(manifest["max_side"]), "domains": domains.counts()})

    lq_paths, hq_paths = folder_args(args.lq, args.hq)
    channels = args.channels or infer_channels(lq_paths)
    lq_set = ImageFolder(lq_paths, args.size, channels, seed=args.seed)
    hq_set = ImageFolder(hq_paths, args.size, channels, seed=args.seed + 1)
    # Folder images are resized so the shorter side is 1.125 x the crop: the node serves at that scale.
    short = int(args.size * 1.125)
    long_sides = sorted(round(short * max(h, w) / min(h, w)) for h, w in lq_set.shapes)
    working = long_sides[len(long_sides) // 2]

    def folder_batches(batch: int, seed: int) -> Callable[[], tuple[torch.Tensor, torch.Tensor]]:
        a, b = infinite(lq_set, batch, seed=seed), infinite(hq_set, batch, seed=seed + 1)
        return lambda: (next(a), next(b))

    fixed = torch.stack([lq_set[i] for i in range(min(4, len(lq_set)))])
    return CycleData(channels, folder_batches, fixed, working, False,
                     {"lq": dataset_description(args.lq, len(lq_set)), "hq": dataset_description(args.hq, len(hq_set))})


def run_cycle_gan(args: argparse.Namespace, build_spec: Callable[[int], CycleGANSpec]) -> int:
    """Train both directions, checkpoint/resume, write sample grids and the loss log, and export
    G_LQ->HQ with its model card. ``build_spec(channels)`` builds the model-specific parts."""
    from models.stillgan import ImagePool, init_normal, lsgan_loss

    for flag in ("iterations", "batch_size", "size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1")
    seed_everything(args.seed)
    device = pick_device(args.device)
    data = _training_data(args)
    spec = build_spec(data.channels)

    g_ab = spec.make_generator(spec.generator_config).to(device)  # LQ -> HQ (the shipped one)
    g_ba = spec.make_generator(spec.generator_config).to(device)  # HQ -> LQ
    d_a, d_b = spec.make_discriminator().to(device), spec.make_discriminator().to(device)
    opt_g = torch.optim.Adam(itertools.chain(g_ab.parameters(), g_ba.parameters()), lr=args.lr, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(itertools.chain(d_a.parameters(), d_b.parameters()), lr=args.lr, betas=(0.5, 0.999))
    modules = {"g_ab": g_ab, "g_ba": g_ba, "d_a": d_a, "d_b": d_b}
    optimizers = {"g": opt_g, "d": opt_d}
    precision = Precision(device, enabled=args.amp)
    ckpt = Checkpointer(args.out)
    start = 0
    if args.resume:
        start, _ = ckpt.load(modules, optimizers)
        print(f"resumed from {ckpt.path} at step {start}")
    else:
        for module in modules.values():
            init_normal(module)
    pool_a, pool_b = ImagePool(args.pool_size, random.Random(args.seed + start)), ImagePool(args.pool_size, random.Random(args.seed + start + 1))
    next_pair = data.batches(args.batch_size, args.seed + start)
    fixed_a = data.fixed
    losslog = LossLog(Path(args.out) / "log.csv")
    timer = Timer()
    last: dict[str, float] = {}
    bar = tqdm(range(start, args.iterations), initial=start, total=args.iterations, desc=f"train {spec.kind}", unit="step")
    for step in bar:
        factor = _lr_factor(step, args.iterations)
        for opt in (opt_g, opt_d):
            for group in opt.param_groups:
                group["lr"] = args.lr * factor
        real_a, real_b = (t.to(device) for t in next_pair())

        # Generators: fool both discriminators, close both cycles, keep in-domain images unchanged.
        _set_requires_grad([d_a, d_b], False)
        with precision.autocast():
            fake_b, fake_a = g_ab(real_a), g_ba(real_b)
            rec_a, rec_b = g_ba(fake_b), g_ab(fake_a)
            terms: dict[str, torch.Tensor] = {
                "g_adv": lsgan_loss(d_b(fake_b), True) + lsgan_loss(d_a(fake_a), True),
                "cycle": spec.lambda_cycle * (F.l1_loss(rec_a.float(), real_a) + F.l1_loss(rec_b.float(), real_b)),
            }
            if spec.lambda_identity > 0:
                terms["identity"] = spec.lambda_identity * (
                    F.l1_loss(g_ab(real_b).float(), real_b) + F.l1_loss(g_ba(real_a).float(), real_a)
                )
        if spec.extra_loss is not None:  # extra terms in fp32: windowed statistics and VGG features
            terms.update(spec.extra_loss(real_a, real_b, fake_b.float(), fake_a.float()))
        loss_g = sum(terms.values())
        precision.step(loss_g, opt_g)

        # Discriminators: real -> 1, (pooled) fake -> 0.
        _set_requires_grad([d_a, d_b], True)
        with precision.autocast():
            loss_d_b = 0.5 * (lsgan_loss(d_b(real_b), True) + lsgan_loss(d_b(pool_b.query(fake_b)), False))
            loss_d_a = 0.5 * (lsgan_loss(d_a(real_a), True) + lsgan_loss(d_a(pool_a.query(fake_a)), False))
        precision.step(loss_d_a + loss_d_b, opt_d)

        done = step + 1
        last = {k: float(v.detach()) for k, v in terms.items()}
        last.update(g_total=float(loss_g.detach()), d_a=float(loss_d_a.detach()), d_b=float(loss_d_b.detach()))
        if not torch.isfinite(loss_g.detach()):
            raise SystemExit(f"step {done}: generator loss is not finite ({last}); lower --lr or disable --amp")
        if done % args.log_every == 0 or done == args.iterations:
            losslog.write(done, {**last, "lr": args.lr * factor})
            bar.set_postfix(g=f"{last['g_total']:.3f}", d=f"{last['d_a'] + last['d_b']:.3f}")
        if done % args.val_every == 0 or done == args.iterations:
            with torch.no_grad():
                g_ab.eval()
                sample = g_ab(fixed_a.to(device)).float()
                g_ab.train()
            save_sample_grid(Path(args.out) / "samples" / f"step_{done:06d}.png", [fixed_a, sample], ["LQ input", f"{spec.name} output"])
        if done % args.checkpoint_every == 0 or done == args.iterations:
            ckpt.save(done, modules, optimizers)
    bar.close()

    name = args.name or spec.kind
    card = {
        "kind": spec.kind,
        "name": spec.name,
        "version": spec.version,
        "config": spec.generator_config,
        "direction": "LQ->HQ",
        "modality": args.modality,
        "channels": data.channels,
        "size": args.size,
        "working_max_side": data.working_max_side,
        "fov": data.fov,
        "parameters": count_parameters(g_ab),
        "training": {
            "iterations": args.iterations,
            "size": args.size,
            "batch_size": args.batch_size,
            "lr": args.lr,
            "seed": args.seed,
            "lambda_cycle": spec.lambda_cycle,
            "lambda_identity": spec.lambda_identity,
            "gan_loss": "least squares",
            **data.description,
            "hardware": hardware_description(device),
            "final_losses": last,
            "seconds": round(timer.seconds, 1),
            **spec.card_extra,
        },
    }
    out_path = Path(args.out) / f"{name}.pt"
    full = export_weights(out_path, g_ab.state_dict(), card)
    losses = ", ".join(f"{k} {v:.4g}" for k, v in last.items())
    print(f"{spec.name}: {args.iterations - start} steps in {timer.seconds:.1f} s on {device}; final losses: {losses}")
    print(f"exported {out_path} ({full['weights_bytes'] / 1e6:.1f} MB, sha256 {full['weights_sha256'][:12]}) + {out_path.with_suffix('.json').name}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_cycle_arguments(parser, lambda_identity=5.0, size=512)  # the paper trains at 512 x 512
    parser.add_argument("--depth", type=int, default=8, help="ResUNet levels; inputs are padded to multiples of 2**depth (default 8, the paper's)")
    parser.add_argument("--base-channels", type=int, default=64, help="generator width at full resolution (default 64)")
    parser.add_argument("--max-channels", type=int, default=512, help="generator width cap (default 512)")
    parser.add_argument("--alpha-illumination", type=float, default=1.0, help="illumination regularisation weight (default 1)")
    parser.add_argument("--beta-structure", type=float, default=5.0, help="structure loss weight (default 5)")
    parser.add_argument("--patch-sizes", type=int, nargs="+", default=[48, 96], help="illumination patch sizes (default 48 96)")


def main(args: argparse.Namespace) -> int:
    from models.losses.illumination import illumination_loss
    from models.losses.structure import structure_loss
    from models.stillgan import VERSION, PatchDiscriminator, StillGANConfig, build_generator

    def build_spec(channels: int) -> CycleGANSpec:
        try:
            config = StillGANConfig(channels=channels, depth=args.depth, base_channels=args.base_channels, max_channels=args.max_channels)
        except ValueError as exc:
            raise SystemExit(f"stillgan: {exc}") from exc

        def extra(real_a, real_b, fake_b, fake_a):
            return {
                "illumination": args.alpha_illumination * illumination_loss(fake_b, args.patch_sizes),
                "structure": args.beta_structure * (structure_loss(real_a, fake_b) + structure_loss(real_b, fake_a)),
            }

        return CycleGANSpec(
            kind="stillgan", name="StillGAN", version=VERSION,
            generator_config=config.to_dict(), make_generator=build_generator,
            make_discriminator=lambda: PatchDiscriminator(channels, args.ndf),
            lambda_cycle=args.lambda_cycle, lambda_identity=args.lambda_identity, extra_loss=extra,
            card_extra={"alpha_illumination": args.alpha_illumination, "beta_structure": args.beta_structure,
                        "patch_sizes": list(args.patch_sizes)},
        )

    return run_cycle_gan(args, build_spec)


if __name__ == "__main__":
    from models.train.common import run_as_script

    sys.exit(run_as_script(add_arguments, main, __doc__))
