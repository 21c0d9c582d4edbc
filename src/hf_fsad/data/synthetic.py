"""Auxiliary training data from normal images alone: synthetic anomalies (DAS) with exact masks.

Methods trained on an auxiliary dataset with anomalies (MetaCAN, AF-CLIP) can then use a normal-only split
(any benchmark's train split, a folder of good parts): `data.synthetic_anomalies: N` in a training config.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from datasets import Dataset, concatenate_datasets

from ..io import to_upright_rgb
from ..synthesis import SYNTHESIS_KINDS, random_anomaly
from .common import Record, build_dataset


def with_synthetic_anomalies(
    dataset: Dataset, per_image: int = 1, kinds: Sequence[str] = SYNTHESIS_KINDS, seed: int = 0
) -> Dataset:
    """`dataset` followed by `per_image` synthetic anomalies of each of its normal images: label 1, the
    exact mask, the source's category, defect type "synthetic-<kind>" and path "<source path>#synthetic-<i>".
    Draws are seeded by (seed, row, i), so the result does not depend on the order of processing."""
    if per_image < 1:
        raise ValueError(f"per_image must be >= 1, got {per_image}.")
    records = []
    for row, example in enumerate(dataset):
        if example["label"] != 0:
            continue
        source = to_upright_rgb(example["image"])
        for index in range(per_image):
            rng = np.random.default_rng([seed, row, index])
            image, mask, kind = random_anomaly(source, rng, tuple(kinds))
            records.append(
                Record(
                    image=image,
                    label=1,
                    category=example["category"],
                    defect_type=f"synthetic-{kind}",
                    path=f"{example['path']}#synthetic-{index}",
                    mask=(mask * 255).astype(np.uint8),
                )
            )
    if not records:
        raise ValueError("The dataset has no normal images to make synthetic anomalies from.")
    name = dataset.info.dataset_name or "dataset"
    synthetic = build_dataset(records, f"{name}+synthetic", "train")
    return concatenate_datasets([dataset, synthetic.cast(dataset.features)])
