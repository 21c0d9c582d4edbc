"""Each scoring equation on small tensors against hand-computed or float64 values."""

from __future__ import annotations

import math

import pytest
import torch

from hf_fsad import scoring


def test_window_token_indices_on_3x3_grid():
    indices = scoring.window_token_indices((3, 3), 2)
    # grid positions 0 1 2 / 3 4 5 / 6 7 8; 2x2 windows in row-major order
    assert indices.tolist() == [[0, 1, 3, 4], [1, 2, 4, 5], [3, 4, 6, 7], [4, 5, 7, 8]]


def test_window_token_indices_rectangular_grid_and_stride():
    assert scoring.window_token_indices((2, 4), 2, stride=2).tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_window_masks_mark_covered_patches():
    masks = scoring.window_masks((3, 3), 2)
    assert masks.dtype == torch.bool
    assert masks.int().tolist() == [
        [1, 1, 0, 1, 1, 0, 0, 0, 0],
        [0, 1, 1, 0, 1, 1, 0, 0, 0],
        [0, 0, 0, 1, 1, 0, 1, 1, 0],
        [0, 0, 0, 0, 1, 1, 0, 1, 1],
    ]
    # WinCLIP's grid: 15x15 patches -> 196 windows of 2x2 and 169 of 3x3
    assert scoring.window_masks((15, 15), 2).shape == (196, 225)
    assert scoring.window_masks((15, 15), 3).shape == (169, 225)


@pytest.mark.parametrize("scale", [0, 4])
def test_window_that_does_not_fit_is_rejected(scale):
    with pytest.raises(ValueError, match="does not fit"):
        scoring.window_token_indices((3, 3), scale)


def test_harmonic_aggregation_by_hand():
    scores = torch.tensor([[0.2, 0.4, 0.5, 1.0]], dtype=torch.float64)
    masks = scoring.window_masks((3, 3), 2)
    result = scoring.harmonic_aggregation(scores, masks)[0]
    # corner patches see one window; the centre sees all four; edge-middle patches see two
    # float64, a handful of ops: rel 1e-12 leaves ~4000 ulp (2.2e-16) of room
    assert result[0].item() == pytest.approx(0.2, rel=1e-12)
    assert result[8].item() == pytest.approx(1.0, rel=1e-12)
    assert result[1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4), rel=1e-12)
    assert result[4].item() == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 1.0), rel=1e-12)


def test_harmonic_aggregation_matches_loop_over_positions():
    torch.manual_seed(0)
    scores = torch.rand(3, 169, dtype=torch.float64) + 0.01
    masks = scoring.window_masks((15, 15), 3)
    expected = torch.stack(
        [torch.stack([1 / (1 / s[masks[:, p]]).mean() for p in range(225)]) for s in scores]
    )
    # float64 defaults (rtol 1e-7): the same means, vectorised vs looped (reduction order of <= 9 terms)
    torch.testing.assert_close(scoring.harmonic_aggregation(scores, masks), expected)


def test_harmonic_aggregation_with_a_zero_score_is_exactly_zero():
    scores = torch.tensor([[0.0, 0.4, 0.5, 1.0]], dtype=torch.float64)
    result = scoring.harmonic_aggregation(scores, scoring.window_masks((3, 3), 2))[0]
    assert not torch.isnan(result).any()
    assert result[0].item() == 0.0 and result[4].item() == 0.0  # covered by the zero window
    assert result[8].item() == pytest.approx(1.0, rel=1e-12)  # not covered by it; float64, a few ops


def test_harmonic_mean():
    values = torch.tensor([[1.0, 2.0], [4.0, 2.0]], dtype=torch.float64)
    # float64, two terms each: rel 1e-12 is ~4000 ulp
    assert scoring.harmonic_mean(values, dim=0).tolist() == pytest.approx([2 / (1 + 1 / 4), 2.0], rel=1e-12)


