"""Registry builder for HQG-Net (``kind: hqgnet`` / ``hqgnet-lite``): trained weights -> Enhancer.

The card's ``config`` rebuilds the network; its ``size`` is the training size, to which guidance
images are fitted (shorter side resized, centre crop), since G learned its statistics there.
Frames are enhanced at their own size (padded to a multiple of 32 inside the model), grouped by
shape into batches on the model's device: fp32 on CPU; on CUDA autocast (bf16, else fp16) and
channels_last, which is what the tensor cores want.

Channel mismatch is resolved in colour space rather than refused: a gray model enhances the
luma (BT.601 Y) of an RGB frame and keeps its chroma (Cb, Cr); an RGB model given a gray frame
sees it repeated in three channels and returns the luma of its output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch

from models.registry import Enhancer, ModelInfo, ModelLoadError, read_card

log = logging.getLogger(__name__)

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def _rgb_to_ycbcr(img: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = img @ _LUMA
    return y, (img[..., 2] - y) * 0.564, (img[..., 0] - y) * 0.713


def _ycbcr_to_rgb(y: np.ndarray, cb: np.ndarray, cr: np.ndarray) -> np.ndarray:
    r = y + 1.403 * cr
    b = y + 1.773 * cb
    g = (y - 0.299 * r - 0.114 * b) / 0.587
    return np.clip(np.stack([r, g, b], axis=-1), 0, 1).astype(np.float32)


class HQGNetEnhancer(Enhancer):
    uses_guidance = True

    def __init__(self, net, card: Mapping[str, Any], device: str, batch_size: int, weights_sha256: str | None):
        self.net = net
        self.card = dict(card)
        self.device = device
        self.batch_size = batch_size
        self.channels = int(net.cfg.channels)
        self.size = int(card.get("size") or 256)
        self.guidance_dim = int(net.cfg.guidance_dim)
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            self.net = self.net.to(memory_format=torch.channels_last)
            self._dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        self.info = ModelInfo(
            kind=str(card.get("kind", "hqgnet")),
            name=str(card.get("name", "HQG-Net")),
            version=f"{card.get('version', '?')} ({net.cfg.name})",
            weights_sha256=weights_sha256,
            card=self.card,
        )

    # -- helpers -----------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cuda", dtype=self._dtype) if self._cuda else nullcontext()

    def _to_model_channels(self, img: np.ndarray) -> np.ndarray:
        img = np.asarray(img, dtype=np.float32)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"frames must be (H, W) gray or (H, W, 3) RGB, got shape {img.shape}")
        if self.channels == 1 and img.ndim == 3:
            return img @ _LUMA
        if self.channels == 3 and img.ndim == 2:
            return np.repeat(img[..., None], 3, axis=2)
        return img

    def _batch(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        arr = np.stack([f[None] if f.ndim == 2 else np.transpose(f, (2, 0, 1)) for f in frames])
        t = torch.from_numpy(np.ascontiguousarray(np.clip(arr, 0, 1), dtype=np.float32)).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self._cuda else t

    # -- Enhancer API ------------------------------------------------------------------------------

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """v_z for each HQ image, fitted to the training size first: (N, 64) float32."""
        from models.train.data import fit_square

        if len(images) == 0:
            raise ValueError("extract_guidance needs at least one HQ image")
        frames = [fit_square(self._to_model_channels(img), self.size) for img in images]
        out = []
        with torch.inference_mode(), self._autocast():
            for i in range(0, len(frames), self.batch_size):
                out.append(self.net.extract_guidance(self._batch(frames[i : i + self.batch_size])).float().cpu())
        return torch.cat(out).numpy().astype(np.float32)

    def _guidance_tensor(self, guidance: np.ndarray | None) -> torch.Tensor:
        if guidance is None:
            raise ValueError(
                "HQG-Net needs a guidance vector: pass extract_guidance(HQ images) (the node caches one per modality); "
                "the model card's hq_guidance_mean is a default computed over its HQ training images"
            )
        g = np.asarray(guidance, dtype=np.float32)
        if g.ndim == 1:
            g = g[None]
        if g.ndim != 2 or g.shape[1] != self.guidance_dim:
            raise ValueError(f"guidance must have shape ({self.guidance_dim},) or (N, {self.guidance_dim}), got {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError("guidance contains NaN or infinite values")
        # Several vectors (e.g. from several HQ images) are averaged: the paper finds one image ~ many.
        return torch.from_numpy(g.mean(axis=0, keepdims=True)).to(self.device)

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        v_z = self._guidance_tensor(guidance)
        prepared: list[tuple[np.ndarray, tuple[np.ndarray, np.ndarray] | None, bool]] = []
        for img in images:
            img = np.asarray(img, dtype=np.float32)
            rgb_in = img.ndim == 3 and img.shape[2] == 3
            if self.channels == 1 and rgb_in:
                y, cb, cr = _rgb_to_ycbcr(np.clip(img, 0, 1))
                prepared.append((y.astype(np.float32), (cb, cr), True))
            else:
                prepared.append((self._to_model_channels(img), None, rgb_in))
        results: list[np.ndarray | None] = [None] * len(prepared)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (frame, _, _) in enumerate(prepared):
            groups.setdefault(frame.shape, []).append(i)
        with torch.inference_mode(), self._autocast():
            for shape, idx in groups.items():
                for start in range(0, len(idx), self.batch_size):
                    chunk = idx[start : start + self.batch_size]
                    out = self.net.enhance(self._batch([prepared[i][0] for i in chunk]), v_z)
                    out = out.float().clamp(0, 1).cpu().numpy()
                    for j, i in enumerate(chunk):
                        results[i] = out[j, 0] if self.channels == 1 else np.transpose(out[j], (1, 2, 0))
        final: list[np.ndarray] = []
        for (frame, chroma, rgb_in), out in zip(prepared, results):
            assert out is not None
            if chroma is not None:  # gray model, RGB frame: enhanced luma + original chroma
                out = _ycbcr_to_rgb(out, *chroma)
            elif self.channels == 3 and not rgb_in:  # RGB model, gray frame: luma of the output
                out = out @ _LUMA
            final.append(np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32))
        return final


def build(*, weights: Path | None, device: str, options: Mapping[str, Any]) -> HQGNetEnhancer:
    """Registry builder. Options: ``batch_size`` (frames per forward pass, default 4 on CPU, 16 on CUDA)."""
    from models.hqgnet import HQGNetConfig, build_hqgnet
    from models.train.common import load_state_dict

    if weights is None:
        raise ModelLoadError("hqgnet needs trained weights (model.weights): train them with `dicomnode train hqgnet`")
    card = read_card(weights)
    if card.get("kind") not in ("hqgnet", "hqgnet-lite"):
        raise ModelLoadError(f"{weights} holds a {card.get('kind')!r} model, not HQG-Net")
    try:
        cfg = HQGNetConfig.from_dict(dict(card["config"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise ModelLoadError(f"model card of {weights} has no usable HQG-Net config: {exc}") from exc
    net = build_hqgnet(cfg)
    try:
        state = load_state_dict(weights)
        net.load_state_dict(state, strict=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        raise ModelLoadError(f"weights {weights} do not load into the HQG-Net its card describes: {exc}") from exc
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but no CUDA device is available")
    net = net.to(dev).eval()
    unknown = sorted(set(options) - {"batch_size"})
    if unknown:
        raise ModelLoadError(f"unknown hqgnet options: {', '.join(unknown)} (known: batch_size)")
    batch_size = int(options.get("batch_size", 16 if dev.type == "cuda" else 4))
    if batch_size < 1:
        raise ModelLoadError(f"hqgnet option batch_size must be >= 1, got {batch_size}")
    log.info("loaded HQG-Net %s (%s config, %d channel(s), size %d) sha256 %s on %s",
             card.get("version"), cfg.name, cfg.channels, int(card.get("size") or 0), str(card.get("weights_sha256"))[:12], device)
    return HQGNetEnhancer(net, card, str(dev), batch_size, card.get("weights_sha256"))
