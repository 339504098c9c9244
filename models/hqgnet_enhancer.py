"""Registry builder for HQG-Net (``kind: hqgnet`` / ``hqgnet-lite``): trained weights -> Enhancer.

The card's ``config`` rebuilds the network. The model runs at the scale it learnt: a frame larger
than the card's ``working_max_side`` is enhanced on a copy shrunk to that longer side, and the
model's correction (smooth per-pixel gain and offset fields, the affine head) is carried back to the
full frame, whose own detail is kept. Guidance images are shown to G the way training did: crops of
the training size at the working scale, inside the field of view, their embeddings averaged.

Options (``models.NAME.options`` in the node config; all of them decide pixels and so go into
provenance and the derived UIDs):

* ``batch_size``: frames per forward pass (default 1 on CPU, where larger passes measured slower, 16 on
  CUDA); every pass is filled to this size, so a frame's pixels never depend on its neighbours;
* ``max_side``: the working resolution's longer side (default: the card's);
* ``color_mode``: ``full`` (the model's colours) or ``luminance`` (the model's lightness with the
  input's chroma, so hue and saturation cannot shift); default the card's ``color_mode`` or ``full``;
* ``fov``: keep the black surround of fundus/endoscopy frames untouched (default: as trained);
* ``field_smoothing``: low-pass the affine fields (Gaussian sigma as a fraction of the working side), so
  the model corrects illumination and colour without modulating fine structure (default: the card's, else 0);
* ``clip_guard``: where the affine correction would carry a region past white or black (its local mean
  ± 2 std), blend it toward the identity just enough to stay inside, so no region is burnt out
  (``models.hqgnet.limit_fields``; default true; the image head ignores it);
* ``keep_detail``: gains below 1 become 1 with the offset that gives the same local mean, so a region is
  darkened as the model wants without flattening its vessels or nerves (``models.hqgnet.keep_detail_fields``;
  default: the card's, else false);
* ``detail_boost``: after the correction, add this fraction of the output's own detail finer than a
  Gaussian of DETAIL_SIGMA x the frame's longer side (an unsharp mask at nerve/vessel scale, 4 % of the
  side: about 15 px at 384). The affine head restores level and illumination but not the local contrast a
  low-contrast degradation took away; 0.2 was chosen for CCM on the validation pairs
  (``docs/models.md``). Not the paper's; default: the card's, else 0.

Channel mismatch is resolved rather than refused: a gray model enhances the intensity of an RGB
frame and keeps its hue; an RGB model given a gray frame sees it in three channels and returns the
intensity of its output. fp32 on CPU; on CUDA autocast (bf16, else fp16) and channels_last.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from models.color import apply_to_intensity, intensity, keep_chroma, unit_range
from models.fov import fov_mask, keep_surround
from models.hqgnet import STRIDE, HQGNet, HQGNetConfig, apply_fields, build_hqgnet
from models.io import fit_square, load_state_dict, resize_long_side
from models.padding import fill_batch
from models.registry import Enhancer, ModelCard, ModelInfo, ModelLoadError, read_card

log = logging.getLogger(__name__)

OPTIONS = ("batch_size", "max_side", "color_mode", "fov", "field_smoothing", "clip_guard", "keep_detail", "detail_boost")
DETAIL_SIGMA = 0.04  # detail_boost's scale, a fraction of the frame's longer side
COLOR_MODES = ("full", "luminance")
LARGE_FRAME = 4_000_000  # pixels: such frames go through the model one at a time
GUIDANCE_CROPS = 4


class HQGNetEnhancer(Enhancer):
    uses_guidance = True

    def __init__(self, net: HQGNet, card: ModelCard, device: str, *, batch_size: int, max_side: int | None,
                 color_mode: str, fov: bool, field_smoothing: float = 0.0, clip_guard: bool = True,
                 keep_detail: bool = False, detail_boost: float = 0.0):
        self.net = net
        self.card = card
        self.device = device
        self.batch_size = batch_size
        self.max_side = max_side
        self.color_mode = color_mode
        self.fov = fov
        self.field_smoothing = field_smoothing
        self.clip_guard = clip_guard
        self.keep_detail = keep_detail and net.cfg.head == "affine"
        self.detail_boost = detail_boost
        self.channels = int(net.cfg.channels)
        self.size = int(card.size or 256)
        self.guidance_dim = int(net.cfg.guidance_dim)
        self._cuda = torch.device(device).type == "cuda"
        if self._cuda:
            self.net = self.net.to(memory_format=torch.channels_last)
            self._dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # what decides the pixels (the device too: CUDA runs in bf16/fp16), named in provenance and derived UIDs
        # and the pass size, which can move the last bit of a pixel (see models.padding.fill_batch)
        pixel_options = {"max_side": max_side, "color_mode": color_mode, "fov": fov, "field_smoothing": field_smoothing,
                         **({"clip_guard": True} if clip_guard and net.cfg.head == "affine" else {}),
                         **({"keep_detail": True} if keep_detail and net.cfg.head == "affine" else {}),
                         **({"detail_boost": detail_boost} if detail_boost else {}),
                         "device": torch.device(device).type, "batch_size": batch_size}
        self.info = ModelInfo(kind=card.kind, name=card.name or "HQG-Net", version=f"{card.version} ({net.cfg.name})",
                              weights_sha256=card.weights_sha256, card=card, options=pixel_options)

    # -- helpers -----------------------------------------------------------------------------------

    def _autocast(self):
        return torch.autocast("cuda", dtype=self._dtype) if self._cuda else nullcontext()

    def _tensor(self, frames: Sequence[np.ndarray]) -> torch.Tensor:
        # one copy into (N, C, H, W) float32 (frames are already clipped by _check): a 4096² RGB frame is 200 MB
        arr = np.stack([f[None] if f.ndim == 2 else np.transpose(f, (2, 0, 1)) for f in frames]).astype(np.float32, copy=False)
        t = torch.from_numpy(arr).to(self.device)
        return t.contiguous(memory_format=torch.channels_last) if self._cuda else t

    @staticmethod
    def _array(t: torch.Tensor) -> list[np.ndarray]:
        """Frames in their own layout, each contiguous: (H, W) or (H, W, 3)."""
        t = t.float().clamp_(0, 1).cpu()
        if t.shape[1] == 1:
            return [o[0].numpy() for o in t]
        return [o.numpy() for o in t.permute(0, 2, 3, 1).contiguous()]

    def _model_view(self, img: np.ndarray) -> np.ndarray:
        """A frame in the model's channels (for guidance; enhance handles the mismatch itself)."""
        if self.channels == 1 and img.ndim == 3:
            return intensity(img)
        if self.channels == 3 and img.ndim == 2:
            return np.repeat(img[..., None], 3, axis=2)
        return img

    @staticmethod
    def _check(img: np.ndarray) -> np.ndarray:
        img = np.asarray(img, dtype=np.float32)
        if img.ndim == 3 and img.shape[2] == 1:
            img = img[..., 0]
        if img.ndim not in (2, 3) or (img.ndim == 3 and img.shape[2] != 3):
            raise ValueError(f"frames must be (H, W) gray or (H, W, 3) RGB, got shape {img.shape}")
        return unit_range(img)  # the node's decoded frames are already in [0, 1]: not copied

    # -- guidance ----------------------------------------------------------------------------------

    def _guidance_crops(self, img: np.ndarray) -> list[np.ndarray]:
        """Crops of the training size at the working scale, preferring the field of view."""
        if self.max_side is None:  # cards without a working scale: the whole image, shorter side = size
            return [fit_square(img, self.size)]
        work = resize_long_side(img, self.max_side)
        s = self.size
        if min(work.shape[:2]) < s:
            return [fit_square(work, s)]
        mask = fov_mask(work) if self.fov else np.ones(work.shape[:2], dtype=bool)
        h, w = work.shape[:2]
        ys = np.linspace(0, h - s, 3).round().astype(int)
        xs = np.linspace(0, w - s, 3).round().astype(int)
        windows = sorted(((float(mask[y : y + s, x : x + s].mean()), y, x) for y in ys for x in xs), reverse=True)
        return [work[y : y + s, x : x + s] for _, y, x in windows[:GUIDANCE_CROPS]]

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """v_z for each HQ image (the mean over its crops): (N, guidance_dim) float32."""
        if len(images) == 0:
            raise ValueError("extract_guidance needs at least one HQ image")
        rows = []
        with torch.inference_mode(), self._autocast():
            for img in images:
                crops = self._guidance_crops(self._model_view(self._check(img)))
                rows.append(self.net.extract_guidance(self._tensor(crops)).float().mean(0).cpu())
        return torch.stack(rows).numpy().astype(np.float32)

    def _guidance_tensor(self, guidance: np.ndarray | None) -> torch.Tensor:
        if guidance is None:
            raise ValueError("HQG-Net needs a guidance vector: the node binds its modality's cached one "
                             "(dicomnode guidance build), or pass extract_guidance(HQ images)")
        g = np.asarray(guidance, dtype=np.float32)
        if g.ndim == 1:
            g = g[None]
        if g.ndim != 2 or g.shape[1] != self.guidance_dim:
            raise ValueError(f"guidance must have shape ({self.guidance_dim},) or (N, {self.guidance_dim}), got {g.shape}")
        if not np.all(np.isfinite(g)):
            raise ValueError("guidance contains NaN or infinite values")
        # Several vectors (e.g. from several HQ images) are averaged: the paper finds one image ~ many.
        return torch.from_numpy(g.mean(axis=0, keepdims=True)).to(self.device)

    # -- enhancement -------------------------------------------------------------------------------

    def _run(self, x: torch.Tensor, v_z: torch.Tensor) -> torch.Tensor:
        if self.net.cfg.head == "affine":
            return apply_fields(x, self.net.correction(x, v_z, max_side=self.max_side, smooth=self.field_smoothing,
                                                       guard=self.clip_guard, keep_detail=self.keep_detail))
        if self.max_side is not None and max(x.shape[-2:]) > self.max_side:
            # image head: enhance the working-resolution copy, carry its output/input ratio back
            scale = self.max_side / max(x.shape[-2:])
            size = (max(1, round(x.shape[-2] * scale)), max(1, round(x.shape[-1] * scale)))
            small = F.interpolate(x.float(), size=size, mode="area")
            ratio = (self.net.enhance(small, v_z).float() + 1e-3) / (small + 1e-3)
            return (x.float() * F.interpolate(ratio, size=x.shape[-2:], mode="bilinear", align_corners=False)).clamp(0, 1)
        return self.net.enhance(x, v_z)

    def _finish(self, original: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Detail boost, colour mode and field of view, in the frame's own layout."""
        if self.detail_boost:
            sigma = DETAIL_SIGMA * max(out.shape[:2])
            out = out + self.detail_boost * (out - cv2.GaussianBlur(out, (0, 0), sigma, borderType=cv2.BORDER_REFLECT))
        if original.ndim == 3 and out.ndim == 3 and self.color_mode == "luminance":
            out = keep_chroma(original, out)
        if self.fov:
            return keep_surround(original, out, in_place=True)  # out is this call's own array
        return np.ascontiguousarray(np.clip(out, 0, 1), dtype=np.float32)

    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        v_z = self._guidance_tensor(guidance)
        frames = [self._check(img) for img in images]
        views: list[np.ndarray] = []
        for img in frames:
            if self.channels == 3 and img.ndim == 2:
                views.append(np.repeat(img[..., None], 3, axis=2))
            elif self.channels == 1 and img.ndim == 3:
                views.append(intensity(img))
            else:
                views.append(img)
        results: list[np.ndarray | None] = [None] * len(frames)
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, v in enumerate(views):
            groups.setdefault(v.shape, []).append(i)
        with torch.inference_mode(), self._autocast():
            for shape, idx in groups.items():
                step = 1 if shape[0] * shape[1] > LARGE_FRAME else self.batch_size
                for start in range(0, len(idx), step):
                    chunk = idx[start : start + step]
                    batch = fill_batch(self._tensor([views[i] for i in chunk]), step)
                    outs = self._array(self._run(batch, v_z))[: len(chunk)]
                    del batch  # the input copy goes before the next chunk (or _finish) allocates
                    for i, out in zip(chunk, outs, strict=True):
                        results[i] = out
        final = []
        for img, out in zip(frames, results, strict=True):
            assert out is not None
            if self.channels == 1 and img.ndim == 3:  # gray model, RGB frame: new intensity, hue kept
                enhanced = out
                out = apply_to_intensity(img, lambda _v, e=enhanced: e)
            elif self.channels == 3 and img.ndim == 2:  # RGB model, gray frame
                out = intensity(out)
            final.append(self._finish(img, out))
        return final


def _flag(options: Mapping[str, Any], card: ModelCard, name: str, default: bool) -> bool:
    """A true/false option: the config's, else the card's, else ``default``."""
    value = options.get(name, card.extra.get(name, default))
    if not isinstance(value, bool):
        raise ModelLoadError(f"hqgnet option {name} must be true or false, got {value!r}")
    return value


def _fraction(options: Mapping[str, Any], card: ModelCard, name: str, top: float, unit: str) -> float:
    """A number in [0, top]: the config's, else the card's, else 0."""
    try:
        value = float(options.get(name, card.extra.get(name, 0.0)))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"hqgnet option {name} must be a number: {exc}") from exc
    if not 0.0 <= value <= top:
        raise ModelLoadError(f"hqgnet option {name} must be in [0, {top:g}] ({unit}), got {value}")
    return value