def test_class_scores_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # normal along x, anomalous along y
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    scores = scoring.class_scores(embeddings, text, temperature=0.07)
    # cos to (normal, anomalous): (1, 0), (0, 1), (1/sqrt2, 1/sqrt2)
    sigmoid = 1 / (1 + math.exp(-1 / 0.07))
    # float64; 1 - sigmoid (~6e-7) loses ~1e-16 / 6e-7 ~ 2e-10 relative to cancellation, hence rel 1e-9
    assert scores.tolist() == pytest.approx([1 - sigmoid, sigmoid, 0.5], rel=1e-9)


def test_reference_association_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    reference = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    result = scoring.reference_association(query, reference)
    # nearest (largest) cosines: 1, 1/sqrt2, -1/sqrt2 (to [1, 1]) -> (1 - cos) / 2
    # float64 cosines and square roots, a few ops: rel 1e-12 (values >= 0.15, the zero is exact)
    assert result[0].tolist() == pytest.approx(
        [0.0, (1 - 1 / math.sqrt(2)) / 2, (1 + 1 / math.sqrt(2)) / 2], rel=1e-12, abs=0
    )


def _brute_force_nearest_cosine(query: torch.Tensor, memory: torch.Tensor, num_nearest: int) -> torch.Tensor:
    """Every query-memory cosine at once, in float64."""
    normalize = torch.nn.functional.normalize
    similarities = normalize(query.double(), dim=-1) @ normalize(memory.double(), dim=-1).T
    return similarities.topk(num_nearest, dim=-1).values.mean(dim=-1)


@pytest.mark.parametrize("num_nearest", [1, 3])
def test_nearest_cosine_chunked_over_queries_and_memory_is_exact(num_nearest):
    """Chunks of 7 split the 100 query items and the 50 memory items alike; the running max / top-k over
    memory chunks finds the same neighbours as the whole similarity matrix."""
    torch.manual_seed(1)
    query, memory = torch.randn(2, 50, 16), torch.randn(50, 16)
    chunked = scoring.nearest_cosine(query, memory, chunk_size=7, num_nearest=num_nearest)
    whole = scoring.nearest_cosine(query, memory, num_nearest=num_nearest)  # one chunk each
    expected = _brute_force_nearest_cosine(query, memory, num_nearest)
    # float32 cosines of unit 16-d vectors: a few ulp of 1 (1.2e-7 each) from float64; chunks of 7 take
    # another matrix kernel than one block, so the two float32 results differ by reduction order only
    torch.testing.assert_close(chunked.double(), expected, rtol=0, atol=1e-6)
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="chunk_size"):
        scoring.nearest_cosine(query, memory, chunk_size=0)


def test_reference_association_rejects_empty_memory():
    with pytest.raises(ValueError, match="empty"):
        scoring.reference_association(torch.randn(1, 2, 3), torch.empty(0, 3))


def test_ensemble_text_embedding_variants():
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    normalised = scoring.ensemble_text_embedding(embeddings, normalize_each=True)
    # float64 norm and mean of two vectors: rel 1e-12 is ~4000 ulp
    assert normalised.tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)], rel=1e-12)
    raw = scoring.ensemble_text_embedding(embeddings, normalize_each=False)
    assert raw.tolist() == pytest.approx([1.5, 0.5], rel=1e-12)


def test_zero_shot_map_is_harmonic_mean_of_image_and_scales():
    masks = [scoring.window_masks((3, 3), 2), scoring.window_masks((3, 3), 3)]
    image_scores = torch.tensor([0.5], dtype=torch.float64)
    scale2 = torch.tensor([[0.2, 0.4, 0.5, 1.0]], dtype=torch.float64)
    scale3 = torch.tensor([[0.8]], dtype=torch.float64)
    result = scoring.winclip_zero_shot_map(image_scores, [scale2, scale3], masks)[0]
    # float64 harmonic means of <= 4 terms: rel 1e-12 is ~4000 ulp
    assert result[0].item() == pytest.approx(3 / (1 / 0.5 + 1 / 0.2 + 1 / 0.8), rel=1e-12)
    centre_scale2 = 4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 1.0)
    assert result[4].item() == pytest.approx(3 / (1 / 0.5 + 1 / centre_scale2 + 1 / 0.8), rel=1e-12)


