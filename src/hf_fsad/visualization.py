"""Heatmap overlays of anomaly maps on images."""

from __future__ import annotations

import numpy as np
from PIL import Image

# One drawing for hf_fsad and the exported runner, which ships it without hf_fsad (numpy and Pillow only).
from .deploy.run_exported import heatmap_overlay, outline_region  # noqa: F401


def resize_center_crop(
    image: Image.Image, size: int, resample: Image.Resampling = Image.Resampling.BICUBIC
) -> Image.Image:
    """The geometry of `image_processor(crop=True)`: resize the short side to `size` (the long side truncated
    to an integer, as transformers and torchvision do), then keep the centre `size` square (offset floored,
    as transformers does)."""
    width, height = image.size
    short, long = sorted((width, height))
    long = int(size * long / short)
    resized = image.resize((size, long) if width <= height else (long, size), resample)
    left, top = (resized.width - size) // 2, (resized.height - size) // 2
    return resized.crop((left, top, left + size, top + size))


def mask_array(mask: Image.Image | None, size: int, crop: bool = False) -> np.ndarray:
    """A benchmark mask (PIL or None for normal images) as a boolean (size, size) array: resized whole, or
    with crop=True resized and centre-cropped as `image_processor(crop=True)` does its image. Nearest
    neighbour, so a mask stays binary."""
    if mask is None:
        return np.zeros((size, size), dtype=bool)
    mask = mask.convert("L")
    if crop:
        mask = resize_center_crop(mask, size, Image.Resampling.NEAREST)
    else:
        mask = mask.resize((size, size), Image.Resampling.NEAREST)
    return np.asarray(mask) > 127


def save_heatmap_panels(
    path,
    images: list[Image.Image],
    masks: np.ndarray | None,
    maps: np.ndarray,
    titles: list[str],
    scores: list[float],
) -> None:
    """One row per image: image | true mask | heatmap overlay, all maps on one colour scale.
    masks None: the data has image labels only, and the middle panel says so."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    value_range = (float(np.min(maps)), float(np.max(maps)))
    figure, axes = plt.subplots(len(images), 3, figsize=(7.5, 2.5 * len(images)), squeeze=False)
    for index, (row, image, anomaly_map, title, score) in enumerate(zip(axes, images, maps, titles, scores)):
        image = image.convert("RGB").resize(anomaly_map.shape[::-1])
        mask = masks[index] if masks is not None else np.zeros(anomaly_map.shape, dtype=bool)
        panels = (image, mask, heatmap_overlay(image, anomaly_map, value_range))
        for axis, panel, caption in zip(row, panels, (title, "true mask", f"score {score:.4f}")):
            axis.imshow(panel, cmap="gray")
            axis.set_title(caption, fontsize=9)
            axis.axis("off")
        if masks is None:
            row[1].text(
                0.5,
                0.5,
                "no pixel labels\n(image labels only)",
                color="white",
                ha="center",
                va="center",
                transform=row[1].transAxes,
                fontsize=9,
            )
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
