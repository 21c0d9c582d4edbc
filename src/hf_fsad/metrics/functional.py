"""Detection and localisation metrics on numpy arrays (labels/masks: non-zero = anomalous).

Every metric needs both classes; with one class only it raises a ValueError saying so, never a NaN.
Pixel metrics pool all pixels of all images, as the papers do.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score


def _check_both_classes(labels: np.ndarray, what: str) -> None:
    present = np.unique(labels)
    if present.size < 2:
        state = "anomalous" if present.size and present[0] else "normal"
        raise ValueError(
            f"{what} metrics need both normal and anomalous samples, but every {what.lower()} is {state}"
            + (" (no samples at all)." if not present.size else ".")
        )


def _image_inputs(labels, scores) -> tuple[np.ndarray, np.ndarray]:
    labels = (np.asarray(labels).ravel() != 0).astype(int)
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores.")
    if not np.isfinite(scores).all():
        raise ValueError("Scores contain NaN or infinite values.")
    _check_both_classes(labels, "Image")
    return labels, scores


def _pixel_inputs(masks, maps) -> tuple[np.ndarray, np.ndarray]:
    masks, maps = np.asarray(masks) != 0, np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"Masks of shape {masks.shape} do not match anomaly maps of shape {maps.shape}.")
    if not np.isfinite(maps).all():
        raise ValueError("Anomaly maps contain NaN or infinite values.")
    _check_both_classes(masks.ravel(), "Pixel")
    return masks, maps


def f1_max(labels: np.ndarray, scores: np.ndarray) -> float:
    """Best F1 over all thresholds (0 where precision and recall are both 0)."""
    precision, recall, _ = precision_recall_curve(labels, scores)
    denominator = precision + recall
    f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(denominator), where=denominator > 0)
    return float(f1.max())


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    return float(roc_auc_score(*_image_inputs(labels, scores)))


def image_auprc(labels, scores) -> float:
    """Area under the precision-recall curve (average precision) of image scores."""
    return float(average_precision_score(*_image_inputs(labels, scores)))


def image_f1_max(labels, scores) -> float:
    """Best F1 of image scores over all thresholds."""
    return f1_max(*_image_inputs(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """ROC AUC over all pixels of all images (masks and maps of one shape, e.g. (N, H, W))."""
    masks, maps = _pixel_inputs(masks, maps)
    return float(roc_auc_score(masks.ravel(), maps.ravel()))


def pixel_auprc(masks, maps) -> float:
    """Average precision over all pixels of all images."""
    masks, maps = _pixel_inputs(masks, maps)
    return float(average_precision_score(masks.ravel(), maps.ravel()))


def pixel_f1_max(masks, maps) -> float:
    """Best F1 over all pixels of all images and all thresholds."""
    masks, maps = _pixel_inputs(masks, maps)
    return f1_max(masks.ravel(), maps.ravel())


def pixel_aupro(masks, maps, fpr_limit: float = 0.3) -> float:
    """Area under the per-region-overlap curve up to `fpr_limit` false-positive rate, divided by `fpr_limit`.

    Regions are the 8-connected components of each mask. At a threshold t (positive: score >= t), PRO is the
    mean over all regions of the fraction of the region's pixels that are positive, and FPR the fraction of
    normal pixels that are positive. The curve runs over every distinct score from (0, 0), exactly (no
    threshold grid), and is cut at `fpr_limit` by linear interpolation, as in the MVTec AD evaluation.
    """
    if not 0 < fpr_limit <= 1:
        raise ValueError(f"fpr_limit must be in (0, 1], got {fpr_limit}.")
    masks, maps = _pixel_inputs(masks, maps)
    masks, maps = masks.reshape(-1, *masks.shape[-2:]), maps.reshape(-1, *maps.shape[-2:])
    regions = np.zeros(masks.shape, dtype=np.int64)
    num_regions = 0
    for index, mask in enumerate(masks):
        labelled, count = ndimage.label(mask, structure=np.ones((3, 3)))
        regions[index] = np.where(labelled > 0, labelled + num_regions, 0)
        num_regions += count
    region_sizes = np.bincount(regions.ravel())
    normal = ~masks
    fpr_step = normal.ravel() / normal.sum()
    pro_step = np.where(masks, 1.0 / (num_regions * region_sizes[regions]), 0.0).ravel()

    order = np.argsort(-maps.ravel(), kind="stable")
    scores = maps.ravel()[order]
    last_of_ties = np.append(scores[1:] != scores[:-1], True)
    fpr = np.concatenate([[0.0], np.cumsum(fpr_step[order])[last_of_ties]])
    pro = np.concatenate([[0.0], np.cumsum(pro_step[order])[last_of_ties]])

    inside = np.searchsorted(fpr, fpr_limit, side="right")
    if inside < fpr.size:
        start, end = inside - 1, inside
        weight = (fpr_limit - fpr[start]) / (fpr[end] - fpr[start])
        fpr = np.append(fpr[:inside], fpr_limit)
        pro = np.append(pro[:inside], pro[start] + weight * (pro[end] - pro[start]))
    return float(np.trapezoid(pro, fpr) / fpr_limit)


IMAGE_METRICS = {"image_auroc": image_auroc, "image_auprc": image_auprc, "image_f1_max": image_f1_max}
PIXEL_METRICS = {
    "pixel_auroc": pixel_auroc,
    "pixel_auprc": pixel_auprc,
    "pixel_f1_max": pixel_f1_max,
    "pixel_aupro": pixel_aupro,
}
