"""Pure scoring functions that two or more methods use (no parameters, no state).

A method's own equations live in `models/<method>/functional_<method>.py`; these are the shared ones
(window geometry, harmonic aggregation, cosine nearest-neighbour search, coreset, upsampling), each
testable on small tensors.
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
    if not torch.compiler.is_exporting() and torch.any(coverage == 0):  # no value checks in an exported graph
        raise ValueError("Some patches are covered by no window; use stride 1 or a smaller scale.")
    reciprocal = window_scores.reciprocal()
    is_zero = torch.isinf(reciprocal)
    means = coverage / (reciprocal.masked_fill(is_zero, 0.0) @ masks)
    return means.masked_fill((is_zero.to(masks.dtype) @ masks) > 0, 0.0)


def l2_normalize(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Unit vectors along the last dimension, like `F.normalize`, but twice differentiable at zero (where
    `F.normalize`'s second derivative is NaN; meta-learning differentiates through a gradient)."""
    return vectors * vectors.pow(2).sum(dim=-1, keepdim=True).clamp_min(eps * eps).rsqrt()


def class_scores(
    embeddings: torch.Tensor, text_embeddings: torch.Tensor, temperature: float = 0.07
) -> torch.Tensor:
    """Probability of the anomalous state: softmax(cos(x, [t_normal, t_anomalous]) / T)[anomalous].

    embeddings: (..., D); text_embeddings: (2, D) ordered (normal, anomalous). Returns (...).
    """
    similarity = l2_normalize(embeddings) @ l2_normalize(text_embeddings).T
    return (similarity / temperature).softmax(dim=-1)[..., 1]


def nearest_cosine(
    query: torch.Tensor, memory: torch.Tensor, chunk_size: int = 4096, num_nearest: int = 1
) -> torch.Tensor:
    """Cosine similarity of each query item to its most similar memory item (the mean over the
    `num_nearest` most similar ones when more than 1), searched exactly over every memory item.

    query: (B, N, D); memory: (M, D), all items of all memory images pooled. Returns (B, N). Queries and
    memory are both taken `chunk_size` items at a time, so at most chunk_size x chunk_size similarities
    exist at once (64 MB in float32 at 4096) whatever B x N and M; the running maximum (top-k) over memory
    chunks is exact.
    """
    if memory.shape[0] == 0:
        raise ValueError("The memory is empty: build the bank from at least one image (or region).")
    if not 1 <= num_nearest <= memory.shape[0]:
        raise ValueError(f"Cannot take the {num_nearest} nearest of {memory.shape[0]} memory items.")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}.")
    flat = F.normalize(query, dim=-1).reshape(-1, query.shape[-1])
    # An exported graph takes any batch, so it cannot split the queries into a batch-dependent count of chunks.
    chunks = [flat] if torch.compiler.is_exporting() else flat.split(chunk_size)
    nearest = [_nearest_in_memory(chunk, memory, num_nearest, chunk_size) for chunk in chunks]
    return torch.cat(nearest).reshape(query.shape[:-1])


def _nearest_in_memory(
    queries: torch.Tensor, memory: torch.Tensor, num_nearest: int, chunk_size: int
) -> torch.Tensor:
    """`nearest_cosine` of unit-length `queries` (n, D), one memory chunk at a time. Returns (n,)."""
    best = None  # (n, num_nearest) the highest cosines so far, in descending order
    for items in memory.split(chunk_size):
        similarities = queries @ F.normalize(items, dim=-1).T
        if num_nearest == 1:
            top = similarities.amax(dim=-1, keepdim=True)
            best = top if best is None else torch.maximum(best, top)
        else:
            candidates = similarities if best is None else torch.cat([best, similarities], dim=-1)
            best = candidates.topk(min(num_nearest, candidates.shape[-1]), dim=-1).values
    return best.mean(dim=-1)


def greedy_coreset(items: torch.Tensor, size: int, projection_dim: int = 64, seed: int = 0) -> torch.Tensor:
    """Indices (size,) of a greedy k-center coreset of `items` (M, D) under cosine geometry (PatchCore):
    start at item 0, then repeatedly add the item farthest from everything chosen so far.

    Items are L2-normalised, then randomly projected to `projection_dim` dimensions when D is larger
    (Johnson-Lindenstrauss: distances kept approximately; a narrow copy of the items stays in cache, and each
    of the `size` steps is one matrix-vector product). Every item then lies within the last chosen item's
    distance of the coreset.
    """
    if size < 1:
        raise ValueError(f"A coreset needs at least one item, got size {size}.")
    if size >= items.shape[0]:
        return torch.arange(items.shape[0], device=items.device)
    points = F.normalize(items.float(), dim=-1)
    if points.shape[1] > projection_dim:
        generator = torch.Generator().manual_seed(seed)
        projection = torch.randn(points.shape[1], projection_dim, generator=generator) / projection_dim**0.5
        points = points @ projection.to(points.device)
    norms = points.pow(2).sum(dim=-1)

    def squared_distances_to(index: int) -> torch.Tensor:
        return (norms - 2 * (points @ points[index]) + norms[index]).clamp_min(0)

    chosen = [0]
    distances = squared_distances_to(0)
    for _ in range(1, size):
        chosen.append(int(torch.argmax(distances)))
        torch.minimum(distances, squared_distances_to(chosen[-1]), out=distances)
    return torch.tensor(chosen, device=items.device)


def reference_association(
    query: torch.Tensor, reference: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """WinCLIP+ distance to the nearest normal reference item: (1 - max cos) / 2, in [0, 1]. (B, N)."""
    # clamp: rounding can push cos a hair above 1, and harmonic means need non-negative scores
    return (1 - nearest_cosine(query, reference, chunk_size)).clamp_min(0) / 2


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


def level_image_scores(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level patch maps [(B, P)] -> (B, L): each level's maximum over patches (its image score)."""
    return torch.stack([level.amax(dim=-1) for level in maps], dim=-1)