def _option(options: Mapping[str, Any], card: ModelCard, device: torch.device) -> dict[str, Any]:
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise ModelLoadError(f"unknown hqgnet options: {', '.join(unknown)} (known: {', '.join(OPTIONS)})")
    try:
        batch_size = int(options.get("batch_size", 16 if device.type == "cuda" else 1))
        max_side = options.get("max_side", card.working_max_side)
        max_side = None if max_side is None else int(max_side)
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"hqgnet options must be numbers: {exc}") from exc
    if batch_size < 1:
        raise ModelLoadError(f"hqgnet option batch_size must be >= 1, got {batch_size}")
    if max_side is not None and max_side < STRIDE:
        raise ModelLoadError(f"hqgnet option max_side must be >= {STRIDE}, got {max_side}")
    color_mode = str(options.get("color_mode", card.extra.get("color_mode", "full")))
    if color_mode not in COLOR_MODES:
        raise ModelLoadError(f"hqgnet option color_mode must be one of {', '.join(COLOR_MODES)}, got {color_mode!r}")
    fov = _flag(options, card, "fov", False)
    smoothing = _fraction(options, card, "field_smoothing", 0.5, "a fraction of the working side")
    clip_guard = _flag(options, card, "clip_guard", True)
    keep_detail = _flag(options, card, "keep_detail", False)
    detail_boost = _fraction(options, card, "detail_boost", 1.0, "a fraction of the output's own detail")
    return {"batch_size": batch_size, "max_side": max_side, "color_mode": color_mode, "fov": fov, "field_smoothing": smoothing,
            "clip_guard": clip_guard, "keep_detail": keep_detail, "detail_boost": detail_boost}


