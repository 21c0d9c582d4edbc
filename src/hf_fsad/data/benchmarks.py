"""The papers' benchmarks as `datasets.DatasetDict`s: `load_benchmark(name, root, category)`.

Each builder reads a local folder in the dataset's published layout (see `BENCHMARKS[name].layout`), scans
it into records and builds `train` (normal images only: the pool k-shot references are drawn from) and
`test` (normal + anomalous, with masks where the dataset has them). Where a dataset has no train/test split
of its normal images, a seeded `train_fraction` (default 0.75) of them forms `train`. The `folder` benchmark
reads your own images in a generic layout (`FOLDER_LAYOUT`: `good/`, one folder per defect type, optional
`masks/`).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import os
import re
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
from datasets import DatasetDict

from .common import (
    BenchmarkLayoutError,
    Record,
    binary_mask,
    build_dataset_dict,
    image_files,
    image_size,
    require_dir,
    require_file,
    split_normals,
)
from .toy import TOY_CATEGORIES, toy_records

Splits = dict[str, list[Record]]

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip
VISA_CATEGORIES = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1", "pcb2", "pcb3",
    "pcb4", "pipe_fryum",
)  # fmt: skip
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
AITEX_TILE_WIDTH = 256


@dataclass(frozen=True)
class BenchmarkSpec:
    """A builder `(root, category, seed, **options) -> {"train": records, "test": records}` and its layout."""

    build: Callable[..., Splits]
    layout: str
    categories: tuple[str, ...] | None = None  # None: read from the folder
    default_root: Callable[[], Path | None] | None = None


def _relative(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _require_images(folder: Path, layout: str) -> list[Path]:
    files = image_files(require_dir(folder, layout))
    if not files:
        raise BenchmarkLayoutError(f"The folder {folder} holds no images. Expected layout: {layout}")
    return files


def _choose_categories(found: list[str], requested: str | None, source: object, layout: str) -> list[str]:
    """`[requested]` if `source` has it, all `found` categories if None, else an error naming both."""
    if not found:
        raise BenchmarkLayoutError(f"No categories found in {source}. Expected layout: {layout}")
    if requested is None:
        return found
    if requested not in found:
        raise BenchmarkLayoutError(
            f"Category {requested!r} is not in {source} (found: {', '.join(found)}). Expected layout: {layout}"
        )
    return [requested]


# --- MVTec AD -------------------------------------------------------------------------------------------

MVTEC_AD_LAYOUT = (
    "ROOT/<category>/train/good/*.png, ROOT/<category>/test/<defect or good>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<image stem>_mask.png (the published MVTec AD folders)"
)


def build_mvtec_ad(root: Path, category: str | None, seed: int) -> Splits:
    found = sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    splits: Splits = {"train": [], "test": []}
    for name in _choose_categories(found, category, root, MVTEC_AD_LAYOUT):
        base = root / name
        for file in _require_images(base / "train" / "good", MVTEC_AD_LAYOUT):
            splits["train"].append(Record(str(file), 0, name, "good", _relative(file, root)))
        for defect_dir in sorted(
            d for d in require_dir(base / "test", MVTEC_AD_LAYOUT).iterdir() if d.is_dir()
        ):
            defect = defect_dir.name
            for file in _require_images(defect_dir, MVTEC_AD_LAYOUT):
                mask = None
                if defect != "good":
                    mask = str(
                        require_file(
                            base / "ground_truth" / defect / f"{file.stem}_mask.png", MVTEC_AD_LAYOUT
                        )
                    )
                splits["test"].append(
                    Record(str(file), int(defect != "good"), name, defect, _relative(file, root), mask)
                )
    return splits


# --- VisA (1cls split) -----------------------------------------------------------------------------------

VISA_LAYOUT = (
    "ROOT/split_csv/1cls.csv (columns object,split,label,image,mask with paths relative to ROOT) and "
    "ROOT/<category>/Data/Images/{Normal,Anomaly}/*.JPG, ROOT/<category>/Data/Masks/Anomaly/*.png"
)


def build_visa(root: Path, category: str | None, seed: int) -> Splits:
    split_file = require_file(root / "split_csv" / "1cls.csv", VISA_LAYOUT)
    with open(split_file, newline="") as handle:
        rows = list(csv.DictReader(handle))
    missing_columns = {"object", "split", "label", "image", "mask"} - set(rows[0] if rows else {})
    if missing_columns:
        raise BenchmarkLayoutError(
            f"{split_file} lacks the columns {sorted(missing_columns)}. Expected layout: {VISA_LAYOUT}"
        )
    found = sorted({row["object"] for row in rows})
    chosen = set(_choose_categories(found, category, root, VISA_LAYOUT))
    splits: Splits = {"train": [], "test": []}
    for row in rows:
        if row["object"] not in chosen:
            continue
        if row["split"] not in splits or row["label"] not in ("normal", "anomaly"):
            raise BenchmarkLayoutError(
                f"{split_file}: unexpected split {row['split']!r} or label {row['label']!r}."
            )
        anomalous = row["label"] == "anomaly"
        image = require_file(root / row["image"], VISA_LAYOUT)
        mask = str(require_file(root / row["mask"], VISA_LAYOUT)) if anomalous else None
        defect = "anomaly" if anomalous else "good"
        splits[row["split"]].append(
            Record(str(image), int(anomalous), row["object"], defect, row["image"], mask)
        )
    return splits


# --- ELPV ------------------------------------------------------------------------------------------------

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
    for name in _choose_categories(found, category, root, ELPV_LAYOUT):
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


# --- HeadCT, BrainMRI ------------------------------------------------------------------------------------


def _normal_abnormal_layout(name: str) -> str:
    return f"ROOT/normal/*.png|jpg (normal scans) and ROOT/abnormal/*.png|jpg ({name} with findings)"


def build_normal_abnormal(
    root: Path, category: str | None, seed: int, name: str, train_fraction: float = 0.75
) -> Splits:
    """One category; a seeded `train_fraction` of the normal scans is the reference pool, the rest test."""
    layout = _normal_abnormal_layout(name)
    _choose_categories([name], category, root, layout)
    normal = [
        Record(str(f), 0, name, "good", _relative(f, root)) for f in _require_images(root / "normal", layout)
    ]
    abnormal = [
        Record(str(f), 1, name, "abnormal", _relative(f, root))
        for f in _require_images(root / "abnormal", layout)
    ]
    train, test = split_normals(normal, train_fraction, seed)
    return {"train": train, "test": test + abnormal}


# --- AITEX -----------------------------------------------------------------------------------------------

AITEX_LAYOUT = (
    "ROOT/Defect_images/NNNN_DDD_FF.png, ROOT/Mask_images/NNNN_DDD_FF_mask*.png, "
    "ROOT/NODefect_images/<any folder>/NNNN_000_FF.png (FF = fabric code; images 256 px high, width a "
    "multiple of 256)"
)
_AITEX_NAME = re.compile(r"^\d+_(\d+)_(\d+)$")


def _aitex_tiles(file: Path) -> tuple[list[tuple[int, int, int, int]], str]:
    match = _AITEX_NAME.match(file.stem)
    if match is None:
        raise BenchmarkLayoutError(f"{file.name} is not named NNNN_DDD_FF. Expected layout: {AITEX_LAYOUT}")
    width, height = image_size(file)
    if width % AITEX_TILE_WIDTH:
        raise BenchmarkLayoutError(
            f"{file} is {width} px wide, not a multiple of {AITEX_TILE_WIDTH} px tiles."
        )
    boxes = [(x, 0, x + AITEX_TILE_WIDTH, height) for x in range(0, width, AITEX_TILE_WIDTH)]
    return boxes, f"fabric{match.group(2)}"


def _aitex_mask(root: Path, file: Path) -> np.ndarray:
    """The union of an image's masks as a 0/255 uint8 array (some images have several)."""
    masks = sorted((root / "Mask_images").glob(f"{file.stem}_mask*.png"))
    if not masks:
        raise BenchmarkLayoutError(
            f"No mask for {file} in {root / 'Mask_images'}. Expected layout: {AITEX_LAYOUT}"
        )
    return np.max([np.asarray(binary_mask(mask)) for mask in masks], axis=0)


