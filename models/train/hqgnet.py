"""Train HQG-Net on unpaired LQ and HQ folders (images or DICOM); with --masks, HQG-Net+.

Each step draws an LQ batch y and an HQ batch z, computes v_z = G(z) with the pretrained, frozen
G (--g, from `dicomnode train pretrain-g`), enhances x_hat = E_gen(y, v_z), then
  - updates the PatchGAN E_dis on HQ z (real) against x_hat (fake), and
  - updates E_gen on L^e = L_Haar + lambda1 L_FC + lambda2 L_GAN (Eqs. 7-11).
With --masks (LQ masks, same file stems) a small U-Net segmenter Theta is trained jointly on
Theta(x_hat) and E_gen on L^d + lambda3 L^e (bi-level cooperative training, Eqs. 15-18).
Adam(0.5, 0.99), lr 1e-4, batch 4, random flips, as in the paper. The export ``OUT/NAME.pt`` +
``.json`` (G + E_gen) loads with `build_model("hqgnet", weights=...)`.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from models.hqgnet import (
    STRIDE,
    HQGNet,
    HQGNetConfig,
    LossWeights,
    build_discriminator,
    clamp_rho_,
    config_by_name,
    enhancement_loss,
)
from models.losses.gan import discriminator_loss
from models.registry import ModelCard, ModelLoadError, read_card
from models.segmenter import SmallUNet, UNetConfig, segmentation_loss
from models.train.common import (
    Checkpointer,
    LossLog,
    Precision,
    Timer,
    add_budget_argument,
    add_common_arguments,
    count_parameters,
    dataset_description,
    export_weights,
    hardware_description,
    infer_channels,
    load_state_dict,
    pick_device,
    save_sample_grid,
    seed_everything,
)
from models.train.data import DomainBatches, ImageFolder, folder_args, infinite, manifest_arg

log = logging.getLogger(__name__)

KIND = "hqgnet"
MODEL_NAME = "HQG-Net"
VERSION = "1.0.0"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--lq", type=Path, default=None, help="folder of low-quality images or DICOM files (to enhance)")
    parser.add_argument("--hq", type=Path, default=None, help="folder of high-quality images or DICOM files (guidance and 'real' for E_dis)")
    parser.add_argument("--manifest", type=Path, default=None,
                        help="instead of --lq/--hq: a JSON manifest of domains (modalities) with weighted LQ/HQ images, kept at a "
                             "working scale with field-of-view masks; each batch pairs LQ and HQ of one domain (see models.train.data)")
    parser.add_argument("--g", type=Path, default=None, help="pretrained G weights from `dicomnode train pretrain-g` (strongly advised)")
    parser.add_argument("--masks", type=Path, default=None, help="segmentation masks of the LQ images (same stems): HQG-Net+ bi-level training")
    parser.add_argument("--config", choices=("lite", "paper"), default="lite", help="architecture (default lite: trains on CPU)")
    parser.add_argument("--lambda1", type=float, default=10.0, help="weight of L_FC in L_CA (Eq. 9, default 10)")
    parser.add_argument("--lambda2", type=float, default=1.0, help="weight of L_GAN in L^e (Eq. 11, default 1)")
    parser.add_argument("--haar-weight", type=float, default=1.0,
                        help="weight of L_Haar (a mean over coefficients, where the paper's L1 is a sum): see LossWeights")
    parser.add_argument("--lambda3", type=float, default=5.0, help="weight of L^e against L^d with --masks (Eq. 15, default 5)")
    parser.add_argument("--encoder-weights", type=Path, default=None,
                        help="torchvision ImageNet weights (.pth) to start E_e from: resnet50 for --config paper (the lite encoder is narrower and cannot use them)")
    parser.add_argument("--half", action="store_true", help="export weights as fp16 (half the file size)")
    parser.add_argument("--head", choices=("affine", "image"), default=None, help="output head (default: the preset's, affine)")
    parser.add_argument("--keep-every", type=int, default=0, help="also keep a copy of the checkpoint every N steps (for comparisons at equal steps)")
    parser.add_argument("--grad-every", type=int, default=50, help="steps between measurements of each loss term's gradient at x_hat (logged)")
    add_common_arguments(parser, size=192, iterations=2000, batch_size=4, lr=1e-4)
    add_budget_argument(parser)


def load_pretrained_g(net: HQGNet, path: Path) -> ModelCard:
    """Load G weights exported by pretrain-g into ``net.g``; SystemExit naming any mismatch."""
    try:
        card = read_card(path)
    except ModelLoadError as exc:
        raise SystemExit(f"--g: {exc}") from None
    if card.kind != "hqgnet-g":
        raise SystemExit(f"--g: {path} is a {card.kind!r} model, not G weights from `dicomnode train pretrain-g`")
    theirs = HQGNetConfig.from_dict(dict(card.config)).g_signature()
    ours = net.cfg.g_signature()
    if theirs != ours:
        diff = {k: (theirs[k], ours[k]) for k in ours if theirs[k] != ours[k]}
        raise SystemExit(f"--g: G in {path} does not fit this config (theirs, ours): {diff}; pretrain with the same --config and --channels")
    net.g.load_state_dict(load_state_dict(path))
    return card


def init_from_torchvision(backbone: torch.nn.Module, path: Path, flag: str) -> None:
    """Start a ResNet backbone from torchvision weights; SystemExit naming the mismatch."""
    from models.backbones.resnet import load_torchvision_state_dict

    if not Path(path).is_file():
        raise SystemExit(f"{flag}: file not found: {path}")
    try:
        load_torchvision_state_dict(backbone, path)
    except (ValueError, RuntimeError, OSError) as exc:
        raise SystemExit(f"{flag}: {path} does not fit this backbone: {exc}") from None
    log.info("%s: backbone initialised from %s", flag, path)


def resumed_config(path: Path, preset: HQGNetConfig) -> HQGNetConfig:
    """The architecture a checkpoint was trained with (stored in it), so --resume continues that network
    even when the preset changed since. Checkpoints that stored none predate the decoder normalisation
    and the affine head: they are read the way the registry's card filter reads old cards."""
    if not path.is_file():
        return preset  # Checkpointer.load reports the missing checkpoint
    state = torch.load(path, map_location="cpu", weights_only=False)
    stored = state.get("extra", {}).get("config")
    if stored:
        cfg = HQGNetConfig.from_dict(dict(stored))
    else:
        cfg = replace(preset, norm="none", head="image")
    if cfg != preset:
        log.warning("--resume: continuing the architecture stored in %s (%s), not the current %r preset", path, cfg.to_dict(), preset.name)
    return cfg


