"""Seeded k-shot reference sampling, written to and read from a manifest so runs repeat exactly."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from datasets import Dataset


@dataclass
class ReferenceManifest:
    """Which normal training images (by `path` id) are the k references of one run."""

    dataset: str
    category: str | None
    k: int
    seed: int
    image_ids: list[str]

    def save(self, path: str | os.PathLike) -> None:
        """Write the manifest as JSON (atomically)."""
        path = Path(path)
        temporary = path.with_name(path.name + ".tmp")
        temporary.write_text(json.dumps(asdict(self), indent=2) + "\n")
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceManifest:
        data = json.loads(Path(path).read_text())
        missing = {"dataset", "category", "k", "seed", "image_ids"} - set(data)
        if missing:
            raise ValueError(f"{path} is not a reference manifest: it lacks {sorted(missing)}.")
        manifest = cls(**{key: data[key] for key in ("dataset", "category", "k", "seed", "image_ids")})
        if len(manifest.image_ids) != manifest.k:
            raise ValueError(f"{path} says k={manifest.k} but lists {len(manifest.image_ids)} images.")
        return manifest

    def select(self, train: Dataset) -> Dataset:
        """The manifest's images from `train`, in manifest order."""
        index = {image_id: row for row, image_id in enumerate(train["path"])}
        missing = [image_id for image_id in self.image_ids if image_id not in index]
        if missing:
            raise ValueError(f"The reference images {missing[:3]} of this manifest are not in the train split.")
        return train.select([index[image_id] for image_id in self.image_ids])


def sample_references(train: Dataset, k: int, seed: int, category: str | None = None) -> ReferenceManifest:
    """Draw k distinct normal images of `category` from a train split, seeded.

    The draw depends only on the set of candidate ids and the seed, not on the split's row order.
    `category` may be left out when the split holds one category.
    """
    categories = sorted(set(train["category"]))
    if category is None:
        if len(categories) != 1:
            raise ValueError(f"The train split holds several categories ({', '.join(categories)}); pass category=.")
        category = categories[0]
    pool = sorted(
        path for path, label, name in zip(train["path"], train["label"], train["category"]) if label == 0 and name == category
    )
    if not 1 <= k <= len(pool):
        raise ValueError(f"Cannot draw k={k} references: category {category!r} has {len(pool)} normal training images.")
    chosen = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return ReferenceManifest(train.info.dataset_name or "unknown", category, k, seed, [pool[i] for i in chosen])
