"""What every training loop shares: arguments, seeding, devices and mixed precision, resumable
checkpoints, sample grids, and the export of shipped weights with their model card.

A training run writes into ``--out``: ``checkpoint_last.pt`` (everything needed to resume:
networks, optimisers, step, RNG states), ``samples/step_XXXXXX.png`` (LQ input | output grids at each
validation step), ``log.csv`` (losses), and at the end the exported ``MODEL.pt`` + ``MODEL.json``
(model card) that ``models.registry`` loads.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import time
from collections.abc import Iterable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models.io import load_image, load_state_dict  # noqa: F401  (load_state_dict re-exported for trainers)
from models.registry import card_path, sha256_file


def add_common_arguments(parser: argparse.ArgumentParser, *, size: int = 256, iterations: int = 2000, batch_size: int = 4, lr: float = 1e-4) -> None:
    """Flags every trainer takes, with the model's own defaults."""
    parser.add_argument("--out", type=Path, required=True, help="run folder: checkpoints, samples, log, exported weights")
    parser.add_argument("--size", type=int, default=size, help=f"training crop size in pixels (default {size})")
    parser.add_argument("--channels", type=int, choices=(1, 3), default=None, help="1 = gray, 3 = RGB (default: from the LQ images)")
    parser.add_argument("--iterations", type=int, default=iterations, help=f"optimisation steps (default {iterations})")
    parser.add_argument("--batch-size", type=int, default=batch_size, help=f"batch size (default {batch_size})")
    parser.add_argument("--lr", type=float, default=lr, help=f"learning rate (default {lr:g})")
    parser.add_argument("--seed", type=int, default=0, help="seed for weights, sampling and augmentation")
    parser.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:1 ...")
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=True, help="mixed precision on CUDA (bf16 where supported)")
    parser.add_argument("--checkpoint-every", type=int, default=250, help="steps between resumable checkpoints")
    parser.add_argument("--val-every", type=int, default=250, help="steps between sample grids")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint_last.pt")
    parser.add_argument("--modality", default=None, help="modality the model is for (goes into the model card), e.g. OP, ES, CCM")
    parser.add_argument("--name", default=None, help="exported file stem (default: the model kind)")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: no CUDA device is available")
    return device


@dataclass
class Precision:
    """Autocast + grad scaling for one device: bf16 (no scaler) or fp16 (scaler) on CUDA, fp32 on CPU."""

    device: torch.device
    enabled: bool = True

    def __post_init__(self) -> None:
        cuda = self.device.type == "cuda" and self.enabled
        self.dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda else torch.float32
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and self.dtype == torch.float16)

    def autocast(self):
        if self.dtype == torch.float32:
            return nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        """Backward + optimiser step, with loss scaling when fp16 needs it."""
        optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(optimizer)
        self.scaler.update()


