"""Heatmap overlays of anomaly maps on images."""

from __future__ import annotations

import numpy as np
from PIL import Image

from .deploy.run_exported import outline_region  # noqa: F401  (the exported runner draws the same outline)


def _jet_lookup() -> np.ndarray:
    """(256, 3) uint8: matplotlib's jet colour of each of its 256 entries, as `colormaps["jet"]` gives them."""
    from matplotlib import colormaps

    return (colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint8)


def heatmap_overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
    rows_per_strip: int = 256,
) -> Image.Image:
    """Blend a jet-coloured `anomaly_map` (resized bilinearly to the image) over `image`.

    value_range: the scores mapped to the ends of the colour scale; None uses the map's own min and max
    (good for one image; give a shared range to compare images). Non-finite values are drawn at the top of
    the scale, and the range is taken over the finite ones.

    The map is resized once in float32 and coloured `rows_per_strip` rows at a time through a 256-entry
    table (the quantisation matplotlib's colormap applies), so a large image costs its own size a few times
    over, never a float RGBA copy of every pixel.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {anomaly_map.shape}.")
    finite = np.isfinite(anomaly_map)
    if value_range is None:
        values = anomaly_map[finite]
        value_range = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    low, high = value_range
    # A non-finite value fails its part (`calibration.score_error`): drawn at the top of the scale.
    scaled = np.where(finite, np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0), 1.0)
    scaled = scaled.astype(np.float32)
    resized = np.asarray(Image.fromarray(scaled).resize(image.size, Image.Resampling.BILINEAR))
    lookup = _jet_lookup()
    overlay = np.array(image.convert("RGB"))
    for top in range(0, overlay.shape[0], rows_per_strip):
        rows = slice(top, top + rows_per_strip)
        colours = lookup[np.minimum((resized[rows] * 256).astype(np.int32), 255)]
        overlay[rows] = np.round(overlay[rows] * (1 - alpha) + colours * alpha).astype(np.uint8)
    return Image.fromarray(overlay)


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
