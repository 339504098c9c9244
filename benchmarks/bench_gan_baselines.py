"""GAN baselines: node inference time per frame and training step time (StillGAN, LaMEGAN).

    .venv/bin/python benchmarks/bench_gan_baselines.py                 # 384x384, gray and RGB, CPU
    .venv/bin/python benchmarks/bench_gan_baselines.py --size 512 --device cuda --repeats 20

Inference runs through the registry (export -> build_model -> enhance), i.e. exactly what the node
does, with random weights (speed does not depend on their values). StillGAN is measured at the
paper's depth 8 (frames padded to multiples of 256: 384 -> 512) and depth 7 (multiples of 128: 384
needs no padding). The training step covers both generators, both discriminators and all losses.
Prints median seconds; run by hand on an otherwise idle machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from models import lamegan, stillgan  # noqa: E402
from models.registry import build_model  # noqa: E402
from models.train.common import export_weights  # noqa: E402


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN kernels)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def inference(kind: str, config, size: int, device: str, repeats: int, folder: Path) -> float:
    make = stillgan.build_generator if kind == "stillgan" else lamegan.build_generator
    net = make(config)
    path = folder / f"{kind}_{config.channels}.pt"
    export_weights(path, net.state_dict(), {"kind": kind, "name": kind, "version": "bench", "config": config.to_dict()})
    model = build_model(kind, weights=path, device=device, options={"batch_size": 1})
    shape = (size, size) if config.channels == 1 else (size, size, 3)
    frame = np.random.default_rng(0).random(shape, dtype=np.float32)
    return _median_seconds(lambda: model.enhance([frame]), repeats)


def train_step(kind: str, size: int, device: str, repeats: int) -> float:
    """One optimisation step of both directions with the paper's losses, batch 1, RGB."""
    from models.losses.illumination import illumination_loss
    from models.losses.laplacian import LaplacianPerceptualLoss
    from models.losses.structure import structure_loss
    from models.pretrained import resolve_vgg16

    dev = torch.device(device)
    if kind == "stillgan":
        cfg = stillgan.StillGANConfig(channels=3)
        g_ab, g_ba = stillgan.build_generator(cfg).to(dev), stillgan.build_generator(cfg).to(dev)

        def extra(a, b, fb, fa):
            return illumination_loss(fb) + 5 * (structure_loss(a, fb) + structure_loss(b, fa))
    else:
        cfg = lamegan.LaMEGANConfig(channels=3)
        g_ab, g_ba = lamegan.build_generator(cfg).to(dev), lamegan.build_generator(cfg).to(dev)
        stp = LaplacianPerceptualLoss(resolve_vgg16().state_dict).to(dev)

        def extra(a, b, fb, fa):
            return 0.25 * (stp(fb, a) + stp(fa, b))

    d_a, d_b = stillgan.PatchDiscriminator(3).to(dev), stillgan.PatchDiscriminator(3).to(dev)
    params = [*g_ab.parameters(), *g_ba.parameters()]
    opt_g = torch.optim.Adam(params, lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam([*d_a.parameters(), *d_b.parameters()], lr=2e-4, betas=(0.5, 0.999))
    a, b = torch.rand(1, 3, size, size, device=dev), torch.rand(1, 3, size, size, device=dev)

    def step():
        fb, fa = g_ab(a), g_ba(b)
        loss = (stillgan.lsgan_loss(d_b(fb), True) + stillgan.lsgan_loss(d_a(fa), True)
                + 10 * ((g_ba(fb) - a).abs().mean() + (g_ab(fa) - b).abs().mean()) + extra(a, b, fb, fa))
        opt_g.zero_grad()
        loss.backward()
        opt_g.step()
        ld = (stillgan.lsgan_loss(d_b(b), True) + stillgan.lsgan_loss(d_b(fb.detach()), False)
              + stillgan.lsgan_loss(d_a(a), True) + stillgan.lsgan_loss(d_a(fa.detach()), False))
        opt_d.zero_grad()
        ld.backward()
        opt_d.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    return _median_seconds(step, repeats)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=384, help="inference frame size (default 384)")
    parser.add_argument("--train-size", type=int, default=256, help="training crop size (default 256)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-train", action="store_true")
    args = parser.parse_args()
    cases = [
        ("stillgan", "StillGAN depth 8", stillgan.StillGANConfig(channels=1, depth=8)),
        ("stillgan", "StillGAN depth 8", stillgan.StillGANConfig(channels=3, depth=8)),
        ("stillgan", "StillGAN depth 7", stillgan.StillGANConfig(channels=3, depth=7)),
        ("lamegan", "LaMEGAN", lamegan.LaMEGANConfig(channels=1)),
        ("lamegan", "LaMEGAN", lamegan.LaMEGANConfig(channels=3)),
    ]
    print(f"device {args.device}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind, label, cfg in tqdm(cases, desc="inference"):
            rows.append((f"{label} {'RGB' if cfg.channels == 3 else 'gray'} enhance {args.size}x{args.size}",
                         inference(kind, cfg, args.size, args.device, args.repeats, Path(tmp))))
    if not args.skip_train:
        for kind in tqdm(("stillgan", "lamegan"), desc="training step"):
            rows.append((f"{kind} train step RGB {args.train_size}x{args.train_size} batch 1",
                         train_step(kind, args.train_size, args.device, args.repeats)))
    print()
    for name, seconds in rows:
        print(f"{name:<55} {seconds:8.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
