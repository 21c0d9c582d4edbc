"""Losses on anomaly scores that are probabilities (higher = more anomalous)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("focal", "bce", "bce+focal")
# Scores are clamped this far inside (0, 1) before taking logs, so a saturated score gives a finite loss.
_EPSILON = 1e-6


def focal_loss(
    scores: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0
) -> torch.Tensor:
    """Per-sample focal loss (Lin et al.) of probabilities `scores` (B,) against 0/1 `labels`:
    -alpha (1 - p_t)^gamma log p_t, with p_t the probability given to the true label."""
    scores = scores.clamp(_EPSILON, 1 - _EPSILON)
    labels = labels.to(scores.dtype)
    true_probability = labels * scores + (1 - labels) * (1 - scores)
    return -alpha * (1 - true_probability).pow(gamma) * true_probability.log()


def anomaly_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "bce+focal",
    alpha: float = 1.0,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Loss of one set of scores (B,) in (0, 1): "bce", "focal" or their sum "bce+focal"; summed over the set
    (MetaCAN Eq. 9) or averaged (reduction="mean")."""
    if kind not in LOSSES:
        raise ValueError(f"Unknown loss {kind!r}; choose from {LOSSES}.")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    per_sample = torch.zeros_like(scores)
    if "bce" in kind:
        clamped = scores.clamp(_EPSILON, 1 - _EPSILON)
        per_sample = per_sample + F.binary_cross_entropy(clamped, labels.to(scores.dtype), reduction="none")
    if "focal" in kind:
        per_sample = per_sample + focal_loss(scores, labels, alpha, gamma)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
