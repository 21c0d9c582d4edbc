"""AITEX (the AITEX Fabric Image Database, AFID): fabric images cut into 256 px tiles, with pixel masks.

Two protocols on the one published folder. `aitex`: one category per fabric code. `afid`: InCTRL's (its
`datasets/preprocess/convert_AITEX.py`, mala-lab/InCTRL, whose README links AITEX to aitex.es/afid), which the
tables of One-to-Normal ("AFID", citing the AITEX paper) and MetaCAN ("AITEX", one row) follow: every fabric
in one category, the defect tiles of the defect images as anomalies, the tiles of those images without a defect
pixel left out, and the defect-free images' tiles split into reference pool and normal test tiles. (InCTRL
reads one `<name>_mask.png` per image and splits with scikit-learn's seed 42; here the union of an image's
masks and the seeded `split_normals`.)
"""

from __future__ import annotations

import re
from functools import partial
from pathlib import Path

import numpy as np

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    binary_mask,
    choose_categories,
    image_size,
    relative_path,
    require_dir,
    require_images,
    split_normals,
)

AITEX_TILE_WIDTH = 256

AITEX_LAYOUT = (
    "ROOT/Defect_images/NNNN_DDD_FF.png, ROOT/Mask_images/NNNN_DDD_FF_mask*.png, "
    "ROOT/NODefect_images/<any folder>/NNNN_000_FF.png (FF = fabric code; images 256 px high, width a "
    "multiple of 256)"
)
_AITEX_NAME = re.compile(r"^\d+_(\d+)_(\d+)$")


def _aitex_tiles(file: Path) -> tuple[list[tuple[int, int, int, int]], str]:
    match = _AITEX_NAME.match(file.stem)
    if match is None:
        raise BenchmarkLayoutError(f"{file.name} is not named NNNN_DDD_FF. Expected layout: {AITEX_LAYOUT}")
    width, height = image_size(file)
    if width % AITEX_TILE_WIDTH:
        raise BenchmarkLayoutError(
            f"{file} is {width} px wide, not a multiple of {AITEX_TILE_WIDTH} px tiles."
        )
    boxes = [(x, 0, x + AITEX_TILE_WIDTH, height) for x in range(0, width, AITEX_TILE_WIDTH)]
    return boxes, f"fabric{match.group(2)}"


def _aitex_mask(root: Path, file: Path) -> np.ndarray:
    """The union of an image's masks as a 0/255 uint8 array (some images have several)."""
    masks = sorted((root / "Mask_images").glob(f"{file.stem}_mask*.png"))
    if not masks:
        raise BenchmarkLayoutError(
            f"No mask for {file} in {root / 'Mask_images'}. Expected layout: {AITEX_LAYOUT}"
        )
    return np.max([np.asarray(binary_mask(mask)) for mask in masks], axis=0)


def build_aitex(
    root: Path, category: str | None, seed: int, train_fraction: float = 0.75, pooled: str | None = None
) -> Splits:
    """Images cut into 256 px wide tiles. A tile of a defect image is anomalous when its part of the mask
    (the union of the image's masks) has a defect pixel, else a normal test tile. Tiles of defect-free images
    are split seeded into train and test. pooled: the name of one category holding every fabric, whose defect
    images give their defect tiles only (InCTRL's protocol, the `afid` benchmark); None: a category per fabric."""
    normal_files = sorted(require_dir(root / "NODefect_images", AITEX_LAYOUT).rglob("*.png"))
    defect_files = require_images(root / "Defect_images", AITEX_LAYOUT)
    tiles = {file: _aitex_tiles(file) for file in normal_files + defect_files}
    if pooled:
        tiles = {file: (boxes, pooled) for file, (boxes, _) in tiles.items()}
    found = sorted({fabric for _, fabric in tiles.values()})
    chosen = set(choose_categories(found, category, root, AITEX_LAYOUT))
    splits: Splits = {"train": [], "test": []}
    normal: dict[str, list[Record]] = {fabric: [] for fabric in chosen}
    for file in normal_files + defect_files:
        boxes, fabric = tiles[file]
        if fabric not in chosen:
            continue
        mask = _aitex_mask(root, file) if file in defect_files else None
        for index, box in enumerate(boxes):
            tile_path = f"{relative_path(file, root)}#tile{index:02d}"
            if mask is not None and mask[:, box[0] : box[2]].any():
                defect = f"defect{_AITEX_NAME.match(file.stem).group(1)}"
                splits["test"].append(Record(str(file), 1, fabric, defect, tile_path, mask, box))
            elif mask is not None:
                if not pooled:  # InCTRL's protocol leaves these tiles out
                    splits["test"].append(Record(str(file), 0, fabric, "good", tile_path, None, box))
            else:
                normal[fabric].append(Record(str(file), 0, fabric, "good", tile_path, None, box))
    for fabric in sorted(chosen):
        train, test = split_normals(normal[fabric], train_fraction, seed)
        splits["train"] += train
        splits["test"] += test
    return splits


AITEX_BENCHMARK = BenchmarkSpec(build_aitex, AITEX_LAYOUT, class_name="fabric")
AFID_BENCHMARK = BenchmarkSpec(
    partial(build_aitex, pooled="afid"), AITEX_LAYOUT, ("afid",), class_name="fabric"
)
