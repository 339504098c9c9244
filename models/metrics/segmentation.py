"""Downstream-segmentation metrics: Dice, ROC AUC, sensitivity, specificity and G-mean.

Enhancement is only useful if structures become easier to find; these compare a segmentation
(binary prediction, or a score map for AUC) with a ground-truth mask of the same shape.
"""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def _binary(x: np.ndarray, name: str) -> np.ndarray:
    arr = np.asarray(x)
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    if arr.ndim != 2:
        raise ValueError(f"{name}: expected a 2-D mask, got shape {arr.shape}")
    if arr.dtype == bool:
        return arr
    return arr > (0.5 if arr.dtype.kind == "f" else 0)


def _pair(pred: np.ndarray, truth: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    p, t = _binary(pred, "pred"), _binary(truth, "truth")
    if p.shape != t.shape:
        raise ValueError(f"prediction {p.shape} and mask {t.shape} differ in shape")
    return p, t


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """2|P∩T| / (|P| + |T|); 1 when both masks are empty (nothing to find, nothing found)."""
    p, t = _pair(pred, truth)
    total = int(p.sum() + t.sum())
    return 1.0 if total == 0 else float(2.0 * np.logical_and(p, t).sum() / total)


def sensitivity(pred: np.ndarray, truth: np.ndarray) -> float:
    """TP / (TP + FN): the fraction of true pixels found."""
    p, t = _pair(pred, truth)
    if not t.any():
        raise ValueError("sensitivity is undefined for an empty ground-truth mask")
    return float(np.logical_and(p, t).sum() / t.sum())


def specificity(pred: np.ndarray, truth: np.ndarray) -> float:
    """TN / (TN + FP): the fraction of background left unmarked."""
    p, t = _pair(pred, truth)
    if t.all():
        raise ValueError("specificity is undefined for a mask without background")
    return float(np.logical_and(~p, ~t).sum() / (~t).sum())


def g_mean(pred: np.ndarray, truth: np.ndarray) -> float:
    """sqrt(sensitivity x specificity): balanced for thin structures that cover few pixels."""
    return float(np.sqrt(sensitivity(pred, truth) * specificity(pred, truth)))


def auc(scores: np.ndarray, truth: np.ndarray) -> float:
    """ROC AUC of a per-pixel score map against a mask (Mann-Whitney U; ties count one half)."""
    s = np.asarray(scores, dtype=np.float64)
    if s.ndim == 3:
        s = s.mean(axis=2)
    t = _binary(truth, "truth")
    if s.shape != t.shape:
        raise ValueError(f"scores {s.shape} and mask {t.shape} differ in shape")
    n_pos, n_neg = int(t.sum()), int((~t).sum())
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUC needs both foreground and background pixels in the mask")
    ranks = rankdata(s.ravel())
    u = ranks[t.ravel()].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))
