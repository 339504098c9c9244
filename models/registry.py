"""Model registry: ``kind`` -> builder, and the one interface the node uses to enhance images.

The node sees every model as an :class:`Enhancer`. Images cross this boundary as float32 arrays
scaled to [0, 1], shaped (H, W) for gray or (H, W, 3) for RGB, one array per frame; the service
does all DICOM value handling (rescale, VOI window, photometric interpretation) on its side.

Builders are named by import path and imported lazily, so loading a CLAHE model never imports
torch. A trained model is a weights file plus a JSON model card beside it (``X.pt`` + ``X.json``);
the card holds the architecture config and the weights' sha256, checked on load so that a corrupt
or swapped file fails loudly at start-up.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# kind -> "module:function". Each function has the signature of `build_model` below (minus `kind`).
BUILDERS: Mapping[str, str] = {
    "clahe": "models.classical:build_clahe",
    "histeq": "models.classical:build_histeq",
    "retinex": "models.classical:build_retinex",
    "hqgnet": "models.hqgnet_enhancer:build",
    "hqgnet-lite": "models.hqgnet_enhancer:build",
    "stillgan": "models.gan_enhancer:build_stillgan",
    "lamegan": "models.gan_enhancer:build_lamegan",
}


class ModelLoadError(RuntimeError):
    """A model cannot be built: unknown kind, missing/corrupt weights, bad model card."""


@dataclass(frozen=True)
class ModelInfo:
    """What provenance needs to name a model: shown in DerivationDescription and equipment."""

    kind: str  # registry kind, e.g. "clahe", "hqgnet"
    name: str  # display name, e.g. "CLAHE", "HQG-Net"
    version: str  # model/code version
    weights_sha256: str | None = None  # None for models without weights
    card: Mapping[str, Any] = field(default_factory=dict)  # the model card (empty for classical)


class Enhancer(ABC):
    """One enhancement model, loaded once and shared by the node's workers.

    ``enhance`` takes a batch of frames (they may differ in size) and returns frames of the same
    shapes, float32 in [0, 1]. Models that use an HQ guidance vector (HQG-Net) set
    ``uses_guidance`` and implement ``extract_guidance``; the node caches one vector per modality
    and passes it to every ``enhance`` call.
    """

    info: ModelInfo
    uses_guidance: bool = False
    device: str = "cpu"

    @abstractmethod
    def enhance(self, images: Sequence[np.ndarray], guidance: np.ndarray | None = None) -> list[np.ndarray]:
        """Enhance frames; same shapes out as in, float32 in [0, 1]."""

    def extract_guidance(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """HQ guidance vectors, one row per image (shape (N, D)). Only for guided models."""
        raise NotImplementedError(f"{self.info.name} takes no guidance")


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights: Path) -> Path:
    """The model card that belongs to a weights file: same stem, ``.json``."""
    return weights.with_suffix(".json")


def read_card(weights: Path, *, verify: bool = True) -> dict[str, Any]:
    """Load and check the model card beside ``weights``; raise ModelLoadError with the reason."""
    weights = Path(weights)
    if not weights.is_file():
        raise ModelLoadError(f"weights file not found: {weights}")
    cpath = card_path(weights)
    if not cpath.is_file():
        raise ModelLoadError(f"model card not found beside the weights: {cpath}")
    try:
        card = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model card {cpath} is not valid JSON: {exc}") from exc
    if verify:
        expected = card.get("weights_sha256")
        if not expected:
            raise ModelLoadError(f"model card {cpath} has no weights_sha256")
        actual = sha256_file(weights)
        if actual != expected:
            raise ModelLoadError(
                f"weights file {weights} is corrupt or not the one its card describes: "
                f"sha256 {actual[:12]}… != card {expected[:12]}…"
            )
    return card


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    try:
        import torch
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(
    kind: str,
    *,
    weights: Path | None = None,
    device: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> Enhancer:
    """Build the enhancer for ``kind``; ``options`` are the kind-specific config keys."""
    try:
        target = BUILDERS[kind]
    except KeyError:
        raise ModelLoadError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(BUILDERS))}") from None
    module_name, func_name = target.split(":")
    builder = getattr(importlib.import_module(module_name), func_name)
    return builder(weights=Path(weights) if weights else None, device=resolve_device(device), options=dict(options or {}))


def load_checkpoint(weights: Path | str, *, device: str = "auto", options: Mapping[str, Any] | None = None) -> Enhancer:
    """Build whatever model a weights file's card describes (``card["kind"]``)."""
    card = read_card(Path(weights), verify=False)
    kind = card.get("kind")
    if not kind:
        raise ModelLoadError(f"model card for {weights} names no kind")
    return build_model(kind, weights=Path(weights), device=device, options=options)
