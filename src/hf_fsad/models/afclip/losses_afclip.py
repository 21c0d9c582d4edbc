"""AF-CLIP training losses, Eqs. 11-15 ("AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP
Adaptation", ACM MM 2025).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...training.losses import focal_loss


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
