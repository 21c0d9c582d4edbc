"""HeadCT and BrainMRI: normal and abnormal medical scans, one category each, image labels only."""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .common import (
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    relative_path,
    require_images,
    split_normals,
)


def _normal_abnormal_layout(name: str) -> str:
    return f"ROOT/normal/*.png|jpg (normal scans) and ROOT/abnormal/*.png|jpg ({name} with findings)"


def build_normal_abnormal(
    root: Path, category: str | None, seed: int, name: str, train_fraction: float = 0.75
) -> Splits:
    """One category; a seeded `train_fraction` of the normal scans is the reference pool, the rest test."""
    layout = _normal_abnormal_layout(name)
    choose_categories([name], category, root, layout)
    normal = [
        Record(str(f), 0, name, "good", relative_path(f, root))
        for f in require_images(root / "normal", layout)
    ]
    abnormal = [
        Record(str(f), 1, name, "abnormal", relative_path(f, root))
        for f in require_images(root / "abnormal", layout)
    ]
    train, test = split_normals(normal, train_fraction, seed)
    return {"train": train, "test": test + abnormal}


HEADCT_BENCHMARK = BenchmarkSpec(
    partial(build_normal_abnormal, name="headct"),
    _normal_abnormal_layout("headct"),
    ("headct",),
    class_name="head CT scan",
)
BRAINMRI_BENCHMARK = BenchmarkSpec(
    partial(build_normal_abnormal, name="brainmri"),
    _normal_abnormal_layout("brainmri"),
    ("brainmri",),
    class_name="brain MRI scan",
)