def build_aitex(root: Path, category: str | None, seed: int, train_fraction: float = 0.75) -> Splits:
    """Images cut into 256 px wide tiles. A tile of a defect image is anomalous when its part of the mask
    (the union of the image's masks) has a defect pixel, else a normal test tile. Tiles of defect-free images
    are split seeded into train and test."""
    normal_files = sorted(require_dir(root / "NODefect_images", AITEX_LAYOUT).rglob("*.png"))
    defect_files = _require_images(root / "Defect_images", AITEX_LAYOUT)
    tiles = {file: _aitex_tiles(file) for file in normal_files + defect_files}
    found = sorted({fabric for _, fabric in tiles.values()})
    chosen = set(_choose_categories(found, category, root, AITEX_LAYOUT))
    splits: Splits = {"train": [], "test": []}
    normal: dict[str, list[Record]] = {fabric: [] for fabric in chosen}
    for file in normal_files + defect_files:
        boxes, fabric = tiles[file]
        if fabric not in chosen:
            continue
        mask = _aitex_mask(root, file) if file in defect_files else None
        for index, box in enumerate(boxes):
            tile_path = f"{_relative(file, root)}#tile{index:02d}"
            if mask is not None and mask[:, box[0] : box[2]].any():
                defect = f"defect{_AITEX_NAME.match(file.stem).group(1)}"
                splits["test"].append(Record(str(file), 1, fabric, defect, tile_path, mask, box))
            elif mask is not None:
                splits["test"].append(Record(str(file), 0, fabric, "good", tile_path, None, box))
            else:
                normal[fabric].append(Record(str(file), 0, fabric, "good", tile_path, None, box))
    for fabric in sorted(chosen):
        train, test = split_normals(normal[fabric], train_fraction, seed)
        splits["train"] += train
        splits["test"] += test
    return splits


