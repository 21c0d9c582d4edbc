"""`toy`: textured images with planted defects and exact masks, generated offline and seeded.

Normal images are periodic textures with a random phase and mild noise; anomalous ones carry one planted
defect whose mask marks exactly the changed pixels. Used by the tests and the offline demo.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from datasets import DatasetDict
from PIL import Image as PILImage
from PIL import ImageDraw

from .common import BenchmarkSpec, Record, Splits, build_dataset_dict, choose_categories

# category -> (spatial frequency in cycles per image, orientation in radians, base RGB, pattern RGB amplitude)
TOY_CATEGORIES: dict[str, tuple[float, float, tuple[int, int, int], tuple[int, int, int]]] = {
    "stripes": (12.0, 0.0, (120, 130, 140), (60, 60, 60)),
    "weave": (9.0, np.pi / 4, (150, 120, 90), (50, 40, 30)),
    "grid": (10.0, np.pi / 2, (90, 140, 110), (40, 60, 40)),
}
TOY_DEFECTS: tuple[str, ...] = ("scratch", "blob", "discoloration")


def _texture(rng: np.random.Generator, category: str, size: int) -> np.ndarray:
    frequency, angle, base, amplitude = TOY_CATEGORIES[category]
    y, x = np.mgrid[0:size, 0:size] / size
    phase_u, phase_v = rng.uniform(0, 2 * np.pi, size=2)
    u = x * np.cos(angle) + y * np.sin(angle)
    v = -x * np.sin(angle) + y * np.cos(angle)
    pattern = np.sin(2 * np.pi * frequency * u + phase_u)
    if category != "stripes":
        pattern = 0.5 * (pattern + np.sin(2 * np.pi * frequency * v + phase_v))
    image = np.asarray(base, float) + pattern[..., None] * np.asarray(amplitude, float)
    image += rng.normal(0, 4, size=image.shape)
    return np.clip(image, 0, 255)


def _defect_mask(rng: np.random.Generator, defect: str, size: int) -> np.ndarray:
    mask = PILImage.new("L", (size, size), 0)
    draw = ImageDraw.Draw(mask)
    margin = size // 6
    cx, cy = rng.integers(margin, size - margin, size=2)
    if defect == "scratch":
        length, angle = rng.uniform(size * 0.2, size * 0.4), rng.uniform(0, np.pi)
        dx, dy = np.cos(angle) * length / 2, np.sin(angle) * length / 2
        draw.line([(cx - dx, cy - dy), (cx + dx, cy + dy)], fill=255, width=int(rng.integers(5, 9)))
    else:
        rx, ry = rng.uniform(size * 0.05, size * 0.1, size=2)
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    return np.asarray(mask) > 0


def _plant_defect(rng: np.random.Generator, image: np.ndarray, defect: str) -> tuple[np.ndarray, np.ndarray]:
    mask = _defect_mask(rng, defect, image.shape[0])
    damaged = image.copy()
    if defect == "scratch":
        damaged[mask] = rng.choice([20.0, 235.0]) + rng.normal(0, 4, size=(mask.sum(), 3))
    elif defect == "blob":
        damaged[mask] = rng.uniform(0, 255, size=3) + rng.normal(0, 4, size=(mask.sum(), 3))
    elif defect == "discoloration":
        damaged[mask] = damaged[mask][:, ::-1] * 0.6 + 60
    else:
        raise ValueError(f"Unknown toy defect {defect!r}; choose from {TOY_DEFECTS}.")
    return np.clip(damaged, 0, 255), mask


def toy_records(
    category: str = "stripes",
    num_train: int = 8,
    num_test_good: int = 8,
    num_test_anomalous: int = 8,
    image_size: int = 240,
    defects: tuple[str, ...] = TOY_DEFECTS,
    seed: int = 0,
) -> dict[str, list[Record]]:
    """Split name -> records with PIL images and exact PIL masks (None for normal images)."""
    if category not in TOY_CATEGORIES:
        raise ValueError(f"Unknown toy category {category!r}; choose from {sorted(TOY_CATEGORIES)}.")
    unknown = set(defects) - set(TOY_DEFECTS)
    if unknown or not defects:
        raise ValueError(f"Toy defects must be a non-empty subset of {TOY_DEFECTS}, got {defects}.")
    rng = np.random.default_rng(seed)

    def example(split: str, index: int, defect: str | None) -> Record:
        image = _texture(rng, category, image_size)
        mask = None
        if defect is not None:
            image, defect_mask = _plant_defect(rng, image, defect)
            mask = PILImage.fromarray((defect_mask * 255).astype(np.uint8), mode="L")
        path = f"toy/{category}/{split}/{defect or 'good'}/{index:03d}.png"
        return Record(
            PILImage.fromarray(image.astype(np.uint8)),
            int(defect is not None),
            category,
            defect or "good",
            path,
            mask,
        )

    train = [example("train", i, None) for i in range(num_train)]
    test = [example("test", i, None) for i in range(num_test_good)]
    test += [example("test", i, defects[i % len(defects)]) for i in range(num_test_anomalous)]
    return {"train": train, "test": test}


def load_toy(category: str = "stripes", seed: int = 0, **kwargs) -> DatasetDict:
    """One toy category as a DatasetDict (train: normal only; test: normal + anomalous with masks).

    kwargs: num_train, num_test_good, num_test_anomalous, image_size, defects (see `toy_records`).
    `load_benchmark("toy", category=None)` gives all categories.
    """
    return build_dataset_dict(toy_records(category=category, seed=seed, **kwargs), "toy")


def build_toy(root: Path | None, category: str | None, seed: int, **options) -> Splits:
    """The generated toy textures; options: num_train, num_test_good, num_test_anomalous, image_size,
    defects (see `toy_records`)."""
    categories = choose_categories(list(TOY_CATEGORIES), category, "the toy generator", "generated")
    splits: Splits = {"train": [], "test": []}
    for name in categories:
        for split, records in toy_records(name, seed=seed, **options).items():
            splits[split] += records
    return splits


TOY_BENCHMARK = BenchmarkSpec(
    build_toy, "generated", tuple(TOY_CATEGORIES), class_name="textured surface", needs_folder=False
)
