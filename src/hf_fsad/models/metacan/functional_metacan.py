"""MetaCAN equations (Lv et al., "MetaCAN: Improving Generalizability of Few-shot Anomaly Detection with
Meta-learning", CIKM 2025) as pure functions on small tensors.
"""

from __future__ import annotations

import torch

from ...scoring import level_image_scores, nearest_cosine


def topk_reference_anomaly(query: torch.Tensor, reference: torch.Tensor, num_nearest: int) -> torch.Tensor:
    """MetaCAN Eqs. 1-2: per query patch, m = 0.5 (1 - mean of its `num_nearest` highest cosines to the
    reference patches), with `num_nearest` = k, the number of reference images.

    query: (B, N, D) one level's patch tokens; reference: (M, D) that level's patches of all references
    pooled (M = k N). Returns (B, N) in [0, 1].
    """
    return 0.5 * (1 - nearest_cosine(query, reference, num_nearest=num_nearest))


def image_image_score(level_maps: list[torch.Tensor]) -> torch.Tensor:
    """MetaCAN Eqs. 3-4: s_II = sum over pyramid levels of each level map's maximum. [(B, N)] -> (B,)."""
    return level_image_scores(level_maps).sum(dim=-1)


def metacan_fusion(
    image_image: torch.Tensor | None, image_text: torch.Tensor | None, num_levels: int
) -> torch.Tensor:
    """MetaCAN Eq. 8: s = (s_II + s_IT) / (L + 1) (the paper's /4 with L = 3 levels), in [0, 1].

    With one branch ablated (None), the other alone, normalised to [0, 1]: s_II / L or s_IT.
    """
    if image_image is None and image_text is None:
        raise ValueError("MetaCAN fusion needs at least one branch score.")
    if image_text is None:
        return image_image / num_levels
    if image_image is None:
        return image_text
    return (image_image + image_text) / (num_levels + 1)