class _Folders:
    """Unpaired LQ/HQ folders (optionally with LQ segmentation masks): the generic `train hqgnet` input."""

    def __init__(self, args: argparse.Namespace, channels: int, lq_paths: list[Path], hq_paths: list[Path]):
        try:
            self.lq = ImageFolder(lq_paths, args.size, channels, masks=args.masks, seed=args.seed)
        except ValueError as exc:
            raise SystemExit(str(exc)) from None
        self.hq = ImageFolder(hq_paths, args.size, channels, seed=args.seed + 1)
        self.lq_batches = infinite(self.lq, args.batch_size, seed=args.seed)
        self.hq_batches = infinite(self.hq, args.batch_size, seed=args.seed + 1)
        self.bilevel = args.masks is not None
        self.description = {"lq": dataset_description(args.lq, len(lq_paths)), "hq": dataset_description(args.hq, len(hq_paths)),
                            **({"masks": str(args.masks)} if self.bilevel else {})}

    def next(self, batch: int):
        b = next(self.lq_batches)
        y, seg_mask = (b[0], b[1]) if self.bilevel else (b, None)
        z = next(self.hq_batches)
        return "default", y, torch.ones_like(y[:, :1]), z, seg_mask

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        def first(item):
            return item[0] if isinstance(item, tuple) else item
        return torch.stack([first(self.lq[i]) for i in range(min(4, len(self.lq)))]), first(self.hq[0])[None]

    def hq_crops(self) -> list[torch.Tensor]:
        return [(self.hq[i][0] if isinstance(self.hq[i], tuple) else self.hq[i])[None] for i in range(len(self.hq))]


class _Manifest:
    """Domain-paired batches from a manifest: LQ and HQ of one modality per batch, with field-of-view masks."""

    def __init__(self, args: argparse.Namespace):
        self.manifest = manifest_arg(args.manifest)
        self.batches = DomainBatches(self.manifest, args.size, seed=args.seed)
        self.channels = int(self.manifest["channels"])
        self.bilevel = False
        self.description = {"manifest": str(args.manifest), "max_side": int(self.manifest["max_side"]),
                            "domains": {n: {**c, "weight": float(self.manifest["domains"][n].get("weight", 1.0))}
                                        for n, c in self.batches.counts().items()}}

    def next(self, batch: int):
        _, y, my, z, _ = self.batches.next(batch)
        return _, y, my, z, None

    def validation(self) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng(123)
        ys, zs = [], []
        for lq, hq in self.batches.sets.values():
            ys.append(lq.crop(0, rng, augment=False)[0])
            zs.append(hq.crop(0, rng, augment=False)[0])
        return torch.stack(ys[:4]), zs[0][None]

    def hq_crops(self) -> list[torch.Tensor]:
        rng = np.random.default_rng(0)
        return [hq.crop(i, rng, augment=False)[0][None] for _, hq in self.batches.sets.values() for i in range(len(hq))]


