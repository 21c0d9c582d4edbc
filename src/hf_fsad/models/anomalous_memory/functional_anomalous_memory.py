"""Anomalous memory equations (Abdali et al., "Anomalous Samples for Few-Shot Anomaly Detection") as pure
functions on small tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ...scoring import nearest_cosine
from .configuration_anomalous_memory import WEIGHT_DISTRIBUTIONS


def anomalous_association(
    query: torch.Tensor, anomalous: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Similarity to the most similar anomalous-memory item: (1 + max cos) / 2, in [0, 1]. (B, N).

    High when a query item looks like a stored defect; mapped to [0, 1] like the reference distance so
    both memories aggregate over windows the same way.
    """
    return ((1 + nearest_cosine(query, anomalous, chunk_size)) / 2).clamp(0, 1)


def patch_defect_shares(masks: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, H, W) pixel masks -> (B, P) float64: the share of each patch's pixels that are defect."""
    pooled = F.avg_pool2d(masks.double().unsqueeze(1), kernel_size=patch_size, stride=patch_size)
    return pooled.flatten(1)


def window_defect_shares(patch_shares: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(B, P) patch shares, (W, P) window masks -> (B, W): the share of each window's pixels that are defect
    (a window is a union of whole patches, so its share is the mean of theirs)."""
    masks = masks.to(patch_shares)
    return patch_shares @ masks.T / masks.sum(dim=-1)


def anomalous_items(shares: torch.Tensor, fraction: float) -> torch.Tensor:
    """(B, items) defect shares -> (B, items) bool: the items of each image that are at least `fraction`
    defect; where none is, the items with the image's largest non-zero share (those holding most of a
    defect smaller than them), so every annotated defect is remembered at every scale."""
    largest = shares.amax(dim=-1, keepdim=True)
    return (shares >= fraction) | ((shares == largest) & (largest > 0))


def baseline_score_weights(num_levels: int, available: torch.Tensor | None = None) -> torch.Tensor:
    """The paper's baseline over [text, reference x L, anomalous x L]: the mean of three groups, each memory
    group the mean of its levels: [1/3, 1/(3L) x L, 1/(3L) x L].

    available: (1 + 2L,) bool, False for scores without a memory (a memory left empty at that level); each
    group with an available score gets an equal share, spread evenly over its available scores, and the
    others weigh 0.
    """
    if available is None:
        available = torch.ones(1 + 2 * num_levels, dtype=torch.bool)
    groups = [available[:1], available[1 : 1 + num_levels], available[1 + num_levels :]]
    group_share = 1 / sum(bool(group.any()) for group in groups)
    return torch.cat([group.double() * group_share / group.sum().clamp_min(1) for group in groups])


def sample_score_weights(
    num_samples: int,
    num_scores: int,
    distribution: str = "uniform",
    generator: torch.Generator | None = None,
    signed: bool = True,
) -> torch.Tensor:
    """(num_samples, num_scores) Monte-Carlo weight vectors, each scaled to unit L1 norm (a positive scale
    leaves the AUROC that selects them unchanged; for non-negative draws it is the sum).

    uniform: U(0, 1) per weight (the paper's choice); normal: N(0, 1); student_t: t with 3 degrees of
    freedom. signed=False takes the absolute value of the normal and Student-t draws.
    """
    shape = (num_samples, num_scores)
    if distribution == "uniform":
        raw = torch.rand(shape, generator=generator, dtype=torch.float64)
    elif distribution == "normal":
        raw = torch.randn(shape, generator=generator, dtype=torch.float64)
    elif distribution == "student_t":
        normal = torch.randn(shape, generator=generator, dtype=torch.float64)
        chi2 = torch.randn((*shape, 3), generator=generator, dtype=torch.float64).pow(2).sum(-1)
        raw = normal / (chi2 / 3).sqrt()
    else:
        raise ValueError(f"Unknown weight distribution {distribution!r}; choose from {WEIGHT_DISTRIBUTIONS}.")
    return unit_l1_weights(raw if signed else raw.abs())


def unit_l1_weights(weights: torch.Tensor, available: torch.Tensor | None = None) -> torch.Tensor:
    """Weight vectors (..., S) scaled to unit L1 norm, after zeroing the scores that are not `available`
    ((S,) bool; None: all are)."""
    if available is not None:
        weights = weights * available.to(weights.dtype)
    return weights / weights.abs().sum(dim=-1, keepdim=True).clamp_min(1e-12)


def pairwise_auroc(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """AUROC of each row of `scores` (n, V) against `labels` (V,), exactly: the share of (anomalous, normal)
    pairs ordered correctly, ties counting one half."""
    labels = labels.bool()
    if labels.all() or not labels.any():
        raise ValueError("Weight validation needs both normal and anomalous validation images.")
    difference = scores[:, labels, None] - scores[:, None, ~labels]
    return ((difference > 0).double() + 0.5 * (difference == 0).double()).mean(dim=(1, 2))


def select_score_weights(
    validation_scores: torch.Tensor | Sequence[torch.Tensor],
    labels: torch.Tensor,
    candidates: torch.Tensor,
    tile_rule: str | None = None,
) -> tuple[torch.Tensor, float]:
    """The candidate weight vector (n, S) whose combined score has the best validation AUROC (the first on
    ties), and that AUROC. validation_scores: (V, S) per-image score vectors; or with a `tile_rule`, per image
    its tiles' (T_v, S) score vectors, an image's combined score then the "max" or "mean" of its tiles'."""
    if tile_rule is None:
        combined = candidates @ validation_scores.double().T
    elif tile_rule in ("max", "mean"):
        reduce = torch.amax if tile_rule == "max" else torch.mean
        combined = torch.stack(
            [reduce(candidates @ tiles.double().T, dim=-1) for tiles in validation_scores], 1
        )
    else:
        raise ValueError(f"tile_rule must be 'max' or 'mean', got {tile_rule!r}.")
    aurocs = pairwise_auroc(combined, labels)
    best = int(torch.argmax(aurocs))
    return candidates[best], float(aurocs[best])