def test_few_shot_map_averages_patch_and_window_levels():
    masks = [scoring.window_masks((2, 2), 2)]  # one window covering all four patches
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    reference_patches = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    windows = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    reference_windows = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    result = scoring.winclip_few_shot_map(patches, reference_patches, [windows], [reference_windows], masks)[
        0
    ]
    window_score = (1 - 1 / math.sqrt(2)) / 2
    # float64 cosines and means, a few ops: rel 1e-12 is ~4000 ulp
    assert result.tolist() == pytest.approx(
        [window_score / 2, (0.5 + window_score) / 2, window_score / 2, window_score / 2], rel=1e-12
    )


def test_fuse_zero_few_shot():
    zero_map = torch.tensor([[0.2, 0.4]])
    few_map = torch.tensor([[0.1, 0.3]])
    fused_map, image = scoring.fuse_zero_few_shot(zero_map, torch.tensor([0.6]), few_map)
    # float32 means vs Python float64: within 1 float32 ulp (6e-8 rel); approx's default rel 1e-6
    assert fused_map[0].tolist() == pytest.approx([0.15, 0.35])
    assert image.tolist() == pytest.approx([(0.6 + 0.3) / 2])


def test_upsample_maps_bilinear():
    maps = torch.tensor([[[0.0, 1.0]]])
    result = scoring.upsample_maps(maps, (1, 4))[0, 0]
    # half-pixel centres: 0, 0.25, 0.75, 1
    # float32 bilinear weights 0.25 / 0.75 are exact in binary; approx's default rel 1e-6 is ~16 ulp
    assert result.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


# --- anomalous memory ------------------------------------------------------------------------------------


def test_nearest_cosine_and_both_associations_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    memory = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    half = 2**-0.5
    # float32 cosines vs float64-rounded 2**-0.5: a few ulp, inside assert_close's float32 defaults
    torch.testing.assert_close(scoring.nearest_cosine(query, memory), torch.tensor([[half, half]]))
    torch.testing.assert_close(
        scoring.reference_association(query, memory), torch.tensor([[(1 - half) / 2] * 2])
    )
    torch.testing.assert_close(
        scoring.anomalous_association(query, memory), torch.tensor([[(1 + half) / 2] * 2])
    )


def test_patch_defect_shares_count_each_patchs_defect_pixels():
    masks = torch.zeros(1, 4, 6, dtype=torch.bool)
    masks[0, 1, 5] = True  # one pixel of patch (row 0, column 2) of a 2x3 grid of 2-pixel patches
    masks[0, 2:, :2] = True  # all of patch (1, 0)
    masks[0, 3, 2] = True  # one pixel of patch (1, 1)
    shares = scoring.patch_defect_shares(masks, 2)
    assert shares.dtype == torch.float64 and shares.tolist() == [[0, 0, 0.25, 1, 0.25, 0]]


def test_window_defect_shares_average_the_covered_patches():
    masks = scoring.window_masks((3, 3), 2)  # windows at (0,0), (0,1), (1,0), (1,1)
    patch_shares = torch.zeros(1, 9, dtype=torch.float64)
    patch_shares[0, 2] = 1.0  # patch (0, 2): only the window at (0, 1) covers it
    patch_shares[0, 4] = 0.5  # the centre patch is in every window
    expected = [[0.5 / 4, 1.5 / 4, 0.5 / 4, 0.5 / 4]]
    assert scoring.window_defect_shares(patch_shares, masks).tolist() == expected


