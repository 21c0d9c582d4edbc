"""Synthetic anomalies with exact masks: VTFusion's diversified anomaly synthesis (DAS), usable by any method.

Four types (Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection",
Sec. III-B) and their combination:
- misplaced: 1-3 patches cut from the image and pasted elsewhere in it (structure out of place, texture
  intact); optionally rotated by 180 degrees (`misplaced_rotation`, off by default: the paper cuts and pastes);
- blurry: Gaussian blur inside a random ellipse;
- crack: thin random-walk strokes filled with the image's own texture, shifted and darkened, kept on the
  foreground ("superimposed onto the foreground of the original normal images"; `estimate_foreground`);
- noise: uniform, Gaussian or one-sided (positive) noise inside a random rectangle.

Region half-sizes are drawn from `size_range` as fractions of the image side, by default 1-40 %: the paper
gives no sizes, and this range of the method's specification spans defects from a few pixels to most of the
image (`size_range=(0.02, 0.2)` gives this module's earlier, smaller regions).

Every function returns the new image and its mask, and the mask is exact by construction: it holds the
pixels whose value changed by more than `tolerance` (any channel, 0-255 scale), and every other pixel keeps
its original value. A draw that changes nothing visible (a blur on a flat region) is drawn again. Seeded:
the same `numpy.random.Generator` state gives the same anomaly.

```python
rng = np.random.default_rng(0)
image, mask = synthesize(normal_image, "crack", rng)       # PIL image, (H, W) bool
image, mask = synthesize(normal_image, "combined", rng)    # two to four types at once
```
"""

from __future__ import annotations

from functools import partial

import numpy as np
from PIL import Image, ImageDraw
from scipy.ndimage import binary_fill_holes, binary_opening, gaussian_filter

ANOMALY_TYPES: tuple[str, ...] = ("misplaced", "blurry", "crack", "noise")
SYNTHESIS_KINDS: tuple[str, ...] = (*ANOMALY_TYPES, "combined")
DEFAULT_TOLERANCE = 8
DEFAULT_SIZE_RANGE: tuple[float, float] = (0.01, 0.4)
_MAX_ATTEMPTS = 20


def _region_size(rng: np.random.Generator, side: int, size_range: tuple[float, float]) -> int:
    return max(2, int(rng.uniform(*size_range) * side))


def _misplaced(
    image: np.ndarray, rng: np.random.Generator, size_range: tuple[float, float], rotation: float = 0.0
) -> np.ndarray:
    height, width = image.shape[:2]
    out = image.copy()
    for _ in range(rng.integers(1, 4)):  # 1-3 patches
        half_h, half_w = _region_size(rng, height, size_range), _region_size(rng, width, size_range)
        patch_h, patch_w = min(2 * half_h, height - 1), min(2 * half_w, width - 1)
        source_y, source_x = rng.integers(0, height - patch_h), rng.integers(0, width - patch_w)
        target_y, target_x = rng.integers(0, height - patch_h), rng.integers(0, width - patch_w)
        patch = image[source_y : source_y + patch_h, source_x : source_x + patch_w]
        if rotation > 0 and rng.random() < rotation:
            patch = patch[::-1, ::-1]
        out[target_y : target_y + patch_h, target_x : target_x + patch_w] = patch
    return out


def _ellipse_mask(
    rng: np.random.Generator, shape: tuple[int, int], size_range: tuple[float, float]
) -> np.ndarray:
    height, width = shape
    canvas = Image.new("L", (width, height), 0)
    radius_y, radius_x = _region_size(rng, height, size_range), _region_size(rng, width, size_range)
    center_y, center_x = rng.integers(0, height), rng.integers(0, width)
    ImageDraw.Draw(canvas).ellipse(
        [center_x - radius_x, center_y - radius_y, center_x + radius_x, center_y + radius_y], fill=255
    )
    return np.asarray(canvas) > 0


def _blurry(image: np.ndarray, rng: np.random.Generator, size_range: tuple[float, float]) -> np.ndarray:
    region = _ellipse_mask(rng, image.shape[:2], size_range)
    sigma = rng.uniform(2.0, 6.0)
    blurred = np.stack([gaussian_filter(image[..., c], sigma) for c in range(image.shape[2])], axis=-1)
    return np.where(region[..., None], blurred, image)


def estimate_foreground(image, max_border_spread: float = 0.25, min_share: float = 0.01) -> np.ndarray:
    """(H, W) bool: the object, as the pixels whose colour differs from the background colour (the median of
    the image's outermost pixels) by more than twice the border's own spread (95th percentile of its
    differences) and a tenth of the image's extent (99th percentile of all differences); specks are opened
    away and holes filled.

    The whole image counts as foreground when the border's spread exceeds `max_border_spread` of the extent
    (the border is not one background colour: a texture, or an object filling the frame) or when less than
    `min_share` of the image stands out.
    """
    array = _as_array(image)
    border = np.concatenate([array[0], array[-1], array[1:-1, 0], array[1:-1, -1]])
    background = np.median(border, axis=0)
    distance = np.linalg.norm(array - background, axis=-1)
    border_spread = np.percentile(np.linalg.norm(border - background, axis=-1), 95)
    extent = np.percentile(distance, 99)
    everything = np.ones(distance.shape, dtype=bool)
    if border_spread > max_border_spread * extent:
        return everything
    foreground = distance > max(2 * border_spread, 0.1 * extent)
    foreground = binary_fill_holes(binary_opening(foreground, iterations=2))
    return foreground if foreground.mean() >= min_share else everything


