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
    nearest = [_nearest_in_memory(chunk, memory, num_nearest, chunk_size) for chunk in flat.split(chunk_size)]
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


def anomalous_association(
    query: torch.Tensor, anomalous: torch.Tensor, chunk_size: int = 4096
) -> torch.Tensor:
    """Similarity to the most similar anomalous-memory item: (1 + max cos) / 2, in [0, 1]. (B, N).

    High when a query item looks like a stored defect; mapped to [0, 1] like the reference distance so
    both memories aggregate over windows the same way.
    """
    return ((1 + nearest_cosine(query, anomalous, chunk_size)) / 2).clamp(0, 1)


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


# --- Anomalous memory (Abdali et al., "Anomalous Samples for Few-Shot Anomaly Detection") ----------------


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


def level_image_scores(maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level patch maps [(B, P)] -> (B, L): each level's maximum over patches (its image score)."""
    return torch.stack([level.amax(dim=-1) for level in maps], dim=-1)


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


WEIGHT_DISTRIBUTIONS = ("uniform", "normal", "student_t")


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
    validation_scores: torch.Tensor, labels: torch.Tensor, candidates: torch.Tensor
) -> tuple[torch.Tensor, float]:
    """The candidate weight vector (n, S) whose combined score has the best validation AUROC (the first on
    ties), and that AUROC. validation_scores: (V, S) per-image score vectors."""
    aurocs = pairwise_auroc(candidates @ validation_scores.double().T, labels)
    best = int(torch.argmax(aurocs))
    return candidates[best], float(aurocs[best])


# --- MetaCAN (papers/metacan.txt) ------------------------------------------------------------------------


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


# --- AF-CLIP (papers/af-clip.txt) -----------------------------------------------------------------------


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


# --- VTFusion, Eqs. 1, 2, 5, 6 -----------------------------------------------------------------------------
# Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection"


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


def nearest_prototype_distance(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """VTFusion Eqs. 2 and 5: D(F_xy, P*) for each location, P* the nearest of all prototypes (any location),
    D the squared Euclidean distance (Eqs. 3-4 compare it with squared radii). (B, N, D), (M, D) -> (B, N)."""
    if prototypes.shape[0] == 0:
        raise ValueError("There are no prototypes: fit the model on normal images first.")
    return squared_distances(features, prototypes).amin(dim=-1)


def text_guided_map(
    level_features: list[torch.Tensor], text_embeddings: torch.Tensor, temperature: float = 0.01
) -> torch.Tensor:
    """VTFusion Eq. 6: M_t = sum over levels of softmax(F_l F_t^T / T)[anomalous], cosines of the level's
    features [(B, N, c)] with the (normal, anomalous) text features (2, c). Returns (B, N) in [0, L]."""
    return sum(class_scores(level, text_embeddings, temperature) for level in level_features)


# --- One-to-Normal (arXiv:2502.01201, Eqs. 2, 4-7) -----------------------------------------------------------


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
