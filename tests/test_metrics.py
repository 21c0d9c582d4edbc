"""Metrics against scikit-learn, hand-computed values and an independent AUPRO; evaluate modules offline."""

from __future__ import annotations

import itertools

import evaluate
import numpy as np
import pytest
from scipy import ndimage
from sklearn.metrics import average_precision_score, roc_auc_score

from hf_fsad.metrics import (
    METRICS,
    image_auprc,
    image_auroc,
    image_f1_max,
    module_path,
    pixel_auprc,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
)


@pytest.fixture
def random_image_scores():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 200)
    return labels, labels * 0.5 + rng.normal(size=200)


def test_image_auroc_and_auprc_agree_with_sklearn(random_image_scores):
    labels, scores = random_image_scores
    # float64 count ratios / trapezoids on both sides, summation order differs: ~n * eps64 = 5e-14
    assert image_auroc(labels, scores) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert image_auprc(labels, scores) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_pixel_auroc_and_auprc_agree_with_sklearn():
    rng = np.random.default_rng(1)
    masks = rng.random((3, 8, 8)) > 0.8
    maps = masks + rng.normal(size=(3, 8, 8))
    # as above, 192 pixels
    assert pixel_auroc(masks, maps) == pytest.approx(roc_auc_score(masks.ravel(), maps.ravel()), abs=1e-12)
    assert pixel_auprc(masks, maps) == pytest.approx(
        average_precision_score(masks.ravel(), maps.ravel()), abs=1e-12
    )


def test_f1_max_by_hand():
    # Threshold 0.35 flags 0.35, 0.4 and 0.8: precision 2/3, recall 1, F1 0.8 (the best threshold).
    # float64 2 * P * R / (P + R) of small fractions: a few ulp; rel 1e-12
    assert image_f1_max([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == pytest.approx(0.8, rel=1e-12)
    masks = np.array([[[0, 0], [1, 1]]])
    assert pixel_f1_max(masks, np.array([[[0.1, 0.4], [0.35, 0.8]]])) == pytest.approx(0.8, rel=1e-12)


# Two regions (8-connected): A = {(0,0), (0,1)}, B = {(1,3)}; five normal pixels.
HAND_MASK = np.array([[[1, 1, 0, 0], [0, 0, 0, 1]]])
HAND_MAP = np.array([[[0.9, 0.5, 0.8, 0.1], [0.2, 0.3, 0.4, 0.7]]])


def test_aupro_by_hand():
    # Descending scores: 0.9 (A: PRO 1/4) | 0.8 (normal: FPR 1/5) | 0.7 (B: PRO 3/4) | 0.5 (A: PRO 1) | then
    # normals. Up to FPR 0.3: 0.25 * 0.2 + 1.0 * 0.1 = 0.15, normalised by 0.3 -> 0.5.
    # float64 trapezoids of a few exact-ish fractions: a few ulp
    assert pixel_aupro(HAND_MASK, HAND_MAP) == pytest.approx(0.5, abs=1e-12)
    # Up to FPR 1: 0.25 * 0.2 + 1.0 * 0.8 = 0.85.
    assert pixel_aupro(HAND_MASK, HAND_MAP, fpr_limit=1.0) == pytest.approx(0.85, abs=1e-12)


def straightforward_aupro(masks, maps, fpr_limit=0.3):
    """Threshold by threshold, region by region (the definition, slowly)."""
    regions = []
    for mask in masks:
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions.append([labelled == r for r in range(1, count + 1)])
    normal = masks == 0
    points = [(0.0, 0.0)]
    for threshold in np.unique(maps)[::-1]:
        positive = maps >= threshold
        fpr = (positive & normal).sum() / normal.sum()
        overlaps = [
            (positive[i] & region).sum() / region.sum() for i, rs in enumerate(regions) for region in rs
        ]
        points.append((fpr, float(np.mean(overlaps))))
    area = 0.0
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 >= fpr_limit:
            break
        if x1 > fpr_limit:
            y1 = y0 + (y1 - y0) * (fpr_limit - x0) / (x1 - x0)
            x1 = fpr_limit
        area += (x1 - x0) * (y0 + y1) / 2
    return area / fpr_limit


@pytest.mark.parametrize("seed", range(5))
def test_aupro_matches_the_straightforward_definition(seed):
    rng = np.random.default_rng(seed)
    masks = np.zeros((3, 12, 12), dtype=np.uint8)
    for index in range(3):
        for _ in range(2):
            top, left = rng.integers(0, 9, size=2)
            masks[index, top : top + rng.integers(1, 4), left : left + rng.integers(1, 4)] = 1
    maps = masks * rng.random() + rng.random((3, 12, 12))
    maps = np.round(maps, 2)  # ties, to exercise their handling
    for limit in (0.05, 0.3, 1.0):
        # float64 areas of <= 432 thresholds summed in another order: ~n * eps64 = 1e-13
        assert pixel_aupro(masks, maps, limit) == pytest.approx(
            straightforward_aupro(masks, maps, limit), abs=1e-12
        )


@pytest.mark.parametrize(
    ("function", "labels", "scores", "message"),
    [
        (image_auroc, [1, 1], [0.2, 0.3], "every image is anomalous"),
        (image_auprc, [0, 0], [0.2, 0.3], "every image is normal"),
        (image_f1_max, [0, 1], [0.2, float("nan")], "NaN"),
        (image_auroc, [0, 1, 1], [0.2, 0.3], "3 labels but 2 scores"),
        (pixel_aupro, np.zeros((2, 4, 4)), np.zeros((2, 4, 4)), "every pixel is normal"),
        (pixel_auroc, np.ones((1, 4, 4)), np.zeros((1, 4, 4)), "every pixel is anomalous"),
        (pixel_f1_max, np.zeros((1, 4, 4)), np.zeros((1, 5, 5)), "do not match"),
    ],
)
def test_degenerate_inputs_raise_clear_errors(function, labels, scores, message):
    with pytest.raises(ValueError, match=message):
        function(labels, scores)


@pytest.mark.parametrize("name", sorted(METRICS))
def test_evaluate_modules_load_offline_and_agree(name):
    rng = np.random.default_rng(2)
    if name.startswith("image"):
        references, predictions = rng.integers(0, 2, 30), rng.random(30)
    else:
        references = (rng.random((2, 6, 6)) > 0.7).astype(int)
        predictions = references + rng.random((2, 6, 6))
    module = evaluate.load(module_path(name))
    result = module.compute(references=references, predictions=predictions)
    # the module calls the same function on the same arrays (through a list round trip): a few ulp
    assert result == {name: pytest.approx(METRICS[name](references, predictions), abs=1e-12)}


def test_unknown_metric_module():
    with pytest.raises(ValueError, match="Unknown metric 'iou'"):
        module_path("iou")