# --- KolektorSDD -----------------------------------------------------------------------------------------

KSDD_LAYOUT = (
    "ROOT/kosNN/PartN.jpg with its mask ROOT/kosNN/PartN_label.bmp (the published KolektorSDD folders)"
)


def build_ksdd(root: Path, category: str | None, seed: int, train_fraction: float = 0.75) -> Splits:
    """Each image cut into three parts along its height; a part is anomalous when its mask has a defect
    pixel. A seeded `train_fraction` of the normal parts is the reference pool."""
    _choose_categories(["ksdd"], category, root, KSDD_LAYOUT)
    folders = sorted(d for d in root.iterdir() if d.is_dir() and d.name.startswith("kos"))
    if not folders:
        raise BenchmarkLayoutError(f"No kosNN folders in {root}. Expected layout: {KSDD_LAYOUT}")
    normal, anomalous = [], []
    for folder in folders:
        for file in sorted(p for p in _require_images(folder, KSDD_LAYOUT) if not p.stem.endswith("_label")):
            mask_file = require_file(folder / f"{file.stem}_label.bmp", KSDD_LAYOUT)
            mask = np.asarray(binary_mask(mask_file)) > 0
            width, height = image_size(file)
            bounds = [round(i * height / 3) for i in range(4)]
            for third in range(3):
                box = (0, bounds[third], width, bounds[third + 1])
                path = f"{_relative(file, root)}#third{third}"
                if mask[box[1] : box[3]].any():
                    anomalous.append(Record(str(file), 1, "ksdd", "crack", path, str(mask_file), box))
                else:
                    normal.append(Record(str(file), 0, "ksdd", "good", path, None, box))
    train, test = split_normals(normal, train_fraction, seed)
    return {"train": train, "test": test + anomalous}


# --- MNIST, scikit-learn digits, CIFAR-10 ----------------------------------------------------------------

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
    _choose_categories(["mnist"], category, root, MNIST_LAYOUT)
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

    _choose_categories(["digits"], category, "scikit-learn's digits", "bundled with scikit-learn")
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)
    records = _even_odd_records(images, digits.target, "digits", "digits")
    train, test = split_normals([r for r in records if r.label == 0], train_fraction, seed)
    return {"train": train, "test": test + [r for r in records if r.label == 1]}


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
    for name in _choose_categories(list(CIFAR10_CLASSES), category, root, CIFAR10_LAYOUT):
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


