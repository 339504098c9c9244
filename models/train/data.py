"""Training data: folders of images (PNG, JPEG, TIFF, BMP) or of DICOM files, unpaired LQ/HQ.

Every image is read as float32 in [0, 1] with 1 or 3 channels, resized so its shorter side is
``size`` and centre/random-cropped to ``size`` x ``size``. DICOM frames get the modality LUT, the
VOI window where the file has one (else min-max) and MONOCHROME1 inversion, which is what a viewer
shows and therefore what an enhancer should learn on.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from models.io import (  # noqa: F401  (re-exported for the trainers)
    IMAGE_SUFFIXES,
    dicom_frames,
    fit_square,
    is_dicom,
    list_images,
    load_image,
    resize_long_side,
    to_tensor,
)


class ImageFolder(Dataset):
    """Images of one domain, decoded once and kept in memory (training sets here are small)."""

    def __init__(
        self,
        folder: Path | str | Sequence[Path],
        size: int,
        channels: int,
        *,
        augment: bool = True,
        masks: Path | str | None = None,
        seed: int = 0,
    ):
        self.paths = list_images(folder) if isinstance(folder, (str, Path)) else [Path(p) for p in folder]
        self.size, self.channels, self.augment = size, channels, augment
        self.rng = random.Random(seed)
        # Decode at a working size a little above `size` so random crops still vary.
        self.images: list[np.ndarray] = []
        self.shapes: list[tuple[int, int]] = []  # (h, w) as decoded, before fitting
        for p in self.paths:
            img = load_image(p, channels)
            self.shapes.append(img.shape[:2])
            self.images.append(fit_square(img, int(size * 1.125) if augment else size))
        self.masks: list[np.ndarray] | None = None
        if masks is not None:
            by_stem = {p.stem: p for p in list_images(masks)}
            missing = [p.name for p in self.paths if p.stem not in by_stem]
            if missing:
                raise ValueError(f"no mask in {masks} for {len(missing)} image(s), e.g. {missing[0]}")
            self.masks = [
                fit_square(load_image(by_stem[p.stem], 1), int(size * 1.125) if augment else size) for p in self.paths
            ]

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        img = self.images[index]
        mask = self.masks[index] if self.masks is not None else None
        if self.augment:
            h, w = img.shape[:2]
            top, left = self.rng.randint(0, h - self.size), self.rng.randint(0, w - self.size)
            img = img[top : top + self.size, left : left + self.size]
            mask = mask[top : top + self.size, left : left + self.size] if mask is not None else None
            if self.rng.random() < 0.5:
                img, mask = img[:, ::-1], (mask[:, ::-1] if mask is not None else None)
            if self.rng.random() < 0.5:
                img, mask = img[::-1], (mask[::-1] if mask is not None else None)
        if mask is None:
            return to_tensor(img)
        return to_tensor(img), (to_tensor(mask) > 0.5).float()


def infinite(dataset: Dataset, batch_size: int, seed: int = 0) -> Iterator:
    """Endless shuffled batches (unpaired training draws LQ and HQ independently)."""
    generator = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=len(dataset) >= batch_size, generator=generator)
    while True:
        yield from loader


# --- Field-aware, domain-paired sampling (the shipped models' training) ------------------------------


class FieldImages:
    """One (domain, quality) set kept at a working scale with each image's field-of-view mask.

    Images are shrunk so their longer side is at most ``max_side`` (the scale the model will run at
    in the node) and kept as uint8; crops of ``size`` are drawn with a per-image weight (to balance
    sources) and preferably inside the field of view, then flipped at random.
    """

    def __init__(self, items: Sequence[tuple[Path, float]], channels: int, max_side: int, size: int, *, fov: bool = True):
        from models.fov import fov_mask

        if not items:
            raise ValueError("FieldImages needs at least one image")
        self.paths = [Path(p) for p, _ in items]
        w = np.array([float(x) for _, x in items], dtype=np.float64)
        if (w <= 0).any():
            raise ValueError("image weights must be > 0")
        self.weights = w / w.sum()
        self.channels, self.size = channels, size
        self.images: list[np.ndarray] = []
        self.masks: list[np.ndarray] = []
        for p in self.paths:
            img = resize_long_side(load_image(p, channels), max_side)
            if min(img.shape[:2]) < size:  # pad small frames by reflection up to the crop size
                ph, pw = max(0, size - img.shape[0]), max(0, size - img.shape[1])
                pad = ((ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2)) + ((0, 0),) * (img.ndim - 2)
                img = np.pad(img, pad, mode="reflect")
            mask = fov_mask(img) if fov else np.ones(img.shape[:2], dtype=bool)
            self.images.append((np.clip(img, 0, 1) * 255).round().astype(np.uint8))
            self.masks.append(mask)

    def __len__(self) -> int:
        return len(self.images)

    def crop(self, index: int, rng: np.random.Generator, *, augment: bool = True, tries: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
        img, mask = self.images[index], self.masks[index]
        h, w = img.shape[:2]
        s = self.size
        best = None
        for _ in range(tries if augment else 1):
            top = int(rng.integers(0, h - s + 1)) if augment else (h - s) // 2
            left = int(rng.integers(0, w - s + 1)) if augment else (w - s) // 2
            frac = float(mask[top : top + s, left : left + s].mean())
            if best is None or frac > best[0]:
                best = (frac, top, left)
            if frac >= 0.6:
                break
        _, top, left = best
        c = img[top : top + s, left : left + s].astype(np.float32) / 255.0
        m = mask[top : top + s, left : left + s].astype(np.float32)
        if augment and rng.random() < 0.5:
            c, m = c[:, ::-1], m[:, ::-1]
        if augment and rng.random() < 0.5:
            c, m = c[::-1], m[::-1]
        return to_tensor(c), to_tensor(m)

    def sample(self, rng: np.random.Generator, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        idx = rng.choice(len(self.images), size=n, p=self.weights)
        crops = [self.crop(int(i), rng) for i in idx]
        return torch.stack([c for c, _ in crops]), torch.stack([m for _, m in crops])


def read_manifest(path: Path | str) -> dict:
    """A training manifest (JSON): channels, max_side, fov, and per domain its weight and LQ/HQ items.

    ``{"channels": 3, "max_side": 512, "fov": true, "domains": {"fundus": {"weight": 1, "lq": [[path, w], ...],
    "hq": [[path, w], ...]}}}``; relative paths are relative to the manifest's folder.
    """
    import json

    path = Path(path)
    m = json.loads(path.read_text())
    for key in ("channels", "max_side", "domains"):
        if key not in m:
            raise ValueError(f"manifest {path} has no {key!r}")
    for name, d in m["domains"].items():
        for role in ("lq", "hq"):
            items = d.get(role) or []
            if not items:
                raise ValueError(f"manifest {path}: domain {name!r} has no {role} images")
            d[role] = [((path.parent / p) if not Path(p).is_absolute() else Path(p), float(w)) for p, w in items]
    return m


def manifest_arg(path: Path | str) -> dict:
    """``--manifest PATH`` for a trainer: the manifest, or an exit that names the flag and the problem."""
    try:
        return read_manifest(path)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"--manifest: {exc}") from None


def folder_args(lq: Path | None, hq: Path | None) -> tuple[list[Path], list[Path]]:
    """``--lq`` / ``--hq`` folders for a trainer: their images (LQ, HQ), or an exit that says what is missing."""
    if lq is None or hq is None:
        raise SystemExit("give --lq and --hq folders, or --manifest")
    try:
        return list_images(lq), list_images(hq)
    except ValueError as exc:
        raise SystemExit(str(exc)) from None


class DomainBatches:
    """Endless batches that pair each LQ batch with HQ images of the same domain (modality).

    A batch is one domain, drawn with the domain weights; the guidance z comes from that domain's
    HQ set, as the node's per-modality guidance cache does at inference.
    """

    def __init__(self, manifest: dict, size: int, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.names = list(manifest["domains"])
        w = np.array([float(manifest["domains"][n].get("weight", 1.0)) for n in self.names])
        self.p = w / w.sum()
        ch, side, fov = int(manifest["channels"]), int(manifest["max_side"]), bool(manifest.get("fov", True))
        self.sets = {n: (FieldImages(d["lq"], ch, side, size, fov=fov), FieldImages(d["hq"], ch, side, size, fov=fov))
                     for n, d in manifest["domains"].items()}

    def counts(self) -> dict[str, dict[str, int]]:
        return {n: {"lq": len(lq), "hq": len(hq)} for n, (lq, hq) in self.sets.items()}

    def next(self, batch: int) -> tuple[str, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(domain, y, y_mask, z, z_mask), each image tensor (B, C, S, S) and mask (B, 1, S, S)."""
        name = self.names[int(self.rng.choice(len(self.names), p=self.p))]
        lq, hq = self.sets[name]
        y, my = lq.sample(self.rng, batch)
        z, mz = hq.sample(self.rng, batch)
        return name, y, my, z, mz

    def labeled_images(self, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """A batch of crops from every set and each crop's set index (domain-major: d0/hq, d0/lq, d1/hq, ...)."""
        sets = [s for pair in self.sets.values() for s in pair]
        picks = self.rng.integers(len(sets), size=batch)
        images = torch.stack([sets[int(k)].sample(self.rng, 1)[0][0] for k in picks])
        return images, torch.as_tensor(picks, dtype=torch.long)

    def any_images(self, batch: int) -> torch.Tensor:
        """A batch of crops from every set (LQ and HQ of all domains), for G's auto-encoder."""
        sets = [s for pair in self.sets.values() for s in pair]
        out = []
        for _ in range(batch):
            s = sets[int(self.rng.integers(len(sets)))]
            out.append(s.sample(self.rng, 1)[0][0])
        return torch.stack(out)
