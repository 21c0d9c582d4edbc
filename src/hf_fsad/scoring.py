"""Pure scoring functions shared by the methods (no parameters, no state).

Kept apart from the modules so each equation can be tested on small tensors.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=64)
def window_token_indices(grid_size: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Flat patch indices of every `scale`x`scale` window sliding over the patch grid.

    Returns a (num_windows, scale*scale) long tensor in row-major window order; row w lists the
    patch positions (row-major in the grid) covered by window w. Cached: do not modify the result.
    """
    height, width = grid_size
    if scale < 1 or scale > min(height, width):
        raise ValueError(f"Window scale {scale} does not fit a {height}x{width} patch grid.")
    if stride < 1:
        raise ValueError(f"Window stride must be >= 1, got {stride}.")
    grid = torch.arange(height * width).reshape(1, 1, height, width).float()
    windows = F.unfold(grid, kernel_size=scale, stride=stride)  # (1, scale*scale, num_windows)
    return windows[0].T.long()


@functools.lru_cache(maxsize=64)
def window_masks(grid_size: tuple[int, int], scale: int, stride: int = 1) -> torch.Tensor:
    """Boolean (num_windows, num_patches) matrix: entry (w, p) is True when window w covers patch p."""
    indices = window_token_indices(grid_size, scale, stride)
    masks = torch.zeros(indices.shape[0], grid_size[0] * grid_size[1], dtype=torch.bool)
    masks.scatter_(1, indices, True)
    return masks


def harmonic_aggregation(window_scores: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """Per patch, the harmonic mean of the scores of the windows covering it.

    window_scores: (B, W) non-negative scores; masks: (W, P) from `window_masks`. Returns (B, P).
    One matrix product instead of a loop over positions. A zero score makes the mean exactly zero.
    """
    masks = masks.to(window_scores.dtype)
    coverage = masks.sum(dim=0)
    if torch.any(coverage == 0):
        raise ValueError("Some patches are covered by no window; use stride 1 or a smaller scale.")
    reciprocal = window_scores.reciprocal()
    is_zero = torch.isinf(reciprocal)
    means = coverage / (reciprocal.masked_fill(is_zero, 0.0) @ masks)
    return means.masked_fill((is_zero.to(masks.dtype) @ masks) > 0, 0.0)


def harmonic_mean(scores: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """Harmonic mean of positive scores along `dim`."""
    return scores.shape[dim] / scores.reciprocal().sum(dim=dim)


def class_scores(
    embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Probability of the anomalous state: softmax(cos(x, [t_normal, t_anomalous]) / T)[anomalous].

    embeddings: (..., D); text_embeddings: (2, D) ordered (normal, anomalous). Returns (...).
    """
    similarity = F.normalize(embeddings, dim=-1) @ F.normalize(text_embeddings, dim=-1).T
    return (similarity / temperature).softmax(dim=-1)[..., 1]


def reference_association(
    query: torch.Tensor, reference: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Distance of each query item to its nearest reference item: min over references of (1 - cos) / 2.

    query: (B, N, D); reference: (M, D), all items of all reference images pooled. Returns (B, N).
    Queries are processed in chunks so memory stays bounded for large reference sets.
    """
    if reference.shape[0] == 0:
        raise ValueError("The reference memory is empty: build the bank from at least one image.")
    reference = F.normalize(reference, dim=-1)
    flat = F.normalize(query, dim=-1).reshape(-1, query.shape[-1])
    nearest = torch.cat(
        [(chunk @ reference.T).amax(dim=-1) for chunk in flat.split(chunk_size)]
    )
    # clamp: rounding can push cos a hair above 1, and harmonic means need non-negative scores
    return ((1 - nearest).clamp_min(0) / 2).reshape(query.shape[:-1])


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize (B, h, w) score maps to (B, H, W)."""
    return F.interpolate(maps.unsqueeze(1), size=size, mode="bilinear", align_corners=False).squeeze(1)


def ensemble_text_embedding(embeddings: torch.Tensor, normalize_each: bool = True) -> torch.Tensor:
    """One embedding (D,) for a prompt ensemble (n, D).

    normalize_each=True (WinCLIP paper, InCTRL): L2-normalise each prompt, average, re-normalise.
    normalize_each=False (anomalib): plain mean of the raw embeddings.
    """
    if normalize_each:
        return F.normalize(F.normalize(embeddings, dim=-1).mean(dim=0), dim=-1)
    return embeddings.mean(dim=0)


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
