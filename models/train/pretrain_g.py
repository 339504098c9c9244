"""Pretrain HQG-Net's guidance extractor G as an auto-encoder on HQ and LQ images (MSE + SSIM).

G (ResNet-18 + FC -> 64-d v_z) is the encoder; a transposed ResNet-18 decodes the image back from
v_z alone. As in the paper, LQ images are mixed in with the HQ ones so that v_z stays stable
when the guidance image itself is imperfect. The exported ``OUT/NAME.pt`` + ``.json`` holds G's
weights only; pass it to `dicomnode train hqgnet --g OUT/NAME.pt` with the same --config.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models.hqgnet import STRIDE, GuidanceAutoEncoder, config_by_name
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
    pick_device,
    save_sample_grid,
    seed_everything,
)
from models.train.data import DomainBatches, FieldImages, ImageFolder, folder_args, infinite, manifest_arg, read_manifest

log = logging.getLogger(__name__)

G_KIND = "hqgnet-g"
G_VERSION = "1.0.0"


def _gaussian_window(size: int, sigma: float, channels: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-(coords**2) / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(x: Tensor, y: Tensor, window: int = 11, sigma: float = 1.5) -> Tensor:
    """Mean SSIM of (N, C, H, W) images in [0, 1] (Wang et al. 2004, Gaussian window, valid region)."""
    x, y = x.float(), y.float()
    c = x.shape[1]
    w = _gaussian_window(window, sigma, c, x.device, x.dtype)
    mu_x, mu_y = F.conv2d(x, w, groups=c), F.conv2d(y, w, groups=c)
    sxx = F.conv2d(x * x, w, groups=c) - mu_x**2
    syy = F.conv2d(y * y, w, groups=c) - mu_y**2
    sxy = F.conv2d(x * y, w, groups=c) - mu_x * mu_y
    c1, c2 = 0.01**2, 0.03**2
    s = ((2 * mu_x * mu_y + c1) * (2 * sxy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sxx + syy + c2))
    return s.mean()


def reconstruction_loss(recon: Tensor, target: Tensor) -> dict[str, Tensor]:
    mse = F.mse_loss(recon.float(), target.float())
    s = ssim(recon, target)
    return {"mse": mse, "ssim": s, "loss": mse + (1.0 - s)}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--hq", type=Path, default=None, help="folder of high-quality images or DICOM files")
    parser.add_argument("--lq", type=Path, default=None, help="folder of low-quality images or DICOM files (mixed in for robustness)")
    parser.add_argument("--manifest", type=Path, default=None, help="instead of --hq/--lq: a training manifest (models.train.data.read_manifest); "
                        "crops of every domain's HQ and LQ images at the working scale")
    parser.add_argument("--aux-weight", type=float, default=0.0,
                        help="with --manifest: weight of an auxiliary linear classifier on v_z that names each crop's "
                             "(modality, HQ/LQ) set, so the embedding separates them (0 = the paper's plain auto-encoder)")
    parser.add_argument("--probe-manifest", type=Path, default=None,
                        help="a manifest of images G is not trained on: nearest-centroid accuracy of its embedding for modality and "
                             "HQ-vs-LQ is measured on them and written into the card")
    parser.add_argument("--config", choices=("lite", "paper"), default="lite", help="architecture of G (must match the later `train hqgnet --config`)")
    parser.add_argument("--init-weights", type=Path, default=None,
                        help="torchvision ImageNet resnet18 weights (.pth) to start G from (--config paper only; lite's G is narrower)")
    add_common_arguments(parser, size=192, iterations=1000, batch_size=8, lr=1e-3)
    add_budget_argument(parser)


def main(args: argparse.Namespace) -> int:
    if args.size % STRIDE:
        raise SystemExit(f"--size must be a multiple of {STRIDE}, got {args.size}")
    seed_everything(args.seed)
    device = pick_device(args.device)
    domains = None
    if args.manifest is not None:
        manifest = manifest_arg(args.manifest)
        domains = DomainBatches(manifest, args.size, seed=args.seed)
        channels = int(manifest["channels"])
        description = {"manifest": str(args.manifest), "max_side": int(manifest["max_side"]), "domains": domains.counts()}
        val = domains.any_images(4)
        class_names = [f"{d}/{role}" for d in domains.sets for role in ("hq", "lq")]

        def next_batch() -> tuple[Tensor, Tensor | None]:
            return domains.labeled_images(args.batch_size)
    else:
        lq_paths, hq_paths = folder_args(args.lq, args.hq)
        channels = args.channels or infer_channels(lq_paths)
        data = ImageFolder(hq_paths + lq_paths, args.size, channels, seed=args.seed)
        val = torch.stack([data[i] for i in range(min(4, len(data)))])  # fixed sample rows (first images)
        batches = infinite(data, args.batch_size, seed=args.seed)
        description = {"hq": dataset_description(args.hq, len(hq_paths)), "lq": dataset_description(args.lq, len(lq_paths))}

        class_names = []

        def next_batch() -> tuple[Tensor, Tensor | None]:
            return next(batches), None
    cfg = config_by_name(args.config, channels)

    ae = GuidanceAutoEncoder(cfg, args.size)
    if args.init_weights is not None:
        from models.train.hqgnet import init_from_torchvision

        init_from_torchvision(ae.g.backbone, args.init_weights, "--init-weights")
    ae = ae.to(device)
    aux = torch.nn.Linear(cfg.guidance_dim, len(class_names)).to(device) if args.aux_weight > 0 and class_names else None
    opt = torch.optim.Adam(list(ae.parameters()) + (list(aux.parameters()) if aux is not None else []),
                           lr=args.lr, betas=(0.9, 0.999))
    prec = Precision(device, args.amp)
    ckpt = Checkpointer(args.out)
    losslog = LossLog(args.out / "log.csv")
    step = 0
    if args.resume:
        step, extra = _resume(ckpt, ae, aux, opt)
    log.info("pretrain-g: %s config, %d channel(s), %s, %.2f M params, %s", cfg.name, channels, description, count_parameters(ae.g) / 1e6, device)

    timer = Timer()
    recent: list[dict[str, float]] = []
    from tqdm import tqdm

    ae.train()
    with tqdm(total=args.iterations, initial=step, desc="pretrain-g", unit="step", disable=None) as bar:
        while step < args.iterations:
            x, labels = next_batch()
            x = x.to(device, non_blocking=True)
            with prec.autocast():
                v_z = ae.g(x)
                recon = ae.decoder(v_z)
            losses = reconstruction_loss(recon, x)
            if aux is not None and labels is not None:
                losses["aux"] = F.cross_entropy(aux(v_z.float()), labels.to(device))
                losses["loss"] = losses["loss"] + args.aux_weight * losses["aux"]
            prec.step(losses["loss"], opt)
            step += 1
            values = {k: float(v.detach()) for k, v in losses.items()}
            recent = (recent + [values])[-50:]
            bar.update(1)
            bar.set_postfix(loss=f"{values['loss']:.4f}", ssim=f"{values['ssim']:.3f}")
            last = step == args.iterations or timer.over(args.max_minutes)
            if step % 10 == 0 or last:
                losslog.write(step, values)
            if step % args.val_every == 0 or last:
                ae.eval()
                with torch.no_grad():
                    save_sample_grid(args.out / "samples" / f"step_{step:06d}.png", [val, ae(val.to(device)).cpu()], ["input", "reconstruction"])
                ae.train()
            if step % args.checkpoint_every == 0 or last:
                ckpt.save(step, {"ae": ae, **({"aux": aux} if aux is not None else {})}, {"opt": opt},
                          extra={"aux": aux is not None})
            if last:
                break

    final = {k: sum(r[k] for r in recent) / len(recent) for k in recent[0]} if recent else {}
    probe = None
    if args.probe_manifest is not None and args.manifest is not None:
        ae.eval()
        probe = embedding_probe(ae.g, read_manifest(args.manifest), read_manifest(args.probe_manifest), args.size, device)
        log.info("pretrain-g: embedding probe on unseen images: %s", probe)
    name = args.name or f"{G_KIND}-{cfg.name}"
    card = {
        "kind": G_KIND,
        "name": "HQG-Net guidance extractor G",
        "version": G_VERSION,
        "config": cfg.to_dict(),
        "channels": channels,
        "size": args.size,
        "modality": args.modality,
        "training_data": description,
        "init_weights": str(args.init_weights) if args.init_weights else None,
        "iterations": step,
        "seconds": round(timer.seconds, 1),
        "hardware": hardware_description(device),
        "final_losses": final,
        "probe": probe,
        "aux_classifier": {"weight": args.aux_weight, "classes": class_names} if aux is not None else None,
        "command": " ".join(sys.argv),
    }
    path = args.out / f"{name}.pt"
    export_weights(path, ae.g.state_dict(), card)
    summary = ", ".join(f"{k} {v:.4f}" for k, v in final.items())
    print(f"pretrain-g: {step} steps in {timer.seconds:.0f} s; last-50 mean {summary}; G weights -> {path}")
    return 0


def _resume(ckpt: Checkpointer, ae: GuidanceAutoEncoder, aux: torch.nn.Module | None, opt: torch.optim.Optimizer) -> tuple[int, dict]:
    """Continue a run; a plain auto-encoder checkpoint may continue with the auxiliary classifier added
    (its optimiser restarts then, since the parameter set changed)."""
    state = torch.load(ckpt.path, map_location="cpu", weights_only=False) if ckpt.path.is_file() else None
    if state is not None and aux is not None and "aux" not in state["modules"]:
        ae.load_state_dict(state["modules"]["ae"])
        log.info("pretrain-g: continuing the auto-encoder of %s with the auxiliary classifier from step %d", ckpt.path, state["step"])
        return int(state["step"]), {}
    return ckpt.load({"ae": ae, **({"aux": aux} if aux is not None else {})}, {"opt": opt})


@torch.no_grad()
def embed_set(g: torch.nn.Module, images: FieldImages, device: torch.device, crops: int = 4) -> Tensor:
    """One embedding per image: the mean of G over a few fixed crops inside its field of view."""
    rng = np.random.default_rng(7)
    out = []
    for i in range(len(images)):
        batch = torch.stack([images.crop(i, rng)[0] for _ in range(crops)]).to(device)
        out.append(g(batch).float().mean(0).cpu())
    return torch.stack(out)


def embedding_probe(g: torch.nn.Module, train: dict, probe: dict, size: int, device: torch.device) -> dict[str, Any]:
    """Nearest-centroid accuracy of G's embedding on images it never saw: modality, and HQ vs LQ within one.

    Centroids come from the training manifest's images; each probe image is assigned to the nearest
    modality centroid and, within its true modality, to the nearer of the HQ and LQ centroids.
    """
    def sets(m: dict) -> dict[tuple[str, str], Tensor]:
        ch, side, fov = int(m["channels"]), int(m["max_side"]), bool(m.get("fov", True))
        return {(d, role): embed_set(g, FieldImages(items[role], ch, side, size, fov=fov), device)
                for d, items in m["domains"].items() for role in ("hq", "lq")}

    tr, pr = sets(train), sets(probe)
    domains = sorted({d for d, _ in tr})
    dom_centroid = {d: torch.cat([tr[(d, "hq")], tr[(d, "lq")]]).mean(0) for d in domains}
    correct_dom = correct_q = total = 0
    per_domain: dict[str, float] = {}
    for d in sorted({d for d, _ in pr}):
        hits = n = 0
        for role in ("hq", "lq"):
            for v in pr[(d, role)]:
                if len(domains) > 1:
                    guess = min(domains, key=lambda k: float((v - dom_centroid[k]).norm()))
                    correct_dom += guess == d
                near = min(("hq", "lq"), key=lambda r: float((v - tr[(d, r)].mean(0)).norm()))
                hits += near == role
                n += 1
        per_domain[d] = round(hits / n, 3)
        correct_q += hits
        total += n
    return {"n_images": total, "modality_accuracy": round(correct_dom / total, 3) if len(domains) > 1 else None,
            "hq_vs_lq_accuracy": round(correct_q / total, 3), "hq_vs_lq_by_modality": per_domain,
            "method": "nearest centroid (centroids from the training images; probe images unseen by G)"}


if __name__ == "__main__":
    from models.train.common import run_as_script

    sys.exit(run_as_script(add_arguments, main, __doc__))
