"""The shared scoring functions (`hf_fsad.scoring`) on small tensors against hand-computed or float64 values;
each method's own equations are tested in its test file."""

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


def test_windows_of_one_patch_fit_and_a_window_wider_than_the_short_side_does_not():
    """Scale 1 is every patch on its own; on a 2x4 grid a 3x3 window fits the long side only."""
    assert scoring.window_token_indices((2, 4), 1).tolist() == [[p] for p in range(8)]
    assert scoring.window_masks((2, 4), 2).shape == (3, 8)  # 3 windows over 2 x 4 = 8 patches
    with pytest.raises(ValueError, match="does not fit"):
        scoring.window_token_indices((2, 4), 3)


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


def test_harmonic_aggregation_refuses_a_patch_no_window_covers():
    masks = scoring.window_masks((3, 3), 2)[:1]  # one 2x2 window: five patches uncovered
    with pytest.raises(ValueError, match="covered by no window"):
        scoring.harmonic_aggregation(torch.ones(1, 1), masks)


def test_class_scores_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # normal along x, anomalous along y
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    scores = scoring.class_scores(embeddings, text, temperature=0.07)
    # cos to (normal, anomalous): (1, 0), (0, 1), (1/sqrt2, 1/sqrt2)
    sigmoid = 1 / (1 + math.exp(-1 / 0.07))
    # float64; 1 - sigmoid (~6e-7) loses ~1e-16 / 6e-7 ~ 2e-10 relative to cancellation, hence rel 1e-9
    assert scores.tolist() == pytest.approx([1 - sigmoid, sigmoid, 0.5], rel=1e-9)


def test_class_scores_default_to_clips_temperature_and_keep_leading_dimensions():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)
    embeddings = torch.tensor([[[3.0, 0.0], [1.0, 1.0]], [[0.0, 1.0], [2.0, 0.0]]], dtype=torch.float64)
    sigmoid = 1 / (1 + math.exp(-1 / 0.07))
    # (2, 2, D) in, (2, 2) out: the softmax runs over the two prompts, not a batch axis; rel as above
    assert scoring.class_scores(embeddings, text).tolist() == [
        pytest.approx([1 - sigmoid, 0.5], rel=1e-9),
        pytest.approx([sigmoid, 1 - sigmoid], rel=1e-9),
    ]


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


def test_nearest_cosine_takes_between_one_and_every_memory_item():
    query = torch.tensor([[[1.0, 0.0]]], dtype=torch.float64)
    memory = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]], dtype=torch.float64)  # cosines 1, 0, -1
    # float64 cosines of axis vectors are exact
    assert scoring.nearest_cosine(query, memory, num_nearest=2).item() == 0.5  # mean of the top 2
    assert scoring.nearest_cosine(query, memory, num_nearest=3).item() == 0.0  # all three (M = 3 > D = 2)
    assert scoring.nearest_cosine(query, memory, chunk_size=1).item() == 1.0
    for num_nearest in (0, 4):
        with pytest.raises(ValueError, match="nearest of 3"):
            scoring.nearest_cosine(query, memory, num_nearest=num_nearest)


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


def test_ensemble_text_embedding_averages_over_the_prompts():
    embeddings = torch.tensor([[3.0, 4.0], [0.0, 2.0], [6.0, 0.0]], dtype=torch.float64)
    # unit prompts (0.6, 0.8), (0, 1), (1, 0): mean (1.6, 1.8) / 3, re-normalised; float64, rel 1e-12
    norm = math.hypot(1.6, 1.8)
    assert scoring.ensemble_text_embedding(embeddings).tolist() == pytest.approx(
        [1.6 / norm, 1.8 / norm], rel=1e-12
    )
    assert scoring.ensemble_text_embedding(embeddings, normalize_each=False).tolist() == pytest.approx(
        [3.0, 2.0], rel=1e-12
    )


def test_upsample_maps_bilinear():
    maps = torch.tensor([[[0.0, 1.0]]])
    result = scoring.upsample_maps(maps, (1, 4))[0, 0]
    # half-pixel centres: 0, 0.25, 0.75, 1
    # float32 bilinear weights 0.25 / 0.75 are exact in binary; approx's default rel 1e-6 is ~16 ulp
    assert result.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])


