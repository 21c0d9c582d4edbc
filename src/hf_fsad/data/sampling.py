"""Seeded k-shot reference sampling, written to and read from a manifest so runs repeat exactly."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from datasets import Dataset

from ..io import atomic_write_text

_REQUIRED = ("dataset", "category", "k", "seed", "image_ids")
_OPTIONAL = ("anomalous_ids", "validation_ids", "test_ids", "data_id")


@dataclass
class ReferenceManifest:
    """Which images (by `path` id) one run uses.

    image_ids: the k normal references (train split). anomalous_ids: anomalous references, taken out of
    the test split. validation_ids: normal train images kept for weight validation. test_ids: the scored
    test images (None: the whole test split of the category). data_id: the identity of the images drawn
    from (the benchmark runner's; None when unknown).
    """

    dataset: str
    category: str | None
    k: int
    seed: int
    image_ids: list[str]
    anomalous_ids: list[str] = field(default_factory=list)
    validation_ids: list[str] = field(default_factory=list)
    test_ids: list[str] | None = None
    data_id: str | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the manifest as JSON (atomically)."""
        atomic_write_text(path, json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceManifest:
        data = json.loads(Path(path).read_text())
        missing = set(_REQUIRED) - set(data)
        if missing:
            raise ValueError(f"{path} is not a reference manifest: it lacks {sorted(missing)}.")
        manifest = cls(**{key: data[key] for key in (*_REQUIRED, *_OPTIONAL) if key in data})
        if len(manifest.image_ids) != manifest.k:
            raise ValueError(f"{path} says k={manifest.k} but lists {len(manifest.image_ids)} images.")
        return manifest

    def select(self, train: Dataset) -> Dataset:
        """The manifest's normal references from `train`, in manifest order."""
        return select_ids(train, self.image_ids)


def row_indices(dataset: Dataset, image_ids: Sequence[str]) -> list[int]:
    """Row numbers of the images `image_ids` (their `path`) in `dataset`, in that order."""
    index = {image_id: row for row, image_id in enumerate(dataset["path"])}
    missing = [image_id for image_id in image_ids if image_id not in index]
    if missing:
        raise ValueError(f"The images {missing[:3]} of this manifest are not in the split.")
    return [index[image_id] for image_id in image_ids]


def select_ids(dataset: Dataset, image_ids: Sequence[str]) -> Dataset:
    """The rows of `dataset` whose `path` is in `image_ids`, in that order."""
    return dataset.select(row_indices(dataset, image_ids))


def _only_category(dataset: Dataset, category: str | None) -> tuple[str, list[tuple[str, int]]]:
    """The category (the only one when None) and its (path, label) rows."""
    categories = sorted(set(dataset["category"]))
    if category is None:
        if len(categories) != 1:
            raise ValueError(f"The split holds several categories ({', '.join(categories)}); pass category=.")
        category = categories[0]
    rows = [
        (path, label)
        for path, label, name in zip(dataset["path"], dataset["label"], dataset["category"])
        if name == category
    ]
    return category, rows


def sample_references(
    train: Dataset,
    k: int,
    seed: int,
    category: str | None = None,
    test: Dataset | None = None,
    num_anomalous: int = 0,
    num_validation: int = 0,
    max_test: int | None = None,
) -> ReferenceManifest:
    """Draw k distinct normal references of `category` from a train split, seeded.

    With `test`: also draw `num_anomalous` anomalous references from its anomalous images (taken out of the
    scored set) and cap the scored set at `max_test` images. Those test-side draws use their own random
    stream, so every k of a seed scores the same test images. `num_validation` more normal train images are
    kept apart for weight validation. Draws depend on the sets of ids and the seed, not on row order.
    """
    category, train_rows = _only_category(train, category)
    pool = sorted(path for path, label in train_rows if label == 0)
    if k < 0 or k + num_validation > len(pool):
        raise ValueError(
            f"Cannot draw k={k} references (+{num_validation} for validation): category {category!r} has "
            f"{len(pool)} normal training images."
        )
    chosen = [
        pool[i] for i in np.random.default_rng(seed).choice(len(pool), size=k + num_validation, replace=False)
    ]
    manifest = ReferenceManifest(train.info.dataset_name or "unknown", category, k, seed, chosen[:k])
    manifest.validation_ids = chosen[k:]
    if test is None:
        if num_anomalous or max_test is not None:
            raise ValueError("Anomalous references and max_test are drawn from the test split: pass test=.")
        return manifest
    _, test_rows = _only_category(test, category)
    anomalous_pool = sorted(path for path, label in test_rows if label == 1)
    if num_anomalous > len(anomalous_pool):
        raise ValueError(
            f"Cannot draw {num_anomalous} anomalous references: category {category!r} has {len(anomalous_pool)}."
        )
    test_rng = np.random.default_rng([seed, 1])
    manifest.anomalous_ids = [
        anomalous_pool[i] for i in test_rng.choice(len(anomalous_pool), num_anomalous, replace=False)
    ]
    remaining = sorted(path for path, _ in test_rows if path not in set(manifest.anomalous_ids))
    if max_test is not None and len(remaining) > max_test:
        remaining = sorted(remaining[i] for i in test_rng.choice(len(remaining), max_test, replace=False))
    manifest.test_ids = remaining
    return manifest
