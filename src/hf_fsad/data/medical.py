"""HeadCT, BrainMRI and Br35H: normal and abnormal medical scans in two folders, one category each, image
labels only.

Br35H ("Br35H :: Brain Tumor Detection 2020", Kaggle) is published as `no/` (no tumour) and `yes/` (tumour), the
layout AF-CLIP's README and dataset code (Faustinaqq/AF-CLIP, `dataset/br35h.py`) and AnomalyCLIP's json
generator (`generate_dataset_json/br35.py`) read; its `pred/` folder (unlabelled) is not used.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .common import BenchmarkSpec, Splits, choose_categories, folder_records, split_normals


def _normal_abnormal_layout(name: str, normal: str = "normal", abnormal: str = "abnormal") -> str:
    return f"ROOT/{normal}/*.png|jpg (normal scans) and ROOT/{abnormal}/*.png|jpg ({name} with findings)"


def build_normal_abnormal(
    root: Path,
    category: str | None,
    seed: int,
    name: str,
    train_fraction: float = 0.75,
    normal: str = "normal",
    abnormal: str = "abnormal",
) -> Splits:
    """One category, scans in the folders `normal` and `abnormal`; a seeded `train_fraction` of the normal
    scans is the reference pool, the rest test (`train_fraction=0`: every scan is a test image, the zero-shot
    protocol of AF-CLIP's Table 1)."""
    layout = _normal_abnormal_layout(name, normal, abnormal)
    choose_categories([name], category, root, layout)
    train, test = split_normals(
        folder_records(root, root / normal, name, "good", layout), train_fraction, seed
    )
    return {"train": train, "test": test + folder_records(root, root / abnormal, name, "abnormal", layout)}


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
BR35H_BENCHMARK = BenchmarkSpec(
    partial(build_normal_abnormal, name="br35h", normal="no", abnormal="yes"),
    _normal_abnormal_layout("br35h", "no", "yes"),
    ("br35h",),
    class_name="brain MRI scan",
)
