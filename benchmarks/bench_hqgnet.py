"""HQG-Net inference speed: seconds per image and images per second at 384x384 (the paper's size).

Run by hand; prints a table. Measures G (guidance, once per modality in the node) and E_gen
(every frame) separately, for the paper and lite configs, batch 1 and 8. On CUDA it also compares
fp32 with bf16 autocast, channels_last and torch.compile.

    .venv/bin/python benchmarks/bench_hqgnet.py                      # CPU, paper + lite
    .venv/bin/python benchmarks/bench_hqgnet.py --device cuda --compile
    .venv/bin/python benchmarks/bench_hqgnet.py --configs lite --batches 1 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time
from contextlib import nullcontext

import torch

from models.hqgnet import build_hqgnet, config_by_name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``fn()`` after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def variants(device: torch.device, compile_: bool) -> list[tuple[str, torch.dtype | None, bool, bool]]:
    """(label, autocast dtype, channels_last, compiled)."""
    if device.type != "cuda":
        out = [("fp32", None, False, False)]
        if compile_:
            out.append(("fp32 compile", None, False, True))
        return out
    bf16 = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    out = [("fp32", None, False, False), ("bf16", bf16, False, False), ("bf16 channels_last", bf16, True, False)]
    if compile_:
        out.append(("bf16 channels_last compile", bf16, True, True))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", nargs="+", default=["paper", "lite"], choices=["paper", "lite"])
    parser.add_argument("--size", type=int, default=384)
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--channels", type=int, default=None, help="default: 3 for paper, 1 for lite")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true", help="also time torch.compile'd models")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    device = torch.device(args.device)
    hw = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(f"HQG-Net inference, {args.size}x{args.size}, {hw}, torch {torch.__version__}")
    print(f"{'config':<6} {'variant':<28} {'batch':>5} {'G s/img':>9} {'E_gen s/img':>12} {'img/s':>8}")
    for name in args.configs:
        channels = args.channels or (3 if name == "paper" else 1)
        net = build_hqgnet(config_by_name(name, channels)).to(device).eval()
        for label, dtype, channels_last, compiled in variants(device, args.compile):
            model = net.to(memory_format=torch.channels_last) if channels_last else net
            gen = torch.compile(model.gen) if compiled else model.gen
            g = torch.compile(model.g) if compiled else model.g
            for batch in args.batches:
                x = torch.rand(batch, channels, args.size, args.size, device=device)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()
                with torch.inference_mode(), amp:
                    v = g(x[:1])
                    t_g = time_call(lambda g=g, x=x: g(x), device, args.warmup, args.repeats) / batch
                    t_e = time_call(lambda gen=gen, x=x, v=v: gen(x, v), device, args.warmup, args.repeats) / batch
                print(f"{name:<6} {label:<28} {batch:>5} {t_g:>9.4f} {t_e:>12.4f} {1.0 / t_e:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
