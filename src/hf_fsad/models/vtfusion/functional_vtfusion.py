"""VTFusion Eqs. 1, 2, 5, 6 (Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot
Anomaly Detection") as pure functions on small tensors.
"""

from __future__ import annotations

import torch

from ...scoring import class_scores


def stack_levels(level_features: list[torch.Tensor]) -> torch.Tensor:
    """VTFusion's stacked feature F^v: the per-level features [(B, N, c)] concatenated along channels,
    (B, N, c x L)."""
    return torch.cat(level_features, dim=-1)


def initial_prototypes(stacked_normal_features: torch.Tensor) -> torch.Tensor:
    """VTFusion Eq. 1: the stacked features of the normal images (B, N, c x L) averaged over the images, one
    prototype per location: (N, c x L)."""
    return stacked_normal_features.mean(dim=0)


def squared_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared Euclidean distance of every feature (B, N, D) to every prototype (M, D): (B, N, M)."""
    cross = features @ prototypes.T
    squared = features.pow(2).sum(-1, keepdim=True) - 2 * cross + prototypes.pow(2).sum(-1)
    return squared.clamp_min(0)  # rounding can leave a hair below zero


DISTANCES = ("squared_euclidean", "mean_squared")


def nearest_prototype_distance(
    features: torch.Tensor, prototypes: torch.Tensor, distance: str = "squared_euclidean"
) -> torch.Tensor:
    """VTFusion Eqs. 2 and 5: D(F_xy, P*) for each location, P* the nearest of all prototypes (any location),
    D the squared Euclidean distance (Eqs. 3-4 compare it with squared radii), or with "mean_squared" that
    distance divided by the feature width (the mean squared difference per channel). (B, N, D), (M, D) ->
    (B, N)."""
    if distance not in DISTANCES:
        raise ValueError(f"distance must be one of {DISTANCES}, got {distance!r}.")
    if prototypes.shape[0] == 0:
        raise ValueError("There are no prototypes: fit the model on normal images first.")
    nearest = squared_distances(features, prototypes).amin(dim=-1)
    return nearest / features.shape[-1] if distance == "mean_squared" else nearest


def text_guided_map(
    level_features: list[torch.Tensor], text_embeddings: torch.Tensor, temperature: float = 0.01
) -> torch.Tensor:
    """VTFusion Eq. 6: M_t = sum over levels of softmax(F_l F_t^T / T)[anomalous], cosines of the level's
    features [(B, N, c)] with the (normal, anomalous) text features (2, c). Returns (B, N) in [0, L]."""
    return sum(class_scores(level, text_embeddings, temperature) for level in level_features)
