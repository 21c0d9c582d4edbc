"""VisA: twelve object categories with pixel masks, read through its 1cls split file."""

from __future__ import annotations

import csv
from pathlib import Path

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    require_file,
)

VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
)  # fmt: skip

VISA_LAYOUT = (
    "ROOT/split_csv/1cls.csv (columns object,split,label,image,mask with paths relative to ROOT) and "
    "ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG, ROOT/<category>/Data/Masks/Anomaly/*.png"
)


def build_visa(root: Path, category: str | None, seed: int) -> Splits:
    split_file = require_file(root / "split_csv" / "1cls.csv", VISA_LAYOUT)
    with open(split_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing_columns = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing_columns:
        raise BenchmarkLayoutError(
            f"{split_file} lacks the columns {sorted(missing_columns)}. Expected layout: {VISA_LAYOUT}"
        )
    found = sorted({row["object"] for row in rows})
    chosen = set(choose_categories(found, category, root, VISA_LAYOUT))
    splits: Splits = {"train": [], "test": []}
    for row in rows:
        if row["object"] not in chosen:
            continue
        if row["split"] not in splits or row["label"] not in ("normal", "anomaly"):
            raise BenchmarkLayoutError(
                f"{split_file}: unexpected split {row['split']!r} or label {row['label']!r}."
            )
        anomalous = row["label"] == "anomaly"
        image = require_file(root / row["image"], VISA_LAYOUT)
        mask = str(require_file(root / row["mask"], VISA_LAYOUT)) if anomalous else None
        defect = "anomaly" if anomalous else "good"
        splits[row["split"]].append(
            Record(str(image), int(anomalous), row["object"], defect, row["image"], mask)
        )
    return splits


VISA_BENCHMARK = BenchmarkSpec(build_visa, VISA_LAYOUT, VISA_CATEGORIES)
