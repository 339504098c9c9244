"""The model registry: one :class:`ModelSpec` per kind, and the one interface the node enhances with.

Every model kind is described once, here: how to build it (lazily, by import path, so loading CLAHE
never imports torch), its parts for ``dicomnode models info``, its trainers for ``dicomnode train``,
what it does to pixels (the derivation codes provenance names), and how to read model cards written
by older versions (a card filter, instead of guessing from keys).

The node sees every model as an :class:`Enhancer`. Images cross this boundary as float32 arrays in
[0, 1], (H, W) gray or (H, W, 3) RGB, one array per frame; the service does all DICOM value handling.

A trained model is a weights file plus a JSON model card beside it (``X.pt`` + ``X.json``); the card
(:class:`ModelCard`) holds the architecture and the weights' sha256, checked on load so that a
corrupt or swapped file fails loudly at start-up.
"""

from __future__ import annotations

import hashlib
import importlib
import json
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

__all__ = [
    "Enhancer",
    "EnhancerUnavailable",
    "MODELS",
    "ModelCard",
    "ModelInfo",
    "ModelLoadError",
    "ModelSpec",
    "build_model",
    "card_path",
    "load_checkpoint",
    "read_card",
    "resolve_device",
    "sha256_file",
    "spec",
]


class ModelLoadError(RuntimeError):
    """A model cannot be built: unknown kind, missing/corrupt weights, bad model card."""


class EnhancerUnavailable(RuntimeError):
    """The enhancer cannot run now (e.g. its remote executor has no live worker): no fault of the input.

    Callers do not fail the images for it: the series is retried later as a whole.
    """


# CID 7203 (image derivation) code names; no AI-specific code exists in that group.
SMOOTHING = "Smoothing"
EDGE_ENHANCEMENT = "EdgeEnhancement"


@dataclass(frozen=True)
class ModelSpec:
    """Everything the project knows about one model kind, in one place.

    ``builder`` and ``parts`` are ``"module:function"`` paths imported on use. ``parts(channels)``
    returns ``[(name, module, run(module, size), counted_at_inference)]`` for ``models info``.
    ``trainers`` maps a ``dicomnode train`` sub-command to its training module. ``derivation`` names
    the CID 7203 codes of what the model does to pixels. ``card_filter`` upgrades cards written by
    older versions to the current layout before they are read.
    """

    kind: str
    display_name: str
    builder: str
    derivation: tuple[str, ...]
    parts: str | None = None
    default_channels: int = 3
    trainers: Mapping[str, str] = field(default_factory=dict)
    published: tuple[float, float, str] | None = None  # (M params, G MACs, source) at 384^2
    card_filter: Callable[[dict[str, Any]], dict[str, Any]] | None = None
    aliases: tuple[str, ...] = ()


def _hqgnet_card_filter(card: dict[str, Any]) -> dict[str, Any]:
    """Cards from before a config field existed rebuild the network they were trained with."""
    config = dict(card.get("config") or {})
    config.setdefault("norm", "none")  # decoder normalisation came after the first cards
    config.setdefault("head", "image")  # the affine-field head came after the first shipped weights
    return {**card, "config": config}


MODELS: dict[str, ModelSpec] = {}


def register(model: ModelSpec) -> ModelSpec:
    for name in (model.kind, *model.aliases):
        if name in MODELS:
            raise ValueError(f"model kind {name!r} registered twice")
        MODELS[name] = model
    return model


register(ModelSpec("clahe", "CLAHE", "models.classical:build_clahe", (EDGE_ENHANCEMENT,)))
register(ModelSpec("histeq", "histogram equalisation", "models.classical:build_histeq", (EDGE_ENHANCEMENT,)))
register(ModelSpec("fieldnorm", "field normalisation", "models.fieldnorm:build", (EDGE_ENHANCEMENT,)))
register(ModelSpec("dehaze", "veil removal", "models.dehaze:build", (EDGE_ENHANCEMENT,)))
register(ModelSpec("retinex", "multi-scale Retinex", "models.classical:build_retinex", (EDGE_ENHANCEMENT,)))
register(ModelSpec(
    "hqgnet", "HQG-Net", "models.hqgnet_enhancer:build", (SMOOTHING, EDGE_ENHANCEMENT),
    parts="models.hqgnet:paper_parts", default_channels=3,
    trainers={"pretrain-g": "models.train.pretrain_g", "hqgnet": "models.train.hqgnet"},
    published=(66.42, 87.33, "HQG-Net paper, Table IV, 384x384"), card_filter=_hqgnet_card_filter,
))
register(ModelSpec(
    "hqgnet-lite", "HQG-Net (lite)", "models.hqgnet_enhancer:build", (SMOOTHING, EDGE_ENHANCEMENT),
    parts="models.hqgnet:lite_parts", default_channels=1, card_filter=_hqgnet_card_filter,
))
register(ModelSpec(
    "stillgan", "StillGAN", "models.gan_enhancer:build_stillgan", (SMOOTHING, EDGE_ENHANCEMENT),
    parts="models.stillgan:model_parts", trainers={"stillgan": "models.train.stillgan"},
    published=(58.38, 94.73, "HQG-Net paper, Table IV, 384x384"),
))
register(ModelSpec(
    "lamegan", "LaMEGAN", "models.gan_enhancer:build_lamegan", (SMOOTHING, EDGE_ENHANCEMENT),
    parts="models.lamegan:model_parts", trainers={"lamegan": "models.train.lamegan"},
))


