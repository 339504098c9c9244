"""VGG16 / VGG19 in torchvision's state-dict layout (``features.N.weight``), so that a user's
torchvision checkpoint loads as is, and truncated feature extractors for perceptual losses.

Only the convolutional ``features`` part is built by default: the classifier holds ~120 M
parameters that a perceptual loss never uses. ``load_torchvision_state_dict`` accepts full
torchvision checkpoints (it checks and drops the classifier keys).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

# torchvision's configurations "D" (VGG16) and "E" (VGG19): conv widths, "M" = 2x2 max pooling.
CONFIGS: dict[str, list[int | str]] = {
    "vgg16": [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    "vgg19": [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_CLASSIFIER_SHAPES = {
    "classifier.0.weight": (4096, 512 * 7 * 7),
    "classifier.0.bias": (4096,),
    "classifier.3.weight": (4096, 4096),
    "classifier.3.bias": (4096,),
    "classifier.6.weight": (1000, 4096),
    "classifier.6.bias": (1000,),
}


def make_features(arch: str = "vgg16", *, until_pool: int | None = None) -> nn.Sequential:
    """torchvision's ``features`` Sequential, cut after the ``until_pool``-th max pooling if given."""
    if arch not in CONFIGS:
        raise ValueError(f"unknown VGG architecture {arch!r}; known: {', '.join(CONFIGS)}")
    layers: list[nn.Module] = []
    in_ch, pools = 3, 0
    for item in CONFIGS[arch]:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            pools += 1
            if until_pool is not None and pools == until_pool:
                break
        else:
            layers += [nn.Conv2d(in_ch, int(item), kernel_size=3, padding=1), nn.ReLU(inplace=True)]
            in_ch = int(item)
    if until_pool is not None and pools < until_pool:
        raise ValueError(f"{arch} has only {pools} pooling layers, asked for {until_pool}")
    return nn.Sequential(*layers)


def feature_shapes(arch: str = "vgg16") -> dict[str, tuple[int, ...]]:
    """Expected ``features.*`` parameter shapes: the contract a converted state dict must meet."""
    return {f"features.{k}": tuple(v.shape) for k, v in make_features(arch).state_dict().items()}


class VGG(nn.Module):
    """VGG with torchvision's module names; ``classifier=True`` adds avgpool + the 1000-way head."""

    def __init__(self, arch: str = "vgg16", *, until_pool: int | None = None, classifier: bool = False):
        super().__init__()
        self.arch = arch
        self.features = make_features(arch, until_pool=until_pool)
        if classifier:
            if until_pool is not None:
                raise ValueError("a truncated VGG has no classifier")
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(512 * 7 * 7, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 4096), nn.ReLU(True), nn.Dropout(),
                nn.Linear(4096, 1000),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        if hasattr(self, "classifier"):
            x = self.classifier(torch.flatten(self.avgpool(x), 1))
        return x


def check_features_state_dict(state: Mapping[str, torch.Tensor], arch: str = "vgg16", *, source: str = "state dict") -> dict[str, torch.Tensor]:
    """Validate a torchvision-layout VGG state dict and return its ``features.*`` part.

    Every ``features`` key of ``arch`` must be present with its exact shape; classifier keys are
    checked and dropped; any other key is an error (it means a different architecture).
    """
    expected = feature_shapes(arch)
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ValueError(f"{source} is not a torchvision {arch}: missing {len(missing)} key(s), e.g. {missing[0]}")
    unexpected = sorted(k for k in state if k not in expected and k not in _CLASSIFIER_SHAPES)
    if unexpected:
        raise ValueError(f"{source} is not a torchvision {arch}: unexpected key(s) {unexpected[:3]}")
    for key, shape in {**expected, **{k: v for k, v in _CLASSIFIER_SHAPES.items() if k in state}}.items():
        if tuple(state[key].shape) != shape:
            raise ValueError(f"{source}: {key} has shape {tuple(state[key].shape)}, {arch} needs {shape}")
    return {k: state[k].detach().float() for k in expected}


def load_torchvision_state_dict(path: Path | str, arch: str = "vgg16") -> dict[str, torch.Tensor]:
    """Read a torchvision VGG checkpoint (``torch.save(model.state_dict())``) and return its checked
    ``features.*`` tensors (fp32). Accepts a bare state dict or one under a ``state_dict`` key."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGG weights not found: {path}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # pickle/zip errors have many types; name the file in one message
        raise ValueError(f"cannot read VGG weights {path}: {exc}") from exc
    if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
        state = state["state_dict"]
    if not isinstance(state, Mapping):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict")
    return check_features_state_dict(state, arch, source=str(path))


def load_features(module: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Load the matching ``features.*`` subset into a (possibly truncated) VGG, strictly."""
    own = module.state_dict()
    subset = {k: v for k, v in state.items() if k in own}
    module.load_state_dict(subset, strict=True)
