"""Geometric augmentations (PIL only): rotation, flips, skew and random distortion; random crops.

`augment_views` turns one normal and one anomalous sample into a small validation set (anomalous-memory
weight validation, where image labels suffice); `random_crop` gives fitted methods (VTFusion) normal views
that are not their own prototypes.
"""

from __future__ import annotations

import numpy as np
from PIL import Image


def _perspective_coefficients(source: np.ndarray, target: np.ndarray) -> list[float]:
    """PIL PERSPECTIVE coefficients mapping output points `target` (4, 2) back to input points `source`."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(target, source):
        rows.append([x, y, 1, 0, 0, 0, -u * x, -u * y])
        rows.append([0, 0, 0, x, y, 1, -v * x, -v * y])
        rhs += [u, v]
    return np.linalg.solve(np.asarray(rows, float), np.asarray(rhs, float)).tolist()


def _transform(
    picture: Image.Image, flips: list, angle: float, shear: float, coefficients: list[float], fill: tuple
) -> Image.Image:
    for flip in flips:
        picture = picture.transpose(flip)
    resample = Image.Resampling.BICUBIC
    picture = picture.rotate(angle, resample=resample, fillcolor=fill)
    skew = (1, shear, -shear * picture.size[1] / 2, 0, 1, 0)
    picture = picture.transform(picture.size, Image.Transform.AFFINE, skew, resample=resample, fillcolor=fill)
    return picture.transform(
        picture.size, Image.Transform.PERSPECTIVE, coefficients, resample=resample, fillcolor=fill
    )


def augment_views(image: Image.Image, num_views: int = 5, seed: int = 0) -> list[Image.Image]:
    """`num_views` random views of `image`: each a flip (horizontal and/or vertical, or none), a rotation in
    [-30, 30] degrees, a skew (shear up to 0.2) and a random perspective distortion (corners moved up to 8 %
    of the side). Uncovered borders take the image's mean colour. Seeded."""
    rng = np.random.default_rng(seed)
    image = image.convert("RGB")
    width, height = image.size
    fill = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
    corners = np.array([[0, 0], [width, 0], [width, height], [0, height]], float)
    flip_methods = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)
    views = []
    for _ in range(num_views):
        flips = [method for method, flip in zip(flip_methods, rng.random(2) < 0.5) if flip]
        angle, shear = float(rng.uniform(-30, 30)), float(rng.uniform(-0.2, 0.2))
        moved = corners + rng.uniform(-0.08, 0.08, size=(4, 2)) * [width, height]
        views.append(_transform(image, flips, angle, shear, _perspective_coefficients(corners, moved), fill))
    return views


def random_crop(
    image: Image.Image, rng: np.random.Generator, scale_range: tuple[float, float]
) -> Image.Image:
    """A square-proportioned crop of `image` covering a random share in `scale_range` of each side, at a
    random position, resized back to the image's size (bicubic): a small shift and zoom, no filled borders."""
    low, high = scale_range
    if not 0 < low <= high <= 1:
        raise ValueError(f"scale_range must satisfy 0 < low <= high <= 1, got {scale_range}.")
    width, height = image.size
    scale = rng.uniform(low, high)
    crop_width, crop_height = max(1, round(width * scale)), max(1, round(height * scale))
    left, top = rng.integers(0, width - crop_width + 1), rng.integers(0, height - crop_height + 1)
    box = (int(left), int(top), int(left + crop_width), int(top + crop_height))
    return image.resize((width, height), Image.Resampling.BICUBIC, box=box)
