"""Node models for the GAN baselines: the LQ -> HQ generator of an exported StillGAN or LaMEGAN.

The weights file holds only that generator's state dict; its model card (checked by
``registry.read_card``: sha256) names the kind and the architecture config. Frames of any size go
through (the generators pad and crop internally); frames of equal shape are batched. A gray frame
given to an RGB model is tiled to 3 channels and the result converted back to gray; an RGB frame
given to a gray model has its intensity (HSV value) enhanced and the chroma kept, the same rule as
the classical enhancers, so hues do not shift. fp32 on CPU, autocast (bf16 where supported, else
fp16) on CUDA.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from models.color import apply_to_intensity, intensity
from models.padding import fill_batch
from models.registry import Enhancer, ModelInfo, ModelLoadError, read_card

log = logging.getLogger(__name__)

ALLOWED_OPTIONS = {"batch_size", "amp", "max_side"}


class GANEnhancer(Enhancer):
    """Runs one generator on batches of [0, 1] frames."""

    def __init__(self, net: nn.Module, channels: int, info: ModelInfo, device: str = "cpu", *, batch_size: int = 4,
                 amp: bool = True, max_side: int | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.max_side = max_side
        self.net = net.to(device).eval()
        self.channels = channels
        self.info = info
        self.device = device
        self.batch_size = batch_size
        cuda = torch.device(device).type == "cuda"
        self._dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if cuda and amp else None

    def _autocast(self):
        if self._dtype is None:
            return nullcontext()
        return torch.autocast("cuda", dtype=self._dtype)

    def _to_model(self, img: np.ndarray) -> np.ndarray:
        """Frame -> (C, H, W) model input."""
        if self.channels == 3:
            rgb = img if img.ndim == 3 else np.repeat(img[..., None], 3, axis=2)
            return np.transpose(rgb, (2, 0, 1))
        gray = img if img.ndim == 2 else intensity(img)
        return gray[None]

    def _from_model(self, out: np.ndarray, img: np.ndarray) -> np.ndarray:
        """(C, H, W) model output -> frame in the input's layout."""
        if self.channels == 3:
            rgb = np.transpose(out, (1, 2, 0))
            return rgb if img.ndim == 3 else intensity(rgb)
        new = out[0]
        if img.ndim == 2:
            return new
        return apply_to_intensity(img, lambda _v: new)

    def _generate(self, batch: torch.Tensor) -> torch.Tensor:
        """The generator at the scale it learnt: a larger frame is shrunk to ``max_side`` and the
        output/input ratio carried back to the full frame, whose own detail stays."""
        h, w = batch.shape[-2:]
        if self.max_side is None or max(h, w) <= self.max_side:
            return self.net(batch)
        scale = self.max_side / max(h, w)
        small = F.interpolate(batch.float(), size=(max(1, round(h * scale)), max(1, round(w * scale))), mode="area")
        ratio = (self.net(small).float() + 1e-3) / (small + 1e-3)
        return (batch.float() * F.interpolate(ratio, size=(h, w), mode="bilinear", align_corners=False)).clamp(0, 1)

    @torch.inference_mode()
    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        frames = []
        for i, image in enumerate(images):
            img = np.clip(np.asarray(image, dtype=np.float32), 0.0, 1.0)
            if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
                raise ValueError(f"frame {i}: expected (H, W) or (H, W, 3), got shape {img.shape}")
            frames.append(img)
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        for i, img in enumerate(frames):
            groups[img.shape[:2]].append(i)
        results: list[np.ndarray | None] = [None] * len(frames)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                batch = fill_batch(torch.from_numpy(np.stack([self._to_model(frames[i]) for i in chunk])).to(self.device),
                                   self.batch_size)
                with self._autocast():
                    out = self._generate(batch)
                out = out.float().clamp(0, 1).cpu().numpy()
                for j, i in enumerate(chunk):
                    results[i] = np.clip(self._from_model(out[j], frames[i]), 0, 1).astype(np.float32)
        return results  # type: ignore[return-value]


def _load(
    kind: str,
    name: str,
    make_net: Callable[[dict[str, Any]], nn.Module],
    *,
    weights: Path | None,
    device: str,
    options: dict[str, Any],
) -> GANEnhancer:
    unknown = set(options) - ALLOWED_OPTIONS
    if unknown:
        raise ModelLoadError(f"{kind}: unknown option(s) {sorted(unknown)}; allowed: {sorted(ALLOWED_OPTIONS)}")
    if weights is None:
        raise ModelLoadError(f"{kind}: needs trained weights (train them with `dicomnode train {kind}`)")
    card = read_card(weights)
    if card.kind != kind:
        raise ModelLoadError(f"{weights}: model card is for kind {card.kind!r}, not {kind!r}")
    config = dict(card.config)
    if not config:
        raise ModelLoadError(f"{weights}: model card has no architecture config")
    try:
        net = make_net(config)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"{weights}: bad architecture config in the model card: {exc}") from exc
    try:
        state = torch.load(weights, map_location="cpu", weights_only=True)
        net.load_state_dict({k: (v.float() if v.is_floating_point() else v) for k, v in state.items()}, strict=True)
    except (RuntimeError, OSError, AttributeError) as exc:
        raise ModelLoadError(f"{weights}: weights do not match the {name} architecture of its card: {exc}") from exc
    values: dict[str, int | None] = {"batch_size": options.get("batch_size", 4 if torch.device(device).type == "cuda" else 1), "max_side": options.get("max_side", card.working_max_side)}
    for key, value in values.items():
        try:
            values[key] = None if value is None and key == "max_side" else int(value)  # type: ignore[arg-type]
            if values[key] is not None and values[key] < 1:  # type: ignore[operator]
                raise ValueError("must be >= 1")
        except (TypeError, ValueError) as exc:
            raise ModelLoadError(f"{kind}: option {key}={value!r} {exc}") from exc
    batch_size, max_side = int(values["batch_size"] or 1), values["max_side"]
    info = ModelInfo(kind=kind, name=name, version=card.version, weights_sha256=card.weights_sha256, card=card,
                     options={"max_side": max_side, "device": torch.device(device).type, "batch_size": batch_size})
    log.info("loaded %s weights sha256 %s on %s (working side %s)", name, str(card.weights_sha256)[:12], device, max_side or "native")
    return GANEnhancer(net, int(config["channels"]), info, device, batch_size=batch_size, amp=bool(options.get("amp", True)),
                       max_side=max_side)


def build_stillgan(*, weights: Path | None, device: str, options: dict[str, Any]) -> GANEnhancer:
    from models.stillgan import build_generator

    return _load("stillgan", "StillGAN", build_generator, weights=weights, device=device, options=options)


def build_lamegan(*, weights: Path | None, device: str, options: dict[str, Any]) -> GANEnhancer:
    from models.lamegan import build_generator

    return _load("lamegan", "LaMEGAN", build_generator, weights=weights, device=device, options=options)
