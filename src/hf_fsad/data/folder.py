"""`folder`: your own images in a generic layout (`FOLDER_LAYOUT`: `good/`, one folder per defect type,
optional `masks/`).
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    image_files,
    relative_path,
    require_dir,
    require_images,
    split_normals,
)

FOLDER_LAYOUT = (
    "ROOT/<category>/good/*.png (normal images), ROOT/<category>/<defect type>/*.png (one folder per defect "
    "type), optional ROOT/<category>/masks/<defect type>/<image stem>.png or <image stem>_mask.png; ROOT may "
    "also be a single category folder (one that holds good/ itself)"
)
_FOLDER_RESERVED = ("good", "masks")


def _folder_categories(root: Path) -> dict[str, Path]:
    """{category: folder}: ROOT itself when it holds good/, else each visible folder in ROOT."""
    if (root / "good").is_dir():
        return {root.resolve().name: root}
    return {d.name: d for d in sorted(root.iterdir()) if d.is_dir() and not d.name.startswith(".")}


def _folder_masks(images: list[Path], mask_dir: Path) -> dict[Path, Path]:
    """Each image's mask in `mask_dir` (named <stem> or <stem>_mask, any image suffix). An image without one
    or with two, and a mask without an image, are errors naming the file."""
    masks = image_files(mask_dir)
    by_stem: dict[str, list[Path]] = defaultdict(list)
    for mask in masks:
        by_stem[mask.stem].append(mask)
    found = {}
    for image in images:
        candidates = by_stem[image.stem] + by_stem[f"{image.stem}_mask"]
        if not candidates:
            raise BenchmarkLayoutError(
                f"No mask for {image}: expected {mask_dir / image.stem}.png or {image.stem}_mask.png, since "
                f"{mask_dir} exists (a defect type with masks needs one per image). Expected layout: "
                f"{FOLDER_LAYOUT}"
            )
        if len(candidates) > 1:
            raise BenchmarkLayoutError(
                f"{image} has several masks: {', '.join(str(c) for c in candidates)}; keep one."
            )
        found[image] = candidates[0]
    unused = sorted(set(masks) - set(found.values()))
    if unused:
        raise BenchmarkLayoutError(
            f"The mask {unused[0]} has no image in {images[0].parent} (a mask <stem>.png or <stem>_mask.png "
            f"belongs to the image <stem>.*). Expected layout: {FOLDER_LAYOUT}"
        )
    return found


def _folder_defects(base: Path) -> list[tuple[str, list[Path], dict[Path, Path]]]:
    """(defect type, its images, {image: mask}) for each defect folder of a category folder `base`."""
    defect_dirs = [
        d
        for d in sorted(base.iterdir())
        if d.is_dir() and d.name not in _FOLDER_RESERVED and not d.name.startswith(".")
    ]
    if not defect_dirs:
        raise BenchmarkLayoutError(
            f"{base} has no defect folder: put anomalous images in {base}/<defect type>/. "
            f"Expected layout: {FOLDER_LAYOUT}"
        )
    mask_root = base / "masks"
    if mask_root.is_dir():
        defects = {d.name for d in defect_dirs}
        stray = image_files(mask_root) + [
            d
            for d in sorted(mask_root.iterdir())
            if d.is_dir() and d.name not in defects and not d.name.startswith(".")
        ]
        if stray:
            raise BenchmarkLayoutError(
                f"{stray[0]} matches no defect folder in {base}: masks go in masks/<defect type>/ next to "
                f"<defect type>/. Expected layout: {FOLDER_LAYOUT}"
            )
    found = []
    for defect_dir in defect_dirs:
        images = require_images(defect_dir, FOLDER_LAYOUT)
        mask_dir = mask_root / defect_dir.name
        found.append((defect_dir.name, images, _folder_masks(images, mask_dir) if mask_dir.is_dir() else {}))
    return found


def build_folder(root: Path, category: str | None, seed: int, train_fraction: float = 0.75) -> Splits:
    """Your own images (`FOLDER_LAYOUT`). Per category, a seeded `train_fraction` of good/ is the reference
    pool (train) and the rest normal test images; every defect image is a test image labelled with its
    folder's name, with its mask where masks/<defect type>/ exists (else None: image metrics only)."""
    if not 0 < train_fraction < 1:
        raise ValueError(f"train_fraction must lie strictly between 0 and 1, got {train_fraction}.")
    folders = _folder_categories(root)
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(list(folders), category, root, FOLDER_LAYOUT):
        base = folders[name]
        good = require_dir(base / "good", FOLDER_LAYOUT)
        normal = [
            Record(str(f), 0, name, "good", relative_path(f, root))
            for f in require_images(good, FOLDER_LAYOUT)
        ]
        train, test = split_normals(normal, train_fraction, seed)
        if not train or not test:
            raise BenchmarkLayoutError(
                f"{good} holds {len(normal)} normal image(s): too few to split into references (train) and "
                f"normal test images at train_fraction={train_fraction}. Add normal images."
            )
        for defect, images, masks in _folder_defects(base):
            for file in images:
                mask = str(masks[file]) if file in masks else None
                test.append(Record(str(file), 1, name, defect, relative_path(file, root), mask))
        splits["train"] += train
        splits["test"] += test
    return splits


FOLDER_BENCHMARK = BenchmarkSpec(build_folder, FOLDER_LAYOUT)
