"""Defect regions: the connected parts of an anomaly mask, each with its bounding box, area and peak score,
as JSON-safe dicts for JSON lines, the pipeline, the Space and the exported runner (numpy only: it is shipped
beside the runner)."""

from __future__ import annotations

import numpy as np

# Pixels touching by an edge or a corner belong to one region (8-connectivity): a thin diagonal scratch stays
# one defect.
NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _connected_regions(mask: np.ndarray) -> list[np.ndarray]:
    """The 8-connected regions of a boolean (H, W) `mask`, each as an (N, 2) array of its (row, column)
    pixels, in the raster order of their first pixel (as `scipy.ndimage.label` numbers them); the work grows
    with the marked pixels, not the image."""
    marked = {(int(row), int(column)) for row, column in np.argwhere(mask)}
    regions = []
    for start in sorted(marked):
        if start not in marked:
            continue
        marked.discard(start)
        pixels, frontier = [start], [start]
        while frontier:
            row, column = frontier.pop()
            for dy, dx in NEIGHBOURS:
                neighbour = (row + dy, column + dx)
                if neighbour in marked:
                    marked.discard(neighbour)
                    pixels.append(neighbour)
                    frontier.append(neighbour)
        regions.append(np.array(pixels))
    return regions


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
    regions = []
    for pixels in _connected_regions(mask != 0):
        if len(pixels) < min_area:
            continue
        (top, left), (bottom, right) = pixels.min(axis=0), pixels.max(axis=0) + 1
        region = {"box": [int(left), int(top), int(right), int(bottom)], "area": len(pixels)}
        if anomaly_map is not None:
            peak = float(anomaly_map[pixels[:, 0], pixels[:, 1]].max())
            region["peak_score"] = peak if np.isfinite(peak) else None
        regions.append(region)
    if anomaly_map is not None:
        regions.sort(key=lambda region: -np.inf if region["peak_score"] is None else -region["peak_score"])
    return regions
