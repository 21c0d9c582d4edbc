"""Defect regions: the connected parts of an anomaly mask, each with its bounding box, area and peak score,
as JSON-safe dicts for JSON lines, the pipeline and the Space."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

# Pixels touching by an edge or a corner belong to one region (8-connectivity): a thin diagonal scratch stays
# one defect.
CONNECTIVITY = np.ones((3, 3), dtype=bool)


def defect_regions(mask, anomaly_map=None, min_area: int = 1) -> list[dict]:
    """The connected regions of a boolean (H, W) `mask` (e.g. a calibrated output's `anomaly_masks[i]`), the
    highest peak first.

    Each region: `box` [left, top, right, bottom] in pixels (right and bottom exclusive, as `PIL.Image.crop`
    takes it), `area` (its pixel count) and, with the (H, W) `anomaly_map` it was thresholded from,
    `peak_score` (the map's largest value in the region; None where that is NaN or infinite, which JSON cannot
    hold). Regions smaller than `min_area` pixels are left out (1: none is).
    """
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"A defect mask is one (H, W) image, got shape {mask.shape}.")
    if min_area < 1:
        raise ValueError(f"min_area must be at least 1 pixel, got {min_area}.")
    if anomaly_map is not None:
        anomaly_map = np.asarray(anomaly_map, dtype=np.float64)
        if anomaly_map.shape != mask.shape:
            raise ValueError(f"The anomaly map has shape {anomaly_map.shape}, but the mask {mask.shape}.")
    labels, count = ndimage.label(mask != 0, structure=CONNECTIVITY)
    if count == 0:
        return []
    indices = np.arange(1, count + 1)
    areas = np.bincount(labels.ravel(), minlength=count + 1)[1:]
    peaks = None if anomaly_map is None else ndimage.maximum(anomaly_map, labels, indices)
    regions = []
    for index, (rows, columns) in enumerate(ndimage.find_objects(labels)):
        if areas[index] < min_area:
            continue
        region = {
            "box": [int(columns.start), int(rows.start), int(columns.stop), int(rows.stop)],
            "area": int(areas[index]),
        }
        if peaks is not None:
            peak = float(peaks[index])
            region["peak_score"] = peak if np.isfinite(peak) else None
        regions.append(region)
    if peaks is not None:
        regions.sort(key=lambda region: -np.inf if region["peak_score"] is None else -region["peak_score"])
    return regions
