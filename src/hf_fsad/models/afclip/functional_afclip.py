"""AF-CLIP equations ("AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP Adaptation", ACM MM 2025)
as pure functions on small tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ...scoring import l2_normalize


@functools.lru_cache(maxsize=16)
def gaussian_window_weights(window: int, sigma: float) -> torch.Tensor:
    """AF-CLIP Eq. 5's weights: a `window`x`window` Gaussian (std `sigma` patches) normalised to sum 1."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"Aggregation windows must be odd and positive, got {window}.")
    offsets = torch.arange(window, dtype=torch.float64) - window // 2
    weights = torch.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * sigma**2))
    return weights / weights.sum()


def spatial_aggregation(
    tokens: torch.Tensor, grid_size: tuple[int, int], window: int, sigma: float
) -> torch.Tensor:
    """AF-CLIP Eqs. 5-6: each patch token becomes the Gaussian-weighted mean of its `window`x`window`
    neighbourhood (zero padding at the border); the CLS token (position 0) is kept as it is.

    tokens: (B, 1+N, D) with N = h*w. Returns (B, 1+N, D). Window 1 is the identity.
    """
    if window == 1:
        return tokens
    batch, _, width = tokens.shape
    height, grid_width = grid_size
    patches = tokens[:, 1:].transpose(1, 2).reshape(batch, width, height, grid_width)
    kernel = gaussian_window_weights(window, sigma).to(tokens.dtype).to(tokens.device)
    kernel = kernel.expand(width, 1, window, window)
    aggregated = F.conv2d(patches, kernel, padding=window // 2, groups=width)
    return torch.cat([tokens[:, :1], aggregated.flatten(2).transpose(1, 2)], dim=1)


BLUR_MODES = ("mirror", "reflect")


def _extended_indices(size: int, radius: int, mode: str) -> torch.Tensor:
    """Indices into a length-`size` axis of the axis extended by `radius` on both sides, in scipy.ndimage's
    boundary `mode`: "mirror" (d c b | a b c d | c b a, about the edge samples) or "reflect" (c b a | a b c
    d | d c b, about the edges: the edge samples repeat). Periodic, so any radius works."""
    positions = torch.arange(-radius, size + radius)
    if mode == "mirror":
        if size == 1:
            return torch.zeros_like(positions)
        period = positions % (2 * size - 2)
        return torch.where(period < size, period, 2 * size - 2 - period)
    period = positions % (2 * size)
    return torch.where(period < size, period, 2 * size - 1 - period)


def gaussian_blur(maps: torch.Tensor, sigma: float, mode: str = "mirror") -> torch.Tensor:
    """(B, H, W) maps smoothed by a Gaussian of std `sigma` pixels, as `scipy.ndimage.gaussian_filter(map,
    sigma, mode=mode, truncate=4.0)`: kernel radius int(4 sigma + 0.5), borders extended in scipy's `mode`
    ("mirror" or "reflect", scipy's default; see `_extended_indices`)."""
    if mode not in BLUR_MODES:
        raise ValueError(f"Unknown blur mode {mode!r}; choose from {BLUR_MODES}.")
    if sigma <= 0:
        return maps
    radius = max(1, int(4 * sigma + 0.5))
    offsets = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-(offsets**2) / (2 * sigma**2))
    kernel = kernel / kernel.sum()
    height, width = maps.shape[-2:]
    rows = _extended_indices(height, radius, mode).to(maps.device)
    columns = _extended_indices(width, radius, mode).to(maps.device)
    extended = maps[:, rows][:, :, columns].unsqueeze(1)
    blurred = F.conv2d(extended, kernel.view(1, 1, 1, -1))
    return F.conv2d(blurred, kernel.view(1, 1, -1, 1)).squeeze(1)


def afclip_token_probabilities(
    token_sets: list[torch.Tensor], text_embeddings: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """AF-CLIP Eqs. 9-10: per token, softmax over (normal, anomalous) of the cosine logits summed over all
    token sets (layers x windows). token_sets: [(B, T, P)]; text_embeddings: (2, P). Returns (B, T)
    anomalous probabilities (token 0 = CLS: the image score)."""
    text = l2_normalize(text_embeddings)
    logits = sum(l2_normalize(tokens) @ text.T for tokens in token_sets) / temperature
    return logits.softmax(dim=-1)[..., 1]
