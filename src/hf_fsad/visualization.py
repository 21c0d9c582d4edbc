"""Heatmap overlays of anomaly maps on images."""

from __future__ import annotations

import numpy as np
from PIL import Image


def heatmap_overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
) -> Image.Image:
    """Blend a jet-coloured `anomaly_map` (resized bilinearly to the image) over `image`.

    value_range: the scores mapped to the ends of the colour scale; None uses the map's own min and max
    (good for one image; give a shared range to compare images).
    """
    from matplotlib import colormaps

    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {anomaly_map.shape}.")
    low, high = value_range if value_range is not None else (float(anomaly_map.min()), float(anomaly_map.max()))
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    resized = Image.fromarray(scaled).resize(image.size, Image.Resampling.BILINEAR)
    colours = colormaps["jet"](np.asarray(resized))[..., :3]
    heat = Image.fromarray((colours * 255).astype(np.uint8))
    return Image.blend(image.convert("RGB"), heat, alpha)
