"""ResNet-18/50 feature extractors in torchvision's state-dict layout.

The module names (``conv1``, ``bn1``, ``layer1``..``layer4``, ``fc``; blocks ``conv1..3``, ``bn1..3``,
``downsample.0/1``) follow torchvision exactly, so a user's ImageNet checkpoint for torchvision's
``resnet18``/``resnet50`` loads with :func:`load_torchvision_state_dict` (conv1 adapted for gray
input). ``forward`` returns the four stage features f1..f4 (strides 4, 8, 16, 32) that U-Net style
decoders need, not logits. ``fc`` keeps torchvision's name but any width (HQG-Net uses it as its
64-d / 16-d projection); torchvision's 1000-class ``fc`` is ignored on loading.

``base_width`` scales every stage (64 in torchvision); narrower nets keep the same key names,
which lets the lite HQG-Net ship in a few MB, but only ``base_width=64`` matches ImageNet weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

__all__ = ["ARCHS", "BasicBlock", "Bottleneck", "ResNet", "resnet18", "resnet50", "load_torchvision_state_dict", "adapt_state_dict"]


def conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv3x3(cin, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision's v1.5 bottleneck: the stride sits on the 3x3 conv."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int = 1, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = conv1x1(cin, planes)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: Tensor) -> Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet(nn.Module):
    """ResNet trunk returning (f1, f2, f3, f4); ``head`` applies ``fc`` to pooled f4."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, int, int, int], *, in_channels: int = 3, base_width: int = 64, num_classes: int | None = 1000):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels}")
        self.in_channels = in_channels
        self._cin = base_width
        self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        widths = [base_width * m for m in (1, 2, 4, 8)]
        self.layer1 = self._make_layer(block, widths[0], layers[0])
        self.layer2 = self._make_layer(block, widths[1], layers[1], stride=2)
        self.layer3 = self._make_layer(block, widths[2], layers[2], stride=2)
        self.layer4 = self._make_layer(block, widths[3], layers[3], stride=2)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        # torchvision's classifier; HQG-Net reuses it as its small projection (64-d v_z, 16-d v_y), None drops it.
        self.fc = nn.Linear(widths[3] * block.expansion, num_classes) if num_classes else None
        #: channels of f1..f4
        self.channels: tuple[int, int, int, int] = tuple(w * block.expansion for w in widths)  # type: ignore[assignment]
        self.stem_channels = base_width
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        # Zero-init the last BN of each block: blocks start as identities, which trains faster from scratch.
        for m in self.modules():
            if isinstance(m, Bottleneck):
                nn.init.zeros_(m.bn3.weight)
            elif isinstance(m, BasicBlock):
                nn.init.zeros_(m.bn2.weight)

    def _make_layer(self, block, planes: int, blocks: int, stride: int = 1) -> nn.Sequential:
        downsample = None
        if stride != 1 or self._cin != planes * block.expansion:
            downsample = nn.Sequential(conv1x1(self._cin, planes * block.expansion, stride), nn.BatchNorm2d(planes * block.expansion))
        layers = [block(self._cin, planes, stride, downsample)]
        self._cin = planes * block.expansion
        layers += [block(self._cin, planes) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def stem(self, x: Tensor) -> Tensor:
        """conv1 + bn + relu at stride 2 (before the max-pool)."""
        return self.relu(self.bn1(self.conv1(x)))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        x = self.maxpool(self.stem(x))
        f1 = self.layer1(x)
        f2 = self.layer2(f1)
        f3 = self.layer3(f2)
        f4 = self.layer4(f3)
        return f1, f2, f3, f4

    def head(self, f4: Tensor) -> Tensor:
        """``fc`` on global-average-pooled f4: (N, num_classes)."""
        if self.fc is None:
            raise RuntimeError("this ResNet was built without fc (num_classes=None)")
        return self.fc(torch.flatten(self.avgpool(f4), 1))


def resnet18(*, in_channels: int = 3, base_width: int = 64, num_classes: int | None = 1000) -> ResNet:
    return ResNet(BasicBlock, (2, 2, 2, 2), in_channels=in_channels, base_width=base_width, num_classes=num_classes)


def resnet50(*, in_channels: int = 3, base_width: int = 64, num_classes: int | None = 1000) -> ResNet:
    return ResNet(Bottleneck, (3, 4, 6, 3), in_channels=in_channels, base_width=base_width, num_classes=num_classes)


ARCHS = {"resnet18": resnet18, "resnet50": resnet50}


def adapt_state_dict(model: ResNet, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """A torchvision ResNet state dict made to fit ``model``: ``fc`` taken from the model (ignored),
    ``conv1`` summed over RGB for gray input (the response to a gray image equals the RGB net's
    response to that image repeated in three channels), or repeated/averaged for other counts."""
    own = model.state_dict()
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("fc."):
            continue
        if key == "conv1.weight" and value.shape[1] != model.in_channels:
            if model.in_channels == 1:
                value = value.sum(dim=1, keepdim=True)
            else:
                reps = -(-model.in_channels // value.shape[1])
                value = value.repeat(1, reps, 1, 1)[:, : model.in_channels] * (value.shape[1] / model.in_channels)
        out[key] = value
    for key in ("fc.weight", "fc.bias"):
        if key in own:
            out[key] = own[key]
    return out


def load_torchvision_state_dict(model: ResNet, path: Path | str | Mapping[str, Tensor]) -> ResNet:
    """Load torchvision ResNet weights (a ``.pth`` path or a state dict) strictly into ``model``.

    Raises ValueError naming the mismatching keys when the file is not a matching ResNet
    (e.g. resnet18 weights into a resnet50, or a narrowed ``base_width``).
    """
    if isinstance(path, Mapping):
        state = dict(path)
    else:
        state = torch.load(Path(path), map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and "state_dict" in state and isinstance(state["state_dict"], Mapping):
            state = dict(state["state_dict"])
    state = adapt_state_dict(model, state)
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        raise ValueError(
            "not a matching torchvision ResNet state dict: "
            f"missing {missing[:3]}{'…' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'…' if len(unexpected) > 3 else ''}, "
            f"wrong shape {wrong[:3]}{'…' if len(wrong) > 3 else ''}"
        )
    model.load_state_dict(state, strict=True)
    return model
