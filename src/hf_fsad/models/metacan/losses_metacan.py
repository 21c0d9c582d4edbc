"""MetaCAN training losses (Lv et al., "MetaCAN: Improving Generalizability of Few-shot Anomaly Detection with
Meta-learning", CIKM 2025), Eq. 9 and the official code's focal loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training.losses import SCORE_EPSILON, focal_loss

LOSSES = ("focal", "bce", "bce+focal", "official_focal")


def official_focal_loss(
    scores: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0
) -> torch.Tensor:
    """Per-sample loss of the official MetaCAN code's `BinaryFocalLoss` (logits=True) applied, as that code
    does, to scores that are already probabilities: with b = BCE-with-logits(s, y) = BCE(sigmoid(s), y),
    alpha (1 - e^-b)^gamma b. Since sigmoid maps [0, 1] into [0.5, 0.73], this is not the focal loss of `s`."""
    labels = labels.to(scores.dtype)
    bce = F.binary_cross_entropy_with_logits(scores, labels, reduction="none")
    return alpha * (1 - torch.exp(-bce)).pow(gamma) * bce


def anomaly_loss(
    scores: torch.Tensor,
    labels: torch.Tensor,
    kind: str = "bce+focal",
    alpha: float = 1.0,
    gamma: float = 2.0,
    reduction: str = "sum",
) -> torch.Tensor:
    """Loss of one set of scores (B,) in (0, 1): "bce", "focal" (Lin et al.'s focal loss of the scores),
    their sum "bce+focal", or "official_focal" (`official_focal_loss`); summed over the set (MetaCAN Eq. 9)
    or averaged (reduction="mean", as the official MetaCAN code does)."""
    if kind not in LOSSES:
        raise ValueError(f"Unknown loss {kind!r}; choose from {LOSSES}.")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}.")
    per_sample = torch.zeros_like(scores)
    if kind in ("bce", "bce+focal"):
        clamped = scores.clamp(SCORE_EPSILON, 1 - SCORE_EPSILON)
        per_sample = per_sample + F.binary_cross_entropy(clamped, labels.to(scores.dtype), reduction="none")
    if kind in ("focal", "bce+focal"):
        per_sample = per_sample + focal_loss(scores, labels, alpha, gamma)
    if kind == "official_focal":
        per_sample = official_focal_loss(scores, labels, alpha, gamma)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