def build(*, weights: Path | None, device: str, options: Mapping[str, Any]) -> HQGNetEnhancer:
    """Registry builder (see the module docstring for the options)."""
    if weights is None:
        raise ModelLoadError("hqgnet needs trained weights (model.weights): train them with `dicomnode train hqgnet`")
    card = read_card(weights)
    if card.kind not in ("hqgnet", "hqgnet-lite"):
        raise ModelLoadError(f"{weights} holds a {card.kind!r} model, not HQG-Net")
    try:
        cfg = HQGNetConfig.from_dict(dict(card.config))
    except (TypeError, ValueError) as exc:
        raise ModelLoadError(f"model card of {weights} has no usable HQG-Net config: {exc}") from exc
    net = build_hqgnet(cfg)
    try:
        net.load_state_dict(load_state_dict(weights), strict=True)
    except Exception as exc:  # torch raises RuntimeError/UnpicklingError/EOFError for bad files
        raise ModelLoadError(f"weights {weights} do not load into the HQG-Net its card describes: {exc}") from exc
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {device} requested but no CUDA device is available")
    opts = _option(options, card, dev)
    net = net.to(dev).eval()
    log.info("loaded HQG-Net %s (%s config, %s head, %d channel(s), working side %s) sha256 %s on %s",
             card.version, cfg.name, cfg.head, cfg.channels, opts["max_side"] or "native", str(card.weights_sha256)[:12], device)
    return HQGNetEnhancer(net, card, str(dev), **opts)


__all__ = ["HQGNetEnhancer", "build"]