def spec(kind: str) -> ModelSpec:
    try:
        return MODELS[kind]
    except KeyError:
        raise ModelLoadError(f"unknown model kind {kind!r}; known kinds: {', '.join(sorted(MODELS))}") from None


def load_symbol(path: str) -> Any:
    """``"module:function"`` -> the object."""
    module_name, name = path.split(":")
    return getattr(importlib.import_module(module_name), name)


# --------------------------------------------------------------------------------------------
# model cards


class ModelCard(BaseModel):
    """The machine-readable card beside a weights file. Known fields are typed; training records
    (data, losses, evaluation tables) ride along as extra fields and are kept as written."""

    model_config = ConfigDict(extra="allow", frozen=True)

    kind: str
    name: str = ""
    version: str = "?"
    config: dict[str, Any] = {}
    channels: int | None = None
    size: int | None = None  # training crop size
    working_max_side: int | None = None  # the longer side the model runs at (None: native)
    weights_sha256: str | None = None
    weights_bytes: int | None = None
    weights_dtype: str | None = None
    created: str | None = None

    @property
    def extra(self) -> dict[str, Any]:
        return dict(self.model_extra or {})

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude_none=False)


@dataclass(frozen=True)
class ModelInfo:
    """What provenance needs to name a model: shown in DerivationDescription and equipment."""

    kind: str  # registry kind, e.g. "clahe", "hqgnet"
    name: str  # display name, e.g. "CLAHE", "HQG-Net"
    version: str  # model/code version
    weights_sha256: str | None = None  # None for models without weights
    card: ModelCard | None = None  # None for classical models
    options: Mapping[str, Any] = field(default_factory=dict)  # settings that change pixels (UIDs depend on them)

    @property
    def derivation(self) -> tuple[str, ...]:
        """CID 7203 code names of what this model does to pixels."""
        return spec(self.kind).derivation if self.kind in MODELS else (SMOOTHING, EDGE_ENHANCEMENT)


class Enhancer(ABC):
    """One enhancement model, loaded once and shared by the node's workers.

    ``enhance`` takes a batch of frames (they may differ in size) and returns frames of the same
    shapes, float32 in [0, 1]. Models that use an HQ guidance vector (HQG-Net) set
    ``uses_guidance`` and implement ``extract_guidance``; the node caches one vector per modality
    and binds it to the model.
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
    return Path(weights).with_suffix(".json")


def read_card(weights: Path, *, verify: bool = True) -> ModelCard:
    """Load and check the model card beside ``weights``; ModelLoadError with the reason."""
    weights = Path(weights)
    if not weights.is_file():
        raise ModelLoadError(f"weights file not found: {weights}")
    cpath = card_path(weights)
    if not cpath.is_file():
        raise ModelLoadError(f"model card not found beside the weights: {cpath}")
    try:
        raw = json.loads(cpath.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"model card {cpath} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict) or not raw.get("kind"):
        raise ModelLoadError(f"model card {cpath} names no kind")
    kind = str(raw["kind"])
    if kind in MODELS and MODELS[kind].card_filter is not None:
        raw = MODELS[kind].card_filter(raw)  # type: ignore[misc]
    try:
        card = ModelCard.model_validate(raw)
    except ValidationError as exc:
        raise ModelLoadError(f"model card {cpath} is not a valid card: {exc.errors()[0]['msg']}") from exc
    if verify:
        if not card.weights_sha256:
            raise ModelLoadError(f"model card {cpath} has no weights_sha256")
        actual = sha256_file(weights)
        if actual != card.weights_sha256:
            raise ModelLoadError(
                f"weights file {weights} is corrupt or not the one its card describes: "
                f"sha256 {actual[:12]}… != card {card.weights_sha256[:12]}…"
            )
    return card


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda`` when a CUDA device is present, else ``cpu``; other values pass through."""
    if device != "auto":
        return device
    try:
        import torch  # noqa: PLC0415 - only when a device must be chosen; classical models never need it
    except ImportError:
        return "cpu"
    return "cuda" if torch.cuda.is_available() else "cpu"


def build_model(kind: str, *, weights: Path | None = None, device: str = "auto", options: Mapping[str, Any] | None = None) -> Enhancer:
    """Build the enhancer for ``kind``; ``options`` are the kind-specific config keys."""
    builder = load_symbol(spec(kind).builder)
    return builder(weights=Path(weights) if weights else None, device=resolve_device(device), options=dict(options or {}))


def load_checkpoint(weights: Path | str, *, device: str = "auto", options: Mapping[str, Any] | None = None) -> Enhancer:
    """Build whatever model a weights file's card describes (``card.kind``)."""
    card = read_card(Path(weights), verify=False)
    return build_model(card.kind, weights=Path(weights), device=device, options=options)