def _crack(
    image: np.ndarray, rng: np.random.Generator, size_range: tuple[float, float], foreground: np.ndarray
) -> np.ndarray:
    height, width = image.shape[:2]
    canvas = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(canvas)
    starts = np.argwhere(foreground)
    for _ in range(rng.integers(1, 4)):  # 1-3 strokes, each a random walk with a drifting direction
        y, x = starts[rng.integers(0, len(starts))] + rng.uniform(0, 1, size=2)
        angle = rng.uniform(0, 2 * np.pi)
        length = _region_size(rng, max(height, width), size_range) * 2
        step = max(2.0, length / 12)
        points = [(x, y)]
        for _ in range(12):
            angle += rng.normal(0, 0.5)
            x, y = x + step * np.cos(angle), y + step * np.sin(angle)
            points.append((x, y))
        draw.line(points, fill=255, width=int(rng.integers(1, 5)))
    stroke = (np.asarray(canvas) > 0) & foreground
    shift = rng.integers(-height // 4, height // 4 + 1), rng.integers(-width // 4, width // 4 + 1)
    texture = np.roll(image, shift, axis=(0, 1)) * rng.uniform(0.3, 0.7)
    return np.where(stroke[..., None], texture, image)


def _noise(image: np.ndarray, rng: np.random.Generator, size_range: tuple[float, float]) -> np.ndarray:
    height, width = image.shape[:2]
    half_h, half_w = _region_size(rng, height, size_range), _region_size(rng, width, size_range)
    top, left = rng.integers(0, max(1, height - 2 * half_h)), rng.integers(0, max(1, width - 2 * half_w))
    region = np.zeros((height, width), dtype=bool)
    region[top : top + 2 * half_h, left : left + 2 * half_w] = True
    amplitude = rng.uniform(30, 90)
    shape = image.shape
    noise = {
        "uniform": lambda: rng.uniform(-amplitude, amplitude, shape),
        "gaussian": lambda: rng.normal(0, amplitude / 2, shape),
        "positive": lambda: rng.exponential(amplitude / 2, shape),
    }[("uniform", "gaussian", "positive")[rng.integers(0, 3)]]()
    return np.where(region[..., None], image + noise, image)


def _as_array(image) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    array = np.asarray(image, dtype=np.float64)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"Expected an RGB image (H, W, 3), got an array of shape {array.shape}.")
    return array


def synthesize(
    image,
    kind: str,
    rng: np.random.Generator,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
    tolerance: int = DEFAULT_TOLERANCE,
    misplaced_rotation: float = 0.0,
) -> tuple[Image.Image, np.ndarray]:
    """One synthetic anomaly of `kind` ("misplaced", "blurry", "crack", "noise" or "combined": two to four
    types at once) on an RGB image (PIL or (H, W, 3) array). Returns the anomalous image and its exact (H, W)
    bool mask. size_range: region half-sizes as fractions of the image side. misplaced_rotation: probability
    that a misplaced patch is pasted rotated by 180 degrees (0: plain cut-and-paste, as in the paper).
    """
    if kind not in SYNTHESIS_KINDS:
        raise ValueError(f"Unknown anomaly type {kind!r}; choose from {SYNTHESIS_KINDS}.")
    if not 0 <= misplaced_rotation <= 1:
        raise ValueError(f"misplaced_rotation is a probability, got {misplaced_rotation}.")
    original = _as_array(image)
    if min(original.shape[:2]) < 8:
        raise ValueError(
            f"The image is {original.shape[0]}x{original.shape[1]}; synthesis needs at least 8x8."
        )
    reference = np.clip(np.round(original), 0, 255)
    foreground = estimate_foreground(original) if kind in ("crack", "combined") else None
    synthesizers = {
        "misplaced": partial(_misplaced, rotation=misplaced_rotation),
        "blurry": _blurry,
        "crack": partial(_crack, foreground=foreground),
        "noise": _noise,
    }
    for _ in range(_MAX_ATTEMPTS):
        kinds = [kind]
        if kind == "combined":
            kinds = list(rng.choice(ANOMALY_TYPES, size=rng.integers(2, 5), replace=False))
        altered = original
        for name in kinds:
            altered = synthesizers[name](altered, rng, size_range)
        altered = np.clip(np.round(altered), 0, 255)
        mask = np.abs(altered - reference).max(axis=-1) > tolerance
        if mask.any():
            result = np.where(mask[..., None], altered, reference).astype(np.uint8)
            return Image.fromarray(result), mask
    raise ValueError(
        f"Could not synthesise a visible {kind} anomaly in {_MAX_ATTEMPTS} draws (is the image flat?)."
    )


def random_anomaly(
    image,
    rng: np.random.Generator,
    kinds: tuple[str, ...] = SYNTHESIS_KINDS,
    size_range: tuple[float, float] = DEFAULT_SIZE_RANGE,
    tolerance: int = DEFAULT_TOLERANCE,
    misplaced_rotation: float = 0.0,
) -> tuple[Image.Image, np.ndarray, str]:
    """A synthetic anomaly of a kind drawn uniformly from `kinds` (restrict it for single-type ablations);
    returns the image, its mask and the kind."""
    if not kinds:
        raise ValueError("Give at least one anomaly kind.")
    kind = str(kinds[rng.integers(0, len(kinds))])
    anomalous, mask = synthesize(image, kind, rng, size_range, tolerance, misplaced_rotation)
    return anomalous, mask, kind
