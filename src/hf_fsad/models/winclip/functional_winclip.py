"""WinCLIP / WinCLIP+ equations (Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and
Segmentation", CVPR 2023, arXiv:2303.14814) as pure functions on small tensors.
"""

from __future__ import annotations

import torch

from ...scoring import harmonic_aggregation, reference_association


def harmonic_mean(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Harmonic mean of positive scores along `dim`."""
    return scores.shape[dim] / scores.reciprocal().sum(dim=dim)


def winclip_zero_shot_map(
    image_scores: torch.Tensor, window_scores: list[torch.Tensor], masks: list[torch.Tensor]
) -> torch.Tensor:
    """WinCLIP zero-shot map (B, P): harmonic mean over {image score, each scale's aggregated window scores}."""
    num_patches = masks[0].shape[1] if masks else 1
    per_scale = [image_scores[:, None].expand(-1, num_patches)]
    per_scale += [harmonic_aggregation(scores, mask) for scores, mask in zip(window_scores, masks)]
    return harmonic_mean(torch.stack(per_scale), dim=0)


def winclip_few_shot_map(
    patch_tokens: torch.Tensor,
    reference_patch_tokens: torch.Tensor,
    window_embeddings: list[torch.Tensor],
    reference_window_embeddings: list[torch.Tensor],
    masks: list[torch.Tensor],
) -> torch.Tensor:
    """WinCLIP+ reference-association map (B, P): mean over patch level and window scales of the
    distance to the nearest reference item (window scores harmonic-aggregated to patches)."""
    per_level = [reference_association(patch_tokens, reference_patch_tokens)]
    for windows, reference_windows, mask in zip(window_embeddings, reference_window_embeddings, masks):
        per_level.append(harmonic_aggregation(reference_association(windows, reference_windows), mask))
    return torch.stack(per_level).mean(dim=0)


def fuse_zero_few_shot(
    zero_shot_map: torch.Tensor, zero_shot_image_scores: torch.Tensor, few_shot_map: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """WinCLIP+ fusion: map = mean of both maps; image score = mean of the zero-shot score and the
    few-shot map's maximum. Maps are (B, P); returns (map, image_scores)."""
    return (zero_shot_map + few_shot_map) / 2, (zero_shot_image_scores + few_shot_map.amax(dim=-1)) / 2
