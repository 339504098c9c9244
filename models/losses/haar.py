"""Differentiable 2-D Haar DWT and the structure-preservation loss L_Haar of HQG-Net (Eq. 7).

Conventions are pywavelets' (``pywt.dwt2(x, "haar")``), sign included: for each 2x2 block
[[a, b], [c, d]] the subbands are

    LL = (a + b + c + d) / 2     pywt cA
    LH = (a + b - c - d) / 2     pywt cH  (horizontal detail: changes down the rows)
    HL = (a - b + c - d) / 2     pywt cV  (vertical detail: changes along a row)
    HH = (a - b - c + d) / 2     pywt cD  (diagonal detail)

Odd sides are padded by repeating the last row/column, which equals pywt's default
"symmetric" extension for a filter of length 2, so odd sizes match pywt too.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["haar_dwt", "high_frequency", "haar_loss"]


def _filters(dtype: torch.dtype, device: torch.device) -> Tensor:
    k = torch.tensor(
        [
            [[1.0, 1.0], [1.0, 1.0]],  # LL
            [[1.0, 1.0], [-1.0, -1.0]],  # LH (pywt cH)
            [[1.0, -1.0], [1.0, -1.0]],  # HL (pywt cV)
            [[1.0, -1.0], [-1.0, 1.0]],  # HH (pywt cD)
        ],
        dtype=dtype,
        device=device,
    )
    return (k / 2.0)[:, None]  # (4, 1, 2, 2)


def haar_dwt(x: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """One-level Haar DWT of (N, C, H, W) -> (LL, LH, HL, HH), each (N, C, ceil(H/2), ceil(W/2))."""
    if x.dim() != 4:
        raise ValueError(f"haar_dwt expects (N, C, H, W), got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if h % 2 or w % 2:
        x = F.pad(x, (0, w % 2, 0, h % 2), mode="replicate")
    out = F.conv2d(x.reshape(n * c, 1, *x.shape[-2:]), _filters(x.dtype, x.device), stride=2)
    out = out.reshape(n, c, 4, *out.shape[-2:])
    return out[:, :, 0], out[:, :, 1], out[:, :, 2], out[:, :, 3]


def high_frequency(x: Tensor) -> Tensor:
    """x^HF of Eq. 7: the LH, HL and HH subbands stacked, (N, C, 3, H/2, W/2)."""
    _, lh, hl, hh = haar_dwt(x)
    return torch.stack([lh, hl, hh], dim=2)


def haar_loss(x_hat: Tensor, y: Tensor) -> Tensor:
    """L_Haar = ||x_hat^HF - y^HF||_1 (Eq. 7), as a mean over coefficients so it does not grow with size."""
    if x_hat.shape != y.shape:
        raise ValueError(f"haar_loss: shapes differ {tuple(x_hat.shape)} vs {tuple(y.shape)}")
    return (high_frequency(x_hat) - high_frequency(y)).abs().mean()
