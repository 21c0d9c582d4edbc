"""Detection metrics on numpy arrays."""

from __future__ import annotations

import numpy as np
from sklearn.metrics import roc_auc_score


def _check_both_classes(labels: np.ndarray, what: str) -> None:
    present = np.unique(labels)
    if present.size < 2:
        raise ValueError(
            f"{what} AUROC needs both normal and anomalous samples, but every {what.lower()} label is "
            f"{int(present[0]) if present.size else 'missing'}."
        )


def image_auroc(labels, scores) -> float:
    """Area under the ROC curve of image scores (labels: 1 = anomalous)."""
    labels, scores = np.asarray(labels).astype(int).ravel(), np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels but {scores.size} scores.")
    _check_both_classes(labels, "Image")
    return float(roc_auc_score(labels, scores))


def pixel_auroc(masks, maps) -> float:
    """Area under the ROC curve over all pixels of all images (masks: nonzero = anomalous pixel)."""
    masks, maps = np.asarray(masks), np.asarray(maps, dtype=np.float64)
    if masks.shape != maps.shape:
        raise ValueError(f"Masks of shape {masks.shape} do not match anomaly maps of shape {maps.shape}.")
    labels = (masks.ravel() > 0).astype(int)
    _check_both_classes(labels, "Pixel")
    return float(roc_auc_score(labels, maps.ravel()))