class Checkpointer:
    """Atomic, resumable checkpoints: networks, optimisers, step and RNG state in one file."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.path = self.out / "checkpoint_last.pt"

    def save(self, step: int, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer], extra: Mapping[str, Any] | None = None) -> Path:
        state = {
            "step": step,
            "modules": {k: m.state_dict() for k, m in modules.items()},
            "optimizers": {k: o.state_dict() for k, o in optimizers.items()},
            "rng": {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()},
            "extra": dict(extra or {}),
        }
        tmp = self.path.with_suffix(".tmp")
        torch.save(state, tmp)
        os.replace(tmp, self.path)
        return self.path

    def load(self, modules: Mapping[str, nn.Module], optimizers: Mapping[str, torch.optim.Optimizer]) -> tuple[int, dict]:
        """Restore in place; returns (step, extra). SystemExit with the reason when there is nothing to resume."""
        if not self.path.is_file():
            raise SystemExit(f"--resume: no checkpoint at {self.path}")
        state = torch.load(self.path, map_location="cpu", weights_only=False)
        for k, m in modules.items():
            m.load_state_dict(state["modules"][k])
        for k, o in optimizers.items():
            o.load_state_dict(state["optimizers"][k])
        random.setstate(state["rng"]["python"])
        np.random.set_state(state["rng"]["numpy"])
        torch.set_rng_state(state["rng"]["torch"])
        return int(state["step"]), dict(state.get("extra", {}))


class LossLog:
    """Appends one CSV row of losses per logged step (the run's loss curve)."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._fields: list[str] | None = None

    def write(self, step: int, losses: Mapping[str, float]) -> None:
        row = {"step": step, **{k: f"{float(v):.6g}" for k, v in losses.items()}}
        new = not self.path.exists()
        if self._fields is None:
            self._fields = self._header() or list(row)
        if any(k not in self._fields for k in row):  # a resumed run logs a new term: widen the file's header
            rows = list(csv.DictReader(self.path.open())) if not new else []
            self._fields += [k for k in row if k not in self._fields]
            with open(self.path, "w", newline="") as fh:
                writer = csv.DictWriter(fh, fieldnames=self._fields)
                writer.writeheader()
                writer.writerows(rows)
            new = False
        with open(self.path, "a", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore")
            if new:
                writer.writeheader()
            writer.writerow(row)


    def _header(self) -> list[str] | None:
        if not self.path.is_file():
            return None
        with open(self.path, newline="") as fh:
            return next(csv.reader(fh), None)


def save_sample_grid(path: Path, rows: Sequence[torch.Tensor], labels: Sequence[str] | None = None) -> Path:
    """Save a grid: one row per tensor batch (B, C, H, W) in [0, 1] (e.g. LQ | enhanced | HQ)."""
    from skimage.io import imsave

    tiles = []
    for batch in rows:
        b = batch.detach().float().clamp(0, 1).cpu()
        if b.shape[1] == 1:
            b = b.repeat(1, 3, 1, 1)
        tiles.append(torch.cat(list(b), dim=2))  # (3, H, B*W)
    width = max(t.shape[2] for t in tiles)
    tiles = [torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in tiles]
    grid = torch.cat(tiles, dim=1).permute(1, 2, 0).numpy()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    imsave(path, (grid * 255).round().astype(np.uint8), check_contrast=False)
    if labels:
        path.with_suffix(".txt").write_text("rows: " + " | ".join(labels) + "\n")
    return path


def hardware_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()} x{os.cpu_count()} threads={torch.get_num_threads()}, torch {torch.__version__}"


def dataset_description(folder: Path, count: int) -> dict[str, Any]:
    return {"folder": str(folder), "count": count}


def export_weights(path: Path, state_dict: Mapping[str, torch.Tensor], card: Mapping[str, Any], *, half: bool = False) -> dict[str, Any]:
    """Write shipped weights (``X.pt``, state dict only) and their model card (``X.json``).

    ``card`` must name ``kind``, ``name``, ``version`` and ``config`` (the architecture, enough to rebuild
    the network); the sha256 of the weights file and the creation time are added here. ``half`` stores
    floating tensors as fp16 to halve shipped size; loaders cast back to fp32.
    """
    for key in ("kind", "name", "version", "config"):
        if key not in card:
            raise ValueError(f"model card needs {key!r}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sd = {k: (v.detach().half() if half and v.is_floating_point() else v.detach()).cpu().contiguous() for k, v in state_dict.items()}
    tmp = path.with_suffix(".pt.tmp")
    torch.save(sd, tmp)
    os.replace(tmp, path)
    full = dict(card)
    full["weights_sha256"] = sha256_file(path)
    full["weights_bytes"] = path.stat().st_size
    full["weights_dtype"] = "float16" if half else "float32"
    full["created"] = datetime.now(UTC).isoformat(timespec="seconds")
    card_path(path).write_text(json.dumps(full, indent=2, sort_keys=False) + "\n")
    return full


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


class Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    @property
    def seconds(self) -> float:
        return time.perf_counter() - self.start

    def over(self, minutes: float) -> bool:
        """Whether a budget of ``minutes`` (0 = none) is spent."""
        return minutes > 0 and self.seconds >= 60.0 * minutes


def add_budget_argument(parser: argparse.ArgumentParser) -> None:
    """``--max-minutes``: stop after this much training time as if the last iteration had come (sample grid,
    checkpoint, exported weights), so a short GPU lease ends with a usable model and an honest card."""
    parser.add_argument("--max-minutes", type=float, default=0.0,
                        help="stop after this many minutes of training, checkpointed and exported (default 0 = no limit)")


def infer_channels(paths: Iterable[Path]) -> int:
    """3 when any of the first images is colour, else 1."""
    for p in list(paths)[:4]:
        img = load_image(p, channels=3)
        if np.abs(img[..., 0] - img[..., 1]).max() > 1e-3 or np.abs(img[..., 1] - img[..., 2]).max() > 1e-3:
            return 3
    return 1


def run_as_script(add_arguments_fn, main_fn, doc: str | None) -> int:
    """``python -m models.train.X``: the same arguments as `dicomnode train X`, with logging to stderr."""
    import logging

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments_fn(parser)
    return int(main_fn(parser.parse_args()) or 0)
