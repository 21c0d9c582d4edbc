"""CIFAR-10 one-vs-all: a category is one class, the other nine are anomalous (the binary release)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    require_file,
)

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

CIFAR10_LAYOUT = (
    "ROOT/data_batch_1.bin ... data_batch_5.bin and ROOT/test_batch.bin (CIFAR-10 binary version)"
)
_CIFAR_RECORD = 1 + 32 * 32 * 3


def read_cifar10_bin(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, 32, 32, 3) uint8, labels (N,)) from one CIFAR-10 binary batch file."""
    data = np.fromfile(path, dtype=np.uint8)
    if data.size == 0 or data.size % _CIFAR_RECORD:
        raise BenchmarkLayoutError(f"{path} is not a CIFAR-10 binary batch ({data.size} bytes).")
    rows = data.reshape(-1, _CIFAR_RECORD)
    return rows[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rows[:, 0]


def build_cifar10(root: Path, category: str | None, seed: int) -> Splits:
    """One-vs-all: a category is one class; train = its training images, test = the whole test set with the
    other nine classes anomalous. The binary release is read (the Python release is pickled)."""
    if (root / "cifar-10-batches-bin").is_dir():
        root = root / "cifar-10-batches-bin"
    train_files = [require_file(root / f"data_batch_{i}.bin", CIFAR10_LAYOUT) for i in range(1, 6)]
    train_parts = [read_cifar10_bin(file) for file in train_files]
    train_images = np.concatenate([images for images, _ in train_parts])
    train_labels = np.concatenate([labels for _, labels in train_parts])
    test_images, test_labels = read_cifar10_bin(require_file(root / "test_batch.bin", CIFAR10_LAYOUT))
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(list(CIFAR10_CLASSES), category, root, CIFAR10_LAYOUT):
        target = CIFAR10_CLASSES.index(name)
        splits["train"] += [
            Record(image, 0, name, "good", f"train/{index:05d}")
            for index, (image, label) in enumerate(zip(train_images, train_labels))
            if label == target
        ]
        splits["test"] += [
            Record(
                image,
                int(label != target),
                name,
                "good" if label == target else CIFAR10_CLASSES[label],
                f"test/{index:05d}",
            )
            for index, (image, label) in enumerate(zip(test_images, test_labels))
        ]
    return splits


CIFAR10_BENCHMARK = BenchmarkSpec(build_cifar10, CIFAR10_LAYOUT, CIFAR10_CLASSES)
