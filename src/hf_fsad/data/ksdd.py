"""KolektorSDD: electrical commutator surfaces, each image cut into three parts, with pixel masks."""

from __future__ import annotations

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
    require_file,
    require_images,
    split_normals,
)

KSDD_LAYOUT = (
    "ROOT/kosNN/PartN.jpg with its mask ROOT/kosNN/PartN_label.bmp (the published KolektorSDD folders)"
)


def build_ksdd(root: Path, category: str | None, seed: int, train_fraction: float = 0.75) -> Splits:
    """Each image cut into three parts along its height; a part is anomalous when its mask has a defect
    pixel. A seeded `train_fraction` of the normal parts is the reference pool."""
    choose_categories(["ksdd"], category, root, KSDD_LAYOUT)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("kos"))
    if not folders:
        raise BenchmarkLayoutError(f"No kosNN folders in {root}. Expected layout: {KSDD_LAYOUT}")
    normal, anomalous = [], []
    for folder in folders:
        for file in sorted(p for p in require_images(folder, KSDD_LAYOUT) if not p.stem.endswith("_label")):
            mask_file = require_file(folder / f"{file.stem}_label.bmp", KSDD_LAYOUT)
            mask = np.asarray(binary_mask(mask_file)) > 0
            width, height = image_size(file)
            bounds = [round(i * height / 3) for i in range(4)]
            for third in range(3):
                box = (0, bounds[third], width, bounds[third + 1])
                path = f"{relative_path(file, root)}#third{third}"
                if mask[box[1] : box[3]].any():
                    anomalous.append(Record(str(file), 1, "ksdd", "crack", path, str(mask_file), box))
                else:
                    normal.append(Record(str(file), 0, "ksdd", "good", path, None, box))
    train, test = split_normals(normal, train_fraction, seed)
    return {"train": train, "test": test + anomalous}


KSDD_BENCHMARK = BenchmarkSpec(build_ksdd, KSDD_LAYOUT, ("ksdd",), class_name="metal surface")
