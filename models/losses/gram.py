"""Gram matrices and HQG-Net's feature-consistency loss L_FC (Eq. 8).

For feature maps F (N, C, *positions) the Gram matrix is F F^T / (C * L) over the L positions
(Johnson et al.'s normalisation, so values do not scale with width or size). HQG-Net applies it to
vectors v (N, D) (v_x_hat and v_c, D = 80): a vector is D channels at one position, so its Gram
matrix is the outer product v v^T / D; it keeps how the components co-vary and ignores their sign.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["gram_matrix", "feature_consistency_loss"]


def gram_matrix(features: Tensor) -> Tensor:
    """(N, C, ...) or (N, D) -> (N, C, C), symmetric positive semi-definite."""
    if features.dim() < 2:
        raise ValueError(f"gram_matrix expects (N, C, ...) or (N, D), got shape {tuple(features.shape)}")
    f = features.float()
    f = f.reshape(f.shape[0], f.shape[1], -1)
    c, length = f.shape[1], f.shape[2]
    return torch.bmm(f, f.transpose(1, 2)) / (c * length)


def feature_consistency_loss(v_x_hat: Tensor, v_c: Tensor) -> Tensor:
    """L_FC = ||Gr(v_x_hat) - Gr(v_c)||_F (Eq. 8), per sample, averaged over the batch."""
    if v_x_hat.shape != v_c.shape:
        raise ValueError(f"feature_consistency_loss: shapes differ {tuple(v_x_hat.shape)} vs {tuple(v_c.shape)}")
    diff = gram_matrix(v_x_hat) - gram_matrix(v_c)
    return torch.linalg.matrix_norm(diff, ord="fro").mean()