def soft_field(mask: torch.Tensor, radius: int = 2) -> torch.Tensor:
    """Feathered field-of-view mask for blending (B, 1, H, W): eroded by ``radius`` px, then smoothed."""
    if bool((mask > 0.5).all()):
        return torch.ones_like(mask)
    k = 2 * radius + 1
    eroded = -F.max_pool2d(-mask, k, stride=1, padding=radius)
    return F.avg_pool2d(eroded, k, stride=1, padding=radius, count_include_pad=False)


def term_gradients(x_hat: torch.Tensor, losses: dict[str, torch.Tensor], weights: LossWeights) -> dict[str, float]:
    """Norm of each weighted loss term's gradient at x_hat: how much each term actually steers the output."""
    terms = {"haar": weights.haar * losses["haar"], "fc": weights.lambda1 * losses["fc"], "gan": weights.lambda2 * losses["gan"]}
    out = {}
    for name, value in terms.items():
        (g,) = torch.autograd.grad(value, x_hat, retain_graph=True, allow_unused=True)
        out[f"grad_{name}"] = float(g.norm()) if g is not None else 0.0
    return out


def main(args: argparse.Namespace) -> int:
    if args.size % STRIDE:
        raise SystemExit(f"--size must be a multiple of {STRIDE}, got {args.size}")
    if args.manifest is not None and args.masks is not None:
        raise SystemExit("--masks (HQG-Net+) works with --lq/--hq folders, not with --manifest")
    seed_everything(args.seed)
    device = pick_device(args.device)
    if args.manifest is not None:
        source = _Manifest(args)
        channels = source.channels
    else:
        lq_paths, hq_paths = folder_args(args.lq, args.hq)
        channels = args.channels or infer_channels(lq_paths)
        source = _Folders(args, channels, lq_paths, hq_paths)
    cfg = config_by_name(args.config, channels)
    if args.head:
        cfg = replace(cfg, head=args.head)
    if args.resume:
        cfg = resumed_config(args.out / "checkpoint_last.pt", cfg)
    weights = LossWeights(args.lambda1, args.lambda2, args.lambda3, haar=args.haar_weight)
    bilevel = source.bilevel

    net = HQGNet(cfg).to(device)
    g_card = None
    if args.g is not None:
        g_card = load_pretrained_g(net, args.g)
    else:
        log.warning("no --g given: G is untrained, so v_z carries no learned HQ cue; run `dicomnode train pretrain-g` first")
    if args.encoder_weights is not None:
        init_from_torchvision(net.gen.encoder, args.encoder_weights, "--encoder-weights")
    net.g.requires_grad_(False)  # G is the fixed HQ cue extractor; gradients still flow through it to x_hat (L_FC)
    disc = build_discriminator(cfg).to(device)
    seg = SmallUNet(UNetConfig(channels=channels)).to(device) if bilevel else None
    enh_params = list(net.gen.parameters()) + (list(seg.parameters()) if seg is not None else [])
    opt_e = torch.optim.Adam(enh_params, lr=args.lr, betas=(0.5, 0.99))
    opt_d = torch.optim.Adam(disc.parameters(), lr=args.lr, betas=(0.5, 0.99))
    prec = Precision(device, args.amp)
    modules = {"net": net, "disc": disc, **({"seg": seg} if seg is not None else {})}
    optimizers = {"opt_e": opt_e, "opt_d": opt_d}
    ckpt = Checkpointer(args.out)
    losslog = LossLog(args.out / "log.csv")
    step = 0
    if args.resume:
        step, _ = ckpt.load(modules, optimizers)
        if isinstance(source, _Manifest):  # continue the sampling stream, not repeat it from the start
            source.batches.rng = np.random.default_rng([args.seed, step])

    val_y, val_z = (t.to(device) for t in source.validation())
    log.info("hqgnet: %s config (%s head), %d channel(s), %s%s, E_gen %.2f M params, %s",
             cfg.name, cfg.head, channels, source.description, " + masks (HQG-Net+)" if bilevel else "",
             count_parameters(net.gen) / 1e6, device)

    def set_train() -> None:
        net.train()
        net.g.eval()  # frozen: BN uses its pretrained statistics
        disc.train()
        if seg is not None:
            seg.train()

    from tqdm import tqdm

    timer = Timer()  # also the --max-minutes budget: it counts from the first step, not from loading
    recent: list[dict[str, float]] = []
    grads: dict[str, float] = {}
    set_train()
    with tqdm(total=args.iterations, initial=step, desc="hqgnet+" if bilevel else "hqgnet", unit="step", disable=None) as bar:
        while step < args.iterations:
            _, y, field, z, seg_mask = source.next(args.batch_size)
            y, z, field = y.to(device), z.to(device), soft_field(field.to(device))
            with prec.autocast():
                with torch.no_grad():
                    v_z = net.g(z)
                x_hat, v_c = net.gen(y, v_z)
                x_hat = field * x_hat + (1.0 - field) * y  # the surround outside the field of view stays as it was
                d_loss = discriminator_loss(disc(z), disc(x_hat.detach()))
            prec.step(d_loss, opt_d)
            with prec.autocast():
                losses = enhancement_loss(net, y, x_hat, v_c, disc(x_hat), weights)
                total = losses["e"]
                if seg is not None:
                    losses["seg"] = segmentation_loss(seg(x_hat), seg_mask.to(device))
                    total = losses["seg"] + weights.lambda3 * losses["e"]
                losses["total"] = total
            if args.grad_every and (step % args.grad_every == 0):
                grads = term_gradients(x_hat, losses, weights)
            prec.step(total, opt_e)
            clamp_rho_(net.gen)
            step += 1
            values = {"d": float(d_loss.detach()), **{k: float(v.detach()) for k, v in losses.items()}, **grads}
            recent = (recent + [values])[-50:]
            bar.update(1)
            bar.set_postfix(e=f"{values['e']:.3f}", haar=f"{values['haar']:.4f}", fc=f"{values['fc']:.4f}", d=f"{values['d']:.3f}")
            last = step == args.iterations or timer.over(args.max_minutes)
            if step % 10 == 0 or last:
                losslog.write(step, values)
            if step % args.val_every == 0 or last:
                net.eval()
                with torch.no_grad():
                    out = net.enhance(val_y, net.extract_guidance(val_z))
                save_sample_grid(args.out / "samples" / f"step_{step:06d}.png", [val_y, out, val_z], ["LQ input", "enhanced", "HQ guidance"])
                set_train()
            if step % args.checkpoint_every == 0 or last:
                ckpt.save(step, modules, optimizers, extra={"config": cfg.to_dict()})
                if args.keep_every and step % args.keep_every == 0:
                    shutil.copyfile(ckpt.path, args.out / f"checkpoint_{step:06d}.pt")
            if last:
                break

    net.eval()
    with torch.no_grad():  # mean HQ guidance vector: a ready default for the node's per-modality cache
        vz = [net.extract_guidance(c.to(device)) for c in source.hq_crops()]
        hq_guidance = torch.cat(vz).mean(0).float().cpu().tolist()
    final = {k: sum(r.get(k, 0.0) for r in recent) / len(recent) for k in recent[-1]} if recent else {}
    card = {
        "kind": KIND,
        "name": MODEL_NAME + ("+" if bilevel else ""),
        "version": VERSION,
        "config": cfg.to_dict(),
        "channels": channels,
        "size": args.size,
        **({"working_max_side": int(source.manifest["max_side"]), "fov": bool(source.manifest.get("fov", False))}
           if isinstance(source, _Manifest) else {}),
        "modality": args.modality,
        "training_data": {
            **source.description,
            "g_weights": {"path": str(args.g), "sha256": g_card.weights_sha256} if g_card else None,
            "encoder_init": str(args.encoder_weights) if args.encoder_weights else None,
        },
        "loss_weights": {"haar": weights.haar, "lambda1": weights.lambda1, "lambda2": weights.lambda2, **({"lambda3": weights.lambda3} if bilevel else {})},
        "iterations": step,
        "seconds": round(timer.seconds, 1),
        "hardware": hardware_description(device),
        "final_losses": final,
        "hq_guidance_mean": hq_guidance,
        "command": " ".join(sys.argv),
    }
    name = args.name or f"{KIND}-{cfg.name}"
    path = args.out / f"{name}.pt"
    export_weights(path, net.state_dict(), card, half=args.half)
    if seg is not None:
        torch.save(seg.state_dict(), args.out / f"{name}-segmenter.pt")
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    print(f"hqgnet: {step} steps in {timer.seconds:.0f} s; last-50 mean {summary}; weights -> {path}")
    return 0


if __name__ == "__main__":
    from models.train.common import run_as_script

    sys.exit(run_as_script(add_arguments, main, __doc__))
