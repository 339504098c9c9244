"""Reading images and weights for inference and training alike (never imports training code).

Images are float32 in [0, 1] with 1 or 3 channels. Folders may hold PNG, JPEG, TIFF, BMP or DICOM
files. DICOM frames get the modality LUT, the VOI window where the file has one (else min-max) and
MONOCHROME1 inversion: what a viewer shows, and so what an enhancer learns on and is judged on.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from skimage.transform import resize

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


def dicom_frames(path: Path) -> list[np.ndarray]:
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
        img = dicom_frames(path)[0]
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




def resize_long_side(img: np.ndarray, max_side: int) -> np.ndarray:
    """Shrink so the longer side is at most ``max_side`` (never enlarges), anti-aliased."""
    h, w = img.shape[:2]
    if max(h, w) <= max_side:
        return img
    scale = max_side / max(h, w)
    shape = (max(1, round(h * scale)), max(1, round(w * scale)))
    return resize(img, shape + img.shape[2:], order=1, anti_aliasing=True, preserve_range=True).astype(np.float32)


def load_state_dict(path: Path | str, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Exported weights as fp32 tensors (shipped files may be fp16)."""
    sd = torch.load(path, map_location=map_location, weights_only=True)
    return {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}


def source_of(path: Path) -> str:
    """The source group of a training file: its name up to the first '_' (drimdb, drive, hrf, cvcclinic...)."""
    stem = path.stem
    if stem.startswith(("shOD", "shOS", "zxOD", "zxOS")):
        return stem[:4]
    return stem.split("_", 1)[0]


def balanced_weights(sources: Sequence[str]) -> list[float]:
    """Per-item weights giving each source a total of sqrt(its count): balanced, not flattened (50 of the 79
    fundus HQ images come from one camera)."""
    counts = Counter(sources)
    return [math.sqrt(counts[s]) / counts[s] for s in sources]


def source_weights(paths: Sequence[Path]) -> dict[Path, float]:
    """:func:`balanced_weights` of training files by :func:`source_of`."""
    return dict(zip(paths, balanced_weights([source_of(p) for p in paths]), strict=True))
