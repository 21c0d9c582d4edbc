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
    assert result[0].item() == pytest.approx(0.2)
    assert result[8].item() == pytest.approx(1.0)
    assert result[1].item() == pytest.approx(2 / (1 / 0.2 + 1 / 0.4))
    assert result[4].item() == pytest.approx(4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 1.0))


def test_harmonic_aggregation_matches_loop_over_positions():
    torch.manual_seed(0)
    scores = torch.rand(3, 169, dtype=torch.float64) + 0.01
    masks = scoring.window_masks((15, 15), 3)
    expected = torch.stack(
        [torch.stack([1 / (1 / s[masks[:, p]]).mean() for p in range(225)]) for s in scores]
    )
    torch.testing.assert_close(scoring.harmonic_aggregation(scores, masks), expected)


def test_harmonic_aggregation_with_a_zero_score_is_exactly_zero():
    scores = torch.tensor([[0.0, 0.4, 0.5, 1.0]], dtype=torch.float64)
    result = scoring.harmonic_aggregation(scores, scoring.window_masks((3, 3), 2))[0]
    assert not torch.isnan(result).any()
    assert result[0].item() == 0.0 and result[4].item() == 0.0  # covered by the zero window
    assert result[8].item() == pytest.approx(1.0)  # not covered by it


def test_harmonic_mean():
    values = torch.tensor([[1.0, 2.0], [4.0, 2.0]], dtype=torch.float64)
    assert scoring.harmonic_mean(values, dim=0).tolist() == pytest.approx([2 / (1 + 1 / 4), 2.0])


def test_class_scores_by_hand():
    text = torch.tensor([[1.0, 0.0], [0.0, 2.0]], dtype=torch.float64)  # normal along x, anomalous along y
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=torch.float64)
    scores = scoring.class_scores(embeddings, text, temperature=0.07)
    # cos to (normal, anomalous): (1, 0), (0, 1), (1/sqrt2, 1/sqrt2)
    sigmoid = 1 / (1 + math.exp(-1 / 0.07))
    assert scores.tolist() == pytest.approx([1 - sigmoid, sigmoid, 0.5])


def test_reference_association_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]], dtype=torch.float64)
    reference = torch.tensor([[2.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    result = scoring.reference_association(query, reference)
    # nearest (largest) cosines: 1, 1/sqrt2, -1/sqrt2 (to [1, 1]) -> (1 - cos) / 2
    assert result[0].tolist() == pytest.approx([0.0, (1 - 1 / math.sqrt(2)) / 2, (1 + 1 / math.sqrt(2)) / 2])


def test_reference_association_chunking_is_exact():
    torch.manual_seed(1)
    query, reference = torch.randn(2, 50, 8), torch.randn(30, 8)
    torch.testing.assert_close(
        scoring.reference_association(query, reference, chunk_size=7),
        scoring.reference_association(query, reference),
    )


def test_reference_association_rejects_empty_memory():
    with pytest.raises(ValueError, match="empty"):
        scoring.reference_association(torch.randn(1, 2, 3), torch.empty(0, 3))


def test_ensemble_text_embedding_variants():
    embeddings = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    normalised = scoring.ensemble_text_embedding(embeddings, normalize_each=True)
    assert normalised.tolist() == pytest.approx([1 / math.sqrt(2), 1 / math.sqrt(2)])
    raw = scoring.ensemble_text_embedding(embeddings, normalize_each=False)
    assert raw.tolist() == pytest.approx([1.5, 0.5])


def test_zero_shot_map_is_harmonic_mean_of_image_and_scales():
    masks = [scoring.window_masks((3, 3), 2), scoring.window_masks((3, 3), 3)]
    image_scores = torch.tensor([0.5], dtype=torch.float64)
    scale2 = torch.tensor([[0.2, 0.4, 0.5, 1.0]], dtype=torch.float64)
    scale3 = torch.tensor([[0.8]], dtype=torch.float64)
    result = scoring.winclip_zero_shot_map(image_scores, [scale2, scale3], masks)[0]
    assert result[0].item() == pytest.approx(3 / (1 / 0.5 + 1 / 0.2 + 1 / 0.8))
    centre_scale2 = 4 / (1 / 0.2 + 1 / 0.4 + 1 / 0.5 + 1 / 1.0)
    assert result[4].item() == pytest.approx(3 / (1 / 0.5 + 1 / centre_scale2 + 1 / 0.8))


def test_few_shot_map_averages_patch_and_window_levels():
    masks = [scoring.window_masks((2, 2), 2)]  # one window covering all four patches
    patches = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 0.0], [1.0, 0.0]]], dtype=torch.float64)
    reference_patches = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    windows = torch.tensor([[[0.0, 1.0]]], dtype=torch.float64)
    reference_windows = torch.tensor([[1.0, 1.0]], dtype=torch.float64)
    result = scoring.winclip_few_shot_map(patches, reference_patches, [windows], [reference_windows], masks)[0]
    window_score = (1 - 1 / math.sqrt(2)) / 2
    assert result.tolist() == pytest.approx([window_score / 2, (0.5 + window_score) / 2, window_score / 2, window_score / 2])


def test_fuse_zero_few_shot():
    zero_map = torch.tensor([[0.2, 0.4]])
    few_map = torch.tensor([[0.1, 0.3]])
    fused_map, image = scoring.fuse_zero_few_shot(zero_map, torch.tensor([0.6]), few_map)
    assert fused_map[0].tolist() == pytest.approx([0.15, 0.35])
    assert image.tolist() == pytest.approx([(0.6 + 0.3) / 2])


def test_upsample_maps_bilinear():
    maps = torch.tensor([[[0.0, 1.0]]])
    result = scoring.upsample_maps(maps, (1, 4))[0, 0]
    # half-pixel centres: 0, 0.25, 0.75, 1
    assert result.tolist() == pytest.approx([0.0, 0.25, 0.75, 1.0])