def test_upsample_maps_resizes_both_axes_of_each_map():
    maps = torch.tensor([[[0.0, 1.0], [2.0, 3.0]]])  # value = 2 * row + column
    result = scoring.upsample_maps(maps, (4, 4))[0]
    # half-pixel centres: rows and columns at 0, 0.25, 0.75, 1 of the way; bilinear is exact on this plane
    # (weights 0.25 / 0.75, sums of two terms, exact in float32)
    axis = torch.tensor([0.0, 0.25, 0.75, 1.0])
    torch.testing.assert_close(result, 2 * axis[:, None] + axis[None, :], rtol=0, atol=0)


# --- anomalous memory ------------------------------------------------------------------------------------


def test_level_image_scores_take_each_maximum():
    maps = [torch.tensor([[0.1, 0.5], [0.3, 0.2]]), torch.tensor([[0.9, 0.0], [0.4, 0.6]])]
    # a maximum picks an element: exact
    torch.testing.assert_close(
        scoring.level_image_scores(maps), torch.tensor([[0.5, 0.9], [0.3, 0.6]]), rtol=0, atol=0
    )


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


def test_l2_normalize_scales_short_vectors_up_along_the_last_dimension():
    vectors = torch.tensor([[[0.3, 0.4], [0.0, 0.1]]], dtype=torch.float64)  # (1, 2, 2), norms 0.5 and 0.1
    # float64, one square root and a product: rel 1e-12
    assert scoring.l2_normalize(vectors)[0].tolist() == [
        pytest.approx([0.6, 0.8], rel=1e-12),
        pytest.approx([0.0, 1.0], rel=1e-12),
    ]


def test_greedy_coreset_by_hand():
    """Unit vectors at angles 0, 10, 100, 110 and 50 degrees: from item 0 the farthest is 110, then the one
    farthest from {0, 110} is 50 (50 and 60 degrees away), then 100 or 10 (10 degrees) comes last."""
    angles = torch.tensor([0.0, 10.0, 100.0, 110.0, 50.0], dtype=torch.float64).deg2rad()
    items = torch.stack([angles.cos(), angles.sin()], dim=-1)
    assert scoring.greedy_coreset(items, 3).tolist() == [0, 3, 4]
    assert scoring.greedy_coreset(items, 9).tolist() == [0, 1, 2, 3, 4]


def test_greedy_coreset_of_one_item_or_of_all_items():
    angles = torch.tensor([0.0, 10.0, 100.0, 110.0, 50.0], dtype=torch.float64).deg2rad()
    items = torch.stack([angles.cos(), angles.sin()], dim=-1)
    assert scoring.greedy_coreset(items, 1).tolist() == [0]
    assert scoring.greedy_coreset(items, 5).tolist() == [0, 1, 2, 3, 4]  # every item, in order


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


def test_greedy_coreset_of_wide_items_is_the_k_center_coreset_of_their_projections():
    """Past `projection_dim` the picks are exact greedy k-center picks on the projected unit vectors (whose
    lengths now differ), against float64 squared distances here."""
    items = torch.randn(200, 32, generator=torch.Generator().manual_seed(0))
    projection = torch.randn(32, 8, generator=torch.Generator().manual_seed(3))  # the seeded projection
    points = (torch.nn.functional.normalize(items, dim=-1) @ projection).double()
    squared = torch.cdist(points, points).pow(2)
    expected, distances = [0], squared[0].clone()
    for _ in range(19):
        top2 = distances.topk(2).values
        # float32 picks match float64 ones while no runner-up is within float32 rounding (~1e-6 of these
        # distances, which are ~1 to 30): every gap here is above 1e-4
        assert top2[0] - top2[1] > 1e-4
        expected.append(int(distances.argmax()))
        distances = torch.minimum(distances, squared[expected[-1]])
    assert scoring.greedy_coreset(items, 20, projection_dim=8, seed=3).tolist() == expected


def test_greedy_coreset_projects_past_64_dimensions_with_seed_0_by_default():
    """The defaults are fixed (64 dimensions, seed 0), so a bank thinned twice keeps the same items."""
    items = torch.randn(200, 65, generator=torch.Generator().manual_seed(0))
    default = scoring.greedy_coreset(items, 20)
    assert torch.equal(default, scoring.greedy_coreset(items, 20, projection_dim=64, seed=0))
    assert not torch.equal(default, scoring.greedy_coreset(items, 20, projection_dim=65))  # unprojected
    assert not torch.equal(default, scoring.greedy_coreset(items, 20, seed=1))