def build_toy(root: Path | None, category: str | None, seed: int, **options) -> Splits:
    """The generated toy textures (`hf_fsad.data.toy`); options: num_train, num_test_good,
    num_test_anomalous, image_size, defects."""
    categories = _choose_categories(list(TOY_CATEGORIES), category, "the toy generator", "generated")
    splits: Splits = {"train": [], "test": []}
    for name in categories:
        for split, records in toy_records(name, seed=seed, **options).items():
            splits[split] += records
    return splits


# --- Your own images -------------------------------------------------------------------------------------

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
        images = _require_images(defect_dir, FOLDER_LAYOUT)
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
    for name in _choose_categories(list(folders), category, root, FOLDER_LAYOUT):
        base = folders[name]
        good = require_dir(base / "good", FOLDER_LAYOUT)
        normal = [
            Record(str(f), 0, name, "good", _relative(f, root)) for f in _require_images(good, FOLDER_LAYOUT)
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
                test.append(Record(str(file), 1, name, defect, _relative(file, root), mask))
        splits["train"] += train
        splits["test"] += test
    return splits


BENCHMARKS: dict[str, BenchmarkSpec] = {
    "mvtec_ad": BenchmarkSpec(build_mvtec_ad, MVTEC_AD_LAYOUT, MVTEC_AD_CATEGORIES),
    "visa": BenchmarkSpec(build_visa, VISA_LAYOUT, VISA_CATEGORIES),
    "elpv": BenchmarkSpec(build_elpv, ELPV_LAYOUT, ("mono", "poly"), elpv_package_root),
    "headct": BenchmarkSpec(
        partial(build_normal_abnormal, name="headct"), _normal_abnormal_layout("headct"), ("headct",)
    ),
    "brainmri": BenchmarkSpec(
        partial(build_normal_abnormal, name="brainmri"), _normal_abnormal_layout("brainmri"), ("brainmri",)
    ),
    "aitex": BenchmarkSpec(build_aitex, AITEX_LAYOUT),
    "ksdd": BenchmarkSpec(build_ksdd, KSDD_LAYOUT, ("ksdd",)),
    "sdd": BenchmarkSpec(build_ksdd, KSDD_LAYOUT, ("ksdd",)),
    "mnist": BenchmarkSpec(build_mnist, MNIST_LAYOUT, ("mnist",)),
    "sklearn_digits": BenchmarkSpec(
        build_sklearn_digits, "bundled with scikit-learn", ("digits",), lambda: None
    ),
    "cifar10": BenchmarkSpec(build_cifar10, CIFAR10_LAYOUT, CIFAR10_CLASSES),
    "toy": BenchmarkSpec(build_toy, "generated", tuple(TOY_CATEGORIES), lambda: None),
    "folder": BenchmarkSpec(build_folder, FOLDER_LAYOUT),
}
_NO_FOLDER = {"sklearn_digits", "toy"}


def load_benchmark(
    name: str, root: str | os.PathLike | None = None, category: str | None = None, seed: int = 0, **options
) -> DatasetDict:
    """A benchmark as a DatasetDict with `train` (normal only) and `test` splits.

    name: one of `BENCHMARKS`. root: the dataset's folder in its published layout (for `folder`, your own
    images in `FOLDER_LAYOUT`), or a Hub dataset written by `push_benchmark` (`hf://datasets/<owner>/<name>`,
    or a local folder holding that layout).
    category: one category, or None for all. seed: for the datasets whose normal images are split here.
    options: builder options (e.g. `train_fraction`; for `toy`, the generator's sizes).
    """
    from .hub import is_hub_layout, load_hub_benchmark

    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}.")
    spec = BENCHMARKS[name]
    if root is not None and (str(root).startswith("hf://") or is_hub_layout(root)):
        return load_hub_benchmark(name, root, category)
    if root is None and name not in _NO_FOLDER:
        root = spec.default_root() if spec.default_root else None
        if root is None:
            raise ValueError(f"Benchmark {name!r} needs root=: a folder laid out as {spec.layout}")
    if root is not None:
        root = require_dir(Path(root), spec.layout)
    return build_dataset_dict(spec.build(root, category, seed, **options), name)
