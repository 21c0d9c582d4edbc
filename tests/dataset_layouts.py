"""Generated datasets in their published folder layouts, for end-to-end runs (`hf-fsad reproduce --smoke`):
`LAYOUT_WRITERS[name](root, categories)` writes dataset `name` (its `load_benchmark` name) under `root`
(the folder `load_benchmark(name, root)` reads). Images are small seeded noise; anomalous ones carry a box
mask."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 32
NUM_TRAIN, NUM_TEST_GOOD, NUM_TEST_ANOMALOUS = 4, 2, 3


def noise_image(path: Path, seed: int) -> None:
    """A seeded RGB noise image; anomalous ones get a bright box (so a masked region differs)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)).save(path)


def box_mask(path: Path, value: int = 255) -> None:
    """A mask with a box of `value` (255 as MVTec AD's, 1 as VisA's) in the top-left quarter."""
    path.parent.mkdir(parents=True, exist_ok=True)
    mask = np.zeros((SIZE, SIZE), np.uint8)
    mask[4 : SIZE // 2, 4 : SIZE // 2] = value
    Image.fromarray(mask).save(path)


def write_mvtec_ad(root: Path, categories: Sequence[str] = ("bottle",)) -> None:
    """CATEGORY/train/good, CATEGORY/test/{good,broken}, CATEGORY/ground_truth/broken/NNN_mask.png."""
    for offset, category in enumerate(categories):
        seed = 1000 * offset
        base = root / category
        for index in range(NUM_TRAIN):
            noise_image(base / "train" / "good" / f"{index:03d}.png", seed + index)
        for index in range(NUM_TEST_GOOD):
            noise_image(base / "test" / "good" / f"{index:03d}.png", seed + 100 + index)
        for index in range(NUM_TEST_ANOMALOUS):
            noise_image(base / "test" / "broken" / f"{index:03d}.png", seed + 200 + index)
            box_mask(base / "ground_truth" / "broken" / f"{index:03d}_mask.png")


def write_visa(root: Path, categories: Sequence[str] = ("candle",)) -> None:
    """CATEGORY/Data/Images/{Normal,Anomaly}, CATEGORY/Data/Masks/Anomaly (0/1 masks) and split_csv/1cls.csv."""
    rows = ["object,split,label,image,mask"]
    for offset, category in enumerate(categories):
        seed = 5000 + 1000 * offset
        for index in range(NUM_TRAIN + NUM_TEST_GOOD):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            noise_image(root / image, seed + index)
            rows.append(f"{category},{'train' if index < NUM_TRAIN else 'test'},normal,{image},")
        for index in range(NUM_TEST_ANOMALOUS):
            image, mask = (
                f"{category}/Data/Images/Anomaly/{index:03d}.JPG",
                f"{category}/Data/Masks/Anomaly/{index:03d}.png",
            )
            noise_image(root / image, seed + 200 + index)
            box_mask(root / mask, value=1)
            rows.append(f"{category},test,anomaly,{image},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


LAYOUT_WRITERS: dict[str, Callable[[Path, Sequence[str]], None]] = {
    "mvtec_ad": write_mvtec_ad,
    "visa": write_visa,
}
