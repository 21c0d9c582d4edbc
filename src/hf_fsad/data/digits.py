"""Handwritten digits, even normal and odd anomalous: MNIST (its IDX files) and scikit-learn's digits."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    split_normals,
)

MNIST_LAYOUT = (
    "ROOT/train-images-idx3-ubyte, ROOT/train-labels-idx1-ubyte, ROOT/t10k-images-idx3-ubyte, "
    "ROOT/t10k-labels-idx1-ubyte (each optionally .gz; the published MNIST IDX files)"
)


def read_idx(path: Path) -> np.ndarray:
    """An IDX file (MNIST's format) as a uint8 array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        data = handle.read()
    if len(data) < 4 or data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise BenchmarkLayoutError(f"{path} is not an IDX file of unsigned bytes.")
    dims = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(dims))
    values = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * dims)
    if values.size != int(np.prod(shape)):
        raise BenchmarkLayoutError(f"{path} holds {values.size} values, but its header says {shape}.")
    return values.reshape(shape)


def _idx_file(root: Path, stem: str) -> Path:
    for candidate in (root / stem, root / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    raise BenchmarkLayoutError(
        f"Expected the file {root / stem} (or .gz), but it does not exist. Expected layout: {MNIST_LAYOUT}"
    )


def _even_odd_records(images: np.ndarray, digits: np.ndarray, split: str, category: str) -> list[Record]:
    return [
        Record(
            image,
            int(digit % 2),
            category,
            "good" if digit % 2 == 0 else f"digit_{digit}",
            f"{split}/{index:05d}",
        )
        for index, (image, digit) in enumerate(zip(images, digits.tolist()))
    ]


def build_mnist(root: Path, category: str | None, seed: int) -> Splits:
    """Even digits normal, odd digits anomalous (MetaCAN's protocol): train = the even training digits,
    test = the whole test set."""
    choose_categories(["mnist"], category, root, MNIST_LAYOUT)
    splits = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_idx_file(root, f"{prefix}-images-idx3-ubyte"))
        digits = read_idx(_idx_file(root, f"{prefix}-labels-idx1-ubyte"))
        if images.ndim != 3 or digits.shape != images.shape[:1]:
            raise BenchmarkLayoutError(
                f"MNIST {prefix} files disagree: images {images.shape}, labels {digits.shape}."
            )
        records = _even_odd_records(images, digits, split, "mnist")
        splits[split] = [record for record in records if record.label == 0] if split == "train" else records
    return splits


def build_sklearn_digits(
    root: Path | None, category: str | None, seed: int, train_fraction: float = 0.75
) -> Splits:
    """scikit-learn's bundled 8x8 digits (1,797 images, offline), even normal and odd anomalous like `mnist`:
    a stand-in for MNIST, not MNIST. A seeded `train_fraction` of the even digits is the reference pool."""
    from sklearn.datasets import load_digits

    choose_categories(["digits"], category, "scikit-learn's digits", "bundled with scikit-learn")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    records = _even_odd_records(images, digits.target, "digits", "digits")
    train, test = split_normals([r for r in records if r.label == 0], train_fraction, seed)
    return {"train": train, "test": test + [r for r in records if r.label == 1]}


MNIST_BENCHMARK = BenchmarkSpec(build_mnist, MNIST_LAYOUT, ("mnist",), class_name="handwritten digit")
SKLEARN_DIGITS_BENCHMARK = BenchmarkSpec(
    build_sklearn_digits,
    "bundled with scikit-learn",
    ("digits",),
    class_name="handwritten digit",
    needs_folder=False,
)
