"""DAGM 2007: ten classes of synthetic textured surfaces with weakly labelled defects (pixel masks).

Layout source: the published competition folders (`ClassN/Train`, `ClassN/Test`, each with `Label/`), as
AF-CLIP's README and dataset code (Faustinaqq/AF-CLIP, `dataset/dagm.py`, folder `DAGM_KaggleUpload`) and
AnomalyCLIP's json generator (`generate_dataset_json/DAGM.py`) read them. `Label/Labels.txt` lists every image:
a first line with a single number, then one line per image, tab-separated: number, defect flag (0/1), image
file, 0, label file (for defective images). When it is absent, an image is defective when
`Label/<stem>_label.PNG` exists (AF-CLIP's rule); when present, it decides, and a defective image without
its label file is an error naming the file. The label files are ellipses drawn around each defect, hence
"weakly labelled": pixel metrics on DAGM measure overlap with those ellipses.
"""

from __future__ import annotations

import re
from pathlib import Path

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    relative_path,
    require_file,
    require_images,
)

DAGM_CATEGORIES = tuple(f"Class{index}" for index in range(1, 11))

DAGM_LAYOUT = (
    "ROOT/ClassN/{Train,Test}/NNNN.PNG with ROOT/ClassN/{Train,Test}/Label/NNNN_label.PNG for defective images "
    "and optionally Label/Labels.txt (the published DAGM 2007 folders)"
)
_CLASS_FOLDER = re.compile(r"^Class(\d+)$")


def _labels_file_masks(labels: Path) -> dict[str, str | None]:
    """{image file name: its label file name, None for a defect-free image}, read from Labels.txt."""
    masks: dict[str, str | None] = {}
    for number, line in enumerate(labels.read_text().splitlines(), start=1):
        fields = line.split()
        if len(fields) <= 1:  # the first line holds a single number; blank lines hold none
            continue
        if len(fields) < 3 or fields[1] not in ("0", "1") or (fields[1] == "1" and len(fields) < 5):
            raise BenchmarkLayoutError(
                f"{labels} line {number} is not '<number> <0|1> <image> 0 <label file>': {line!r}"
            )
        masks[fields[2]] = fields[4] if fields[1] == "1" else None
    return masks


def _dagm_split(root: Path, folder: Path, name: str) -> tuple[list[Record], list[Record]]:
    """(normal, defective) records of one Train or Test folder."""
    images = require_images(folder, DAGM_LAYOUT)
    label_dir = folder / "Label"
    if (label_dir / "Labels.txt").is_file():
        masks = _labels_file_masks(label_dir / "Labels.txt")
        unlisted = [image for image in images if image.name not in masks]
        if unlisted:
            raise BenchmarkLayoutError(f"{unlisted[0]} is not listed in {label_dir / 'Labels.txt'}.")
        mask_files = {
            image: require_file(label_dir / masks[image.name], DAGM_LAYOUT) if masks[image.name] else None
            for image in images
        }
    else:
        mask_files = {image: label_dir / f"{image.stem}_label.PNG" for image in images}
        mask_files = {image: mask if mask.is_file() else None for image, mask in mask_files.items()}
    normal, defective = [], []
    for image, mask in mask_files.items():
        if mask is None:
            normal.append(Record(str(image), 0, name, "good", relative_path(image, root)))
        else:
            defective.append(Record(str(image), 1, name, "defect", relative_path(image, root), str(mask)))
    return normal, defective


def build_dagm(root: Path, category: str | None, seed: int) -> Splits:
    """Per class, the defect-free images of Train are the reference pool and every image of Test is a test
    image. Train's defective images belong to neither split (train holds normal images only)."""
    found = sorted(
        (d.name for d in root.iterdir() if d.is_dir() and _CLASS_FOLDER.match(d.name)),
        key=lambda folder: int(_CLASS_FOLDER.match(folder).group(1)),
    )
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(found, category, root, DAGM_LAYOUT):
        splits["train"] += _dagm_split(root, root / name / "Train", name)[0]
        normal, defective = _dagm_split(root, root / name / "Test", name)
        splits["test"] += normal + defective
    return splits


DAGM_BENCHMARK = BenchmarkSpec(build_dagm, DAGM_LAYOUT, DAGM_CATEGORIES, class_name="textured surface")
