"""One-to-Normal Eqs. 2, 4-7 (Li et al., "One-to-Normal: Anomaly Personalization for Few-shot Anomaly
Detection", arXiv:2502.01201) as pure functions on small tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...scoring import l2_normalize, nearest_cosine


def ssim(
    images: torch.Tensor, others: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004) of image pairs (B, C, H, W): Gaussian window of std `sigma`
    (radius 3.5 sigma: 11 x 11 at 1.5), K1 = 0.01, K2 = 0.03, "valid" windows only, averaged over channels
    and positions. Returns (B,); 1 for identical images."""
    if images.shape != others.shape:
        raise ValueError(
            f"SSIM needs images of one shape, got {tuple(images.shape)} and {tuple(others.shape)}."
        )
    radius = int(3.5 * sigma + 0.5)
    if min(images.shape[-2:]) < 2 * radius + 1:
        raise ValueError(
            f"Images of {tuple(images.shape[-2:])} are smaller than the {2 * radius + 1}-pixel window."
        )
    offsets = torch.arange(-radius, radius + 1, dtype=images.dtype, device=images.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    channels = images.shape[1]

    def blur(values: torch.Tensor) -> torch.Tensor:
        rows = F.conv2d(values, kernel.view(1, 1, 1, -1).expand(channels, 1, 1, -1), groups=channels)
        return F.conv2d(rows, kernel.view(1, 1, -1, 1).expand(channels, 1, -1, 1), groups=channels)

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    mean_x, mean_y = blur(images), blur(others)
    var_x = blur(images * images) - mean_x**2
    var_y = blur(others * others) - mean_y**2
    covariance = blur(images * others) - mean_x * mean_y
    numerator = (2 * mean_x * mean_y + c1) * (2 * covariance + c2)
    denominator = (mean_x**2 + mean_y**2 + c1) * (var_x + var_y + c2)
    return (numerator / denominator).flatten(1).mean(dim=-1)


def personalized_difference(query: torch.Tensor, personalized: torch.Tensor) -> torch.Tensor:
    """One-to-Normal Eq. 4's map: 1 - cos between each query patch (B, N, D) and the personalized image's
    patch at the same position. (B, N)."""
    return 1 - (l2_normalize(query) * l2_normalize(personalized)).sum(-1)


def pool_difference(query: torch.Tensor, memory: torch.Tensor) -> torch.Tensor:
    """One-to-Normal Eq. 5's map: min over the anomaly-free pool's patches (M, D) of 1 - cos. (B, N)."""
    return 1 - nearest_cosine(query, memory)


def level_mean_of_maxima(level_maps: list[torch.Tensor]) -> torch.Tensor:
    """Eqs. 4-5's reduction: each level's maximum over the grid, averaged over the levels. [(B, N)] -> (B,)."""
    return torch.stack([level.amax(dim=-1) for level in level_maps]).mean(dim=0)


def one_to_normal_score(
    personalized: torch.Tensor, pool: torch.Tensor, text: torch.Tensor, alpha: float = 1.0, beta: float = 0.5
) -> torch.Tensor:
    """One-to-Normal Eq. 7: A = S_P + alpha S_N + beta S_text."""
    return personalized + alpha * pool + beta * text
