"""Losses two or more trained methods share (the focal loss: MetaCAN, AF-CLIP), on anomaly scores that are
probabilities (higher = more anomalous). A method's own losses live in
`models/<method>/losses_<method>.py`."""

from __future__ import annotations

import torch

# Scores are clamped this far inside (0, 1) before taking logs, so a saturated score gives a finite loss.
SCORE_EPSILON = 1e-6


def focal_loss(
    scores: torch.Tensor, labels: torch.Tensor, alpha: float = 1.0, gamma: float = 2.0
) -> torch.Tensor:
    """Per-sample focal loss (Lin et al.) of probabilities `scores` (B,) against 0/1 `labels`:
    -alpha (1 - p_t)^gamma log p_t, with p_t the probability given to the true label."""
    scores = scores.clamp(SCORE_EPSILON, 1 - SCORE_EPSILON)
    labels = labels.to(scores.dtype)
    true_probability = labels * scores + (1 - labels) * (1 - scores)
    return -alpha * (1 - true_probability).pow(gamma) * true_probability.log()
