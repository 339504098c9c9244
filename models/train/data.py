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
from skimage.transform import resize
from torch.utils.data import DataLoader, Dataset

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}


def is_dicom(path: Path) -> bool:
    if path.suffix.lower() == ".dcm":
        return True
    try:
        with open(path, "rb") as fh:
            fh.seek(128)
            return fh.read(4) == b"DICM"
    except OSError:
        return False


def list_images(folder: Path | str) -> list[Path]:
    """Image and DICOM files under ``folder`` (recursive), sorted; ValueError if there are none."""
    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"not a folder: {root}")
    files = sorted(
        p for p in root.rglob("*") if p.is_file() and (p.suffix.lower() in IMAGE_SUFFIXES or is_dicom(p))
    )
    if not files:
        raise ValueError(f"no images (PNG/JPEG/TIFF/BMP/DICOM) found in {root}")
    return files


def _dicom_frames(path: Path) -> list[np.ndarray]:
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    ds = pydicom.dcmread(path)
    arr = ds.pixel_array
    frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
    arr = arr if frames > 1 else arr[None]
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    out = []
    for frame in arr:
        if frame.ndim == 3:  # colour: pydicom already converted YBR to RGB
            f = frame.astype(np.float32)
            f /= float(2 ** int(ds.get("BitsStored", 8)) - 1)
        else:
            f = apply_modality_lut(frame, ds).astype(np.float64)
            if "WindowCenter" in ds or "VOILUTSequence" in ds:
                f = apply_voi_lut(f, ds).astype(np.float64)
            lo, hi = float(f.min()), float(f.max())
            f = (f - lo) / (hi - lo) if hi > lo else np.zeros_like(f)
            if photometric == "MONOCHROME1":
                f = 1.0 - f
        out.append(np.clip(f, 0, 1).astype(np.float32))
    return out


def load_image(path: Path | str, channels: int) -> np.ndarray:
    """One image (the first frame of a DICOM) as float32 [0, 1], (H, W) if channels=1 else (H, W, 3)."""
    path = Path(path)
    if is_dicom(path):
        img = _dicom_frames(path)[0]
    else:
        from skimage.io import imread

        img = imread(path)
        if img.ndim == 3 and img.shape[2] == 4:
            img = img[..., :3]
        scale = 65535.0 if img.dtype == np.uint16 else 255.0 if img.dtype == np.uint8 else 1.0
        img = img.astype(np.float32) / scale
    if channels == 1 and img.ndim == 3:
        img = (img @ np.array([0.299, 0.587, 0.114], dtype=np.float32)).astype(np.float32)
    elif channels == 3 and img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=2)
    return np.clip(img, 0, 1).astype(np.float32)


def fit_square(img: np.ndarray, size: int, rng: random.Random | None = None) -> np.ndarray:
    """Resize the shorter side to ``size`` and crop a square (random when ``rng`` is given)."""
    h, w = img.shape[:2]
    scale = size / min(h, w)
    if abs(scale - 1.0) > 1e-6:
        new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
        img = resize(img, new_hw + img.shape[2:], order=1, anti_aliasing=scale < 1, preserve_range=True).astype(np.float32)
        h, w = img.shape[:2]
    top = rng.randint(0, h - size) if rng else (h - size) // 2
    left = rng.randint(0, w - size) if rng else (w - size) // 2
    return img[top : top + size, left : left + size]


def to_tensor(img: np.ndarray) -> torch.Tensor:
    """(H, W) or (H, W, C) float array -> (C, H, W) float tensor."""
    arr = img[None] if img.ndim == 2 else np.transpose(img, (2, 0, 1))
    return torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))


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
        self.images = [fit_square(load_image(p, channels), int(size * 1.125) if augment else size) for p in self.paths]
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
