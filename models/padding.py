"""Padding frames to the multiple an encoder-decoder needs, and nothing more.

Every generator here down-samples by a power of two (HQG-Net by 32, StillGAN's ResUNet by
2**depth, LaMEGAN by 4), yet the node must take frames of any size; they are padded at the
bottom/right and the output is cropped back to the original size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Pad (N, C, H, W) at the bottom/right to a multiple of ``multiple``; returns (padded, (H, W)).

    Reflect padding continues the image's own texture, so no dark border leaks into normalisation
    statistics or is taken for content; it needs pad < size, so tiny frames fall back to edge
    replication.
    """
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    if ph == 0 and pw == 0:
        return x, (h, w)
    mode = "reflect" if ph < h and pw < w else "replicate"
    return F.pad(x, (0, pw, 0, ph), mode=mode), (h, w)


def fill_batch(x: torch.Tensor, size: int) -> torch.Tensor:
    """Repeat the last frame of (N, C, H, W) until the batch holds ``size`` frames (callers drop the extras).

    CPU and GPU kernels choose their algorithm (and so their summation order) by batch shape: the
    same frame in a pass of 1 and in a pass of 4 can differ in the last bit, and rounding to 8 bits
    then flips a pixel. Every forward pass of a model therefore has the same batch size, so a
    frame's pixels never depend on how many frames a request held. In passes of several frames the
    kernels can still round a frame differently next to different neighbours (measured: 4e-7 at the
    network's output, under one output level after the colour model's round trip); the same series
    always forms the same passes, and in passes of one frame (the CPU default) a frame's pixels
    depend on the frame, the weights and the options alone.
    """
    n = x.shape[0]
    if n >= size:
        return x
    return torch.cat([x, x[-1:].expand(size - n, *x.shape[1:])], dim=0)
