"""ELPV: electroluminescence images of solar cells (mono- and polycrystalline), image labels only."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    require_file,
    split_normals,
)

ELPV_LAYOUT = (
    "ROOT/labels.csv (lines 'images/cellNNNN.png <defect probability> <mono|poly>') and ROOT/images/*.png "
    "(the published ELPV repository; the `elpv-dataset` package ships it)"
)


def elpv_package_root() -> Path | None:
    """The data folder of the `elpv-dataset` package, when it is installed."""
    spec = importlib.util.find_spec("elpv_dataset")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent / "data"


def build_elpv(root: Path, category: str | None, seed: int, train_fraction: float = 0.75) -> Splits:
    """Normal = defect probability 0, anomalous = probability 1. Cells rated 0.33 or 0.67 (uncertain) are
    left out of both splits, as the papers do; no pixel masks exist."""
    labels = require_file(root / "labels.csv", ELPV_LAYOUT)
    entries = []
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        fields = line.split()
        if len(fields) != 3:
            raise BenchmarkLayoutError(
                f"{labels} line {number} is not '<image> <probability> <type>': {line!r}"
            )
        entries.append((fields[0], float(fields[1]), fields[2]))
    found = sorted({kind for _, _, kind in entries})
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(found, category, root, ELPV_LAYOUT):
        normal, anomalous = [], []
        for relative, probability, kind in entries:
            if kind != name or probability not in (0.0, 1.0):
                continue
            image = str(require_file(root / relative, ELPV_LAYOUT))
            if probability == 0.0:
                normal.append(Record(image, 0, name, "good", relative))
            else:
                anomalous.append(Record(image, 1, name, "defective", relative))
        train, test = split_normals(normal, train_fraction, seed)
        splits["train"] += train
        splits["test"] += test + anomalous
    return splits


ELPV_BENCHMARK = BenchmarkSpec(
    build_elpv, ELPV_LAYOUT, ("mono", "poly"), elpv_package_root, class_name="solar cell"
)