def test_anomalous_items_need_the_fraction_or_hold_the_largest_share():
    shares = torch.tensor(
        [[0.0, 0.6, 0.5, 0.2], [0.1, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    # row 0: two items reach 0.5; row 1: none does, so the two largest (tied) do; row 2: no defect at all
    expected = [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    assert scoring.anomalous_items(shares, 0.5).tolist() == expected
    assert scoring.anomalous_items(shares, 0.05).tolist()[1] == [True, True, True, False]


def test_level_image_scores_take_each_maximum():
    maps = [torch.tensor([[0.1, 0.5], [0.3, 0.2]]), torch.tensor([[0.9, 0.0], [0.4, 0.6]])]
    # a maximum picks an element: exact
    torch.testing.assert_close(
        scoring.level_image_scores(maps), torch.tensor([[0.5, 0.9], [0.3, 0.6]]), rtol=0, atol=0
    )


def test_baseline_weights_average_three_groups():
    weights = scoring.baseline_score_weights(4)
    scores = torch.tensor([0.3, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    expected = (0.3 + (0.1 + 0.2 + 0.3 + 0.4) / 4 + (0.5 + 0.6 + 0.7 + 0.8) / 4) / 3
    assert float(scores @ weights) == pytest.approx(expected, abs=1e-15)  # float64 rounding of 9 terms


def test_baseline_weights_spread_each_group_over_its_available_levels():
    available = torch.tensor([True, True, True, True, False, True, True, True, True])
    expected = [1 / 3, 1 / 9, 1 / 9, 1 / 9, 0, 1 / 12, 1 / 12, 1 / 12, 1 / 12]
    # float64 defaults (rtol 1e-7): 1/9 computed as (1/3)/3 vs 1/9 differs by an ulp
    torch.testing.assert_close(
        scoring.baseline_score_weights(4, available), torch.tensor(expected, dtype=torch.float64)
    )
    no_reference = torch.tensor([True, False, False, True, True])  # a whole group gone: two groups share
    expected = [1 / 2, 0, 0, 1 / 4, 1 / 4]
    torch.testing.assert_close(
        scoring.baseline_score_weights(2, no_reference), torch.tensor(expected, dtype=torch.float64)
    )


def _raw_weight_draw(distribution: str, seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """The draw `sample_score_weights` makes, repeated from the same seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    normal = torch.randn(shape, generator=generator, dtype=torch.float64)
    if distribution == "normal":
        return normal
    chi2 = torch.randn((*shape, 3), generator=generator, dtype=torch.float64).pow(2).sum(-1)
    return normal / (chi2 / 3).sqrt()


@pytest.mark.parametrize("distribution", ["uniform", "normal", "student_t"])
def test_sampled_weights_are_the_seeded_draws_scaled_to_unit_l1_norm(distribution):
    def draw(seed, signed=True):
        return scoring.sample_score_weights(
            50, 9, distribution, torch.Generator().manual_seed(seed), signed=signed
        )

    raw = _raw_weight_draw(distribution, 0, (50, 9))
    # same operations on the same draw: bit-identical
    torch.testing.assert_close(draw(0), raw / raw.abs().sum(-1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(
        draw(0, signed=False), raw.abs() / raw.abs().sum(-1, keepdim=True), rtol=0, atol=0
    )
    assert not torch.equal(draw(1), draw(0))
    # the paper's signed draws: normal and Student-t weights take both signs, uniform ones never
    assert bool((draw(0) < 0).any()) == (distribution != "uniform")
    assert (draw(0, signed=False) >= 0).all()
    with pytest.raises(ValueError, match="Unknown weight distribution"):
        scoring.sample_score_weights(1, 9, "cauchy")


def test_unit_l1_weights_zero_the_unavailable_scores():
    weights = torch.tensor([[0.5, -0.25, 0.25]], dtype=torch.float64)
    available = torch.tensor([True, True, False])
    assert scoring.unit_l1_weights(weights, available).tolist() == [[2 / 3, -1 / 3, 0.0]]


def test_pairwise_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    scores = torch.tensor([[0.1, 0.4, 0.4, 0.8, 0.3, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    # ratios of pair counts in float64: both sides round the same fraction (1e-12 absolute)
    assert float(scoring.pairwise_auroc(scores, labels)[0]) == pytest.approx(
        roc_auc_score(labels, scores[0]), abs=1e-12
    )
    with pytest.raises(ValueError, match="both normal and anomalous"):
        scoring.pairwise_auroc(scores, torch.ones(6))


def test_weight_search_picks_the_perfect_score():
    """Score 0 separates the validation set perfectly, scores 1 and 2 are noise: the chosen vector must be
    dominated by score 0, and reach AUROC 1."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 6)
    noise = torch.rand(12, 2, generator=generator, dtype=torch.float64)
    scores = torch.cat([labels[:, None].double(), noise], dim=1)
    candidates = scoring.sample_score_weights(200, 3, "uniform", generator)
    weights, auroc = scoring.select_score_weights(scores, labels, candidates)
    assert auroc == 1.0
    assert int(torch.argmax(weights)) == 0
    assert auroc == float(scoring.pairwise_auroc(candidates @ scores.T, labels).max())


def test_l2_normalize_matches_f_normalize_and_is_twice_differentiable_at_zero():
    vectors = torch.tensor([[3.0, 4.0], [0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    # float64 defaults (rtol 1e-7): both divide by the same norm, clamped differently at zero
    torch.testing.assert_close(scoring.l2_normalize(vectors), torch.nn.functional.normalize(vectors, dim=-1))
    (gradient,) = torch.autograd.grad(scoring.l2_normalize(vectors).sum(), vectors, create_graph=True)
    (second,) = torch.autograd.grad(gradient.pow(2).sum(), vectors)
    assert torch.isfinite(second).all()
    (gradient,) = torch.autograd.grad(
        torch.nn.functional.normalize(vectors, dim=-1).sum(), vectors, create_graph=True
    )
    assert torch.isnan(
        torch.autograd.grad(gradient.pow(2).sum(), vectors)[0]
    ).any()  # why l2_normalize exists


def test_greedy_coreset_by_hand():
    """Unit vectors at angles 0, 10, 100, 110 and 50 degrees: from item 0 the farthest is 110, then the one
    farthest from {0, 110} is 50 (50 and 60 degrees away), then 100 or 10 (10 degrees) comes last."""
    angles = torch.tensor([0.0, 10.0, 100.0, 110.0, 50.0], dtype=torch.float64).deg2rad()
    items = torch.stack([angles.cos(), angles.sin()], dim=-1)
    assert scoring.greedy_coreset(items, 3).tolist() == [0, 3, 4]
    assert scoring.greedy_coreset(items, 9).tolist() == [0, 1, 2, 3, 4]


def test_greedy_coreset_covers_every_item_within_the_last_pick():
    """The k-center invariant: no item is farther from the coreset than the last item chosen was."""
    items = torch.randn(400, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    chosen = scoring.greedy_coreset(items, 40)
    points = torch.nn.functional.normalize(items, dim=-1)
    squared = torch.cdist(points, points[chosen]).pow(2)
    last = squared[chosen[-1], :-1].min()
    # The coreset picks on float32 squared distances |a|^2 - 2 a.b + |b|^2 of unit vectors (terms up to 2,
    # ulp 2.4e-7): a pick can be off by ~1e-6 of the float64 farthest; 1e-5 covers that.
    assert squared.min(dim=1).values.max() <= last + 1e-5
    assert len(set(chosen.tolist())) == 40


def test_greedy_coreset_projects_only_items_wider_than_projection_dim_with_a_seeded_projection():
    items = torch.randn(300, 16, generator=torch.Generator().manual_seed(0))
    exact = scoring.greedy_coreset(items, 20, projection_dim=16)
    assert torch.equal(scoring.greedy_coreset(items, 20, projection_dim=32, seed=5), exact)  # no projection
    projected = scoring.greedy_coreset(items, 20, projection_dim=8, seed=1)
    assert not torch.equal(projected, exact)
    assert torch.equal(projected, scoring.greedy_coreset(items, 20, projection_dim=8, seed=1))
    assert not torch.equal(projected, scoring.greedy_coreset(items, 20, projection_dim=8, seed=2))
    assert len(set(projected.tolist())) == 20 and projected[0] == 0
    with pytest.raises(ValueError, match="at least one"):
        scoring.greedy_coreset(items, 0)
