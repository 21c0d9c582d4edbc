"""Losses on anomaly scores that are probabilities (higher = more anomalous)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("focal", "bce", "bce+focal", "official_focal")
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
        clamped = scores.clamp(_EPSILON, 1 - _EPSILON)
        per_sample = per_sample + F.binary_cross_entropy(clamped, labels.to(scores.dtype), reduction="none")
    if kind in ("focal", "bce+focal"):
        per_sample = per_sample + focal_loss(scores, labels, alpha, gamma)
    if kind == "official_focal":
        per_sample = official_focal_loss(scores, labels, alpha, gamma)
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


# --- AF-CLIP (papers/af-clip.txt, Eqs. 11-15) ---------------------------------------------------------------


def segmentation_loss(
    patch_probabilities: torch.Tensor, patch_masks: torch.Tensor, gamma: float = 4.0
) -> torch.Tensor:
    """AF-CLIP Eq. 13: mean focal loss plus mean L1 distance between the patch probabilities (B, N) and the
    binary patch masks (B, N)."""
    focal = focal_loss(patch_probabilities, patch_masks, gamma=gamma).mean()
    return focal + (patch_probabilities - patch_masks.to(patch_probabilities.dtype)).abs().mean()


ALIGNMENT_PAIRS = ("batch", "image")


def patch_alignment_loss(
    patch_features: torch.Tensor, patch_masks: torch.Tensor, pairs: str = "batch"
) -> torch.Tensor:
    """AF-CLIP Eq. 14 for one token set: max(0, mean cos over normal-anomalous patch pairs - mean cos over
    same-label pairs), pairs taken within each image. 0 when no image has both kinds of patch.

    pairs="batch" (the official code, default): both means pool the pairs of all images of the batch, self
    pairs (cos 1) and images with no anomalous patch included in the same-label mean, and the hinge is taken
    once. pairs="image": per image holding both kinds, the hinge of its own means (same-label pairs i != j),
    averaged over those images.

    patch_features: (B, N, P); patch_masks: (B, N) bool. Sums of unit vectors give every pair sum in O(N).
    """
    if pairs not in ALIGNMENT_PAIRS:
        raise ValueError(f"pairs must be one of {ALIGNMENT_PAIRS}, got {pairs!r}.")
    unit = F.normalize(patch_features.float(), dim=-1)
    anomalous = patch_masks.to(unit.dtype)
    normal = 1 - anomalous
    count_a, count_n = anomalous.sum(-1), normal.sum(-1)
    both = (count_a > 0) & (count_n > 0)
    if not both.any():
        return unit.sum() * 0
    sum_a = (unit * anomalous[..., None]).sum(1)
    sum_n = (unit * normal[..., None]).sum(1)
    cross_sums, cross_pairs = (sum_a * sum_n).sum(-1), count_a * count_n
    # |sum|^2 sums the cosines of every ordered pair of a group, the self pairs (cos 1) included
    same_sums, same_pairs = sum_a.pow(2).sum(-1) + sum_n.pow(2).sum(-1), count_a.pow(2) + count_n.pow(2)
    if pairs == "batch":
        return torch.relu(cross_sums.sum() / cross_pairs.sum() - same_sums.sum() / same_pairs.sum())
    patches = patch_masks.shape[-1]
    same = (same_sums - patches) / (same_pairs - patches).clamp_min(1)
    return torch.relu(cross_sums / cross_pairs.clamp_min(1) - same)[both].mean()


def afclip_loss(
    token_probabilities: torch.Tensor,
    labels: torch.Tensor,
    patch_masks: torch.Tensor,
    projected_sets: list[torch.Tensor],
    gamma: float = 4.0,
    segmentation_weight: float = 1.0,
    alignment_weight: float = 1.0,
    alignment_pairs: str = "batch",
) -> dict[str, torch.Tensor]:
    """AF-CLIP Eq. 15: image focal loss (Eq. 11, on the CLS probability) + lambda1 x segmentation loss
    (Eq. 13) + lambda2 x patch alignment loss (Eq. 14, averaged over the token sets; `alignment_pairs` as
    `patch_alignment_loss`'s `pairs`). Returns every term and "total".

    token_probabilities: (B, 1+N) anomalous probabilities (CLS first); labels: (B,); patch_masks: (B, N) bool
    at the patch grid; projected_sets: [(B, 1+N, P)] the projected token sets.
    """
    image = focal_loss(token_probabilities[:, 0], labels, gamma=gamma).mean()
    segmentation = segmentation_loss(token_probabilities[:, 1:], patch_masks, gamma)
    alignment = torch.stack(
        [patch_alignment_loss(tokens[:, 1:], patch_masks, alignment_pairs) for tokens in projected_sets]
    ).mean()
    total = image + segmentation_weight * segmentation + alignment_weight * alignment
    return {"image": image, "segmentation": segmentation, "alignment": alignment, "total": total}


# --- VTFusion, Eqs. 3, 4, 8, 10 ---------------------------------------------------------------------------
# Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection"


def compactness_loss(normal_distances: torch.Tensor, radius: float = 1e-5) -> torch.Tensor:
    """VTFusion Eq. 3 (NFC): mean over the normal images' locations of max(0, D(F, P*) - r^2)."""
    return torch.relu(normal_distances - radius**2).mean()


def separation_loss(
    anomalous_distances: torch.Tensor,
    anomalous_locations: torch.Tensor,
    radius: float = 1e-5,
    margin: float = 0.1,
) -> torch.Tensor:
    """VTFusion Eq. 4 (AFS): mean over the anomalous locations of max(0, (r + alpha)^2 - D(F, P*)).

    anomalous_distances: (B, N) D(F^va, P*); anomalous_locations: (B, N) bool, the synthetic defects' patches
    (the normal parts of an anomalous image are not pushed away). 0 when no location is anomalous.
    """
    hinge = torch.relu((radius + margin) ** 2 - anomalous_distances)
    if not anomalous_locations.any():
        return hinge.sum() * 0
    return hinge[anomalous_locations].mean()


def mse_segmentation_loss(anomaly_maps: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """VTFusion Eq. 8: mean squared error between the maps M^f (B, H, W) and the ground-truth masks."""
    return (anomaly_maps - masks.to(anomaly_maps.dtype)).pow(2).mean()


def vtfusion_loss(
    normal_distances: torch.Tensor,
    anomalous_distances: torch.Tensor,
    anomalous_locations: torch.Tensor,
    anomaly_maps: torch.Tensor,
    masks: torch.Tensor,
    radius: float = 1e-5,
    margin: float = 0.1,
    segmentation_weight: float = 1.0,
    use_separation: bool = True,
) -> dict[str, torch.Tensor]:
    """VTFusion Eq. 10: L_NFC + L_AFS + lambda x L_SEG (the paper prints L_AFS twice; it means
    NFC + AFS). use_separation=False drops both contrastive terms (the "w/o AIE" ablation). Returns every
    term and "total"."""
    compactness = compactness_loss(normal_distances, radius)
    separation = separation_loss(anomalous_distances, anomalous_locations, radius, margin)
    segmentation = mse_segmentation_loss(anomaly_maps, masks)
    total = segmentation_weight * segmentation
    if use_separation:
        total = total + compactness + separation
    return {
        "compactness": compactness,
        "separation": separation,
        "segmentation": segmentation,
        "total": total,
    }
