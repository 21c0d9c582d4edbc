"""What every benchmark builder shares: the features, records -> `datasets.Dataset`, layout errors, splits,
and `BenchmarkSpec`, the declaration each dataset module makes of its builder, layout and prompt words.

A builder scans a folder into `Record`s (cheap: paths, labels, crop boxes) and `build_dataset_dict` turns
them into a `DatasetDict` with `Dataset.from_generator`, decoding images only there.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value
from datasets.exceptions import DatasetGenerationError
from datasets.fingerprint import Hasher
from PIL import Image as PILImage

from ..io import IMAGE_SUFFIXES, ImageReadError, check_image_file, read_upright, read_upright_size, upright

logger = logging.getLogger(__name__)

LABEL_NAMES = ("good", "anomaly")
FEATURES = Features(
    {
        "image": Image(),
        "mask": Image(),
        "label": ClassLabel(names=list(LABEL_NAMES)),
        "category": Value("string"),
        "defect_type": Value("string"),
        "path": Value("string"),
    }
)


class BenchmarkLayoutError(ValueError):
    """A benchmark folder is missing or not in the dataset's published layout."""


def require_dir(path: Path, layout: str) -> Path:
    """`path` if it is a directory, else a BenchmarkLayoutError naming it and the expected `layout`."""
    if not path.is_dir():
        raise BenchmarkLayoutError(
            f"Expected the folder {path}, but it does not exist. Expected layout: {layout}"
        )
    return path


def require_file(path: Path, layout: str) -> Path:
    if not path.is_file():
        raise BenchmarkLayoutError(
            f"Expected the file {path}, but it does not exist. Expected layout: {layout}"
        )
    return path


def image_files(folder: Path) -> list[Path]:
    """Image files directly in `folder` (the suffixes `hf-fsad score` reads), sorted by name."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


# An image source: a file path, an array (H, W) or (H, W, 3) of uint8, or a PIL image.
ImageSource = str | os.PathLike | np.ndarray | PILImage.Image


@dataclass
class Record:
    """One example before decoding. `crop` is a (left, upper, right, lower) box applied to image and mask;
    `mask` None means a normal image (for anomalous images without pixel labels, too)."""

    image: ImageSource
    label: int
    category: str
    defect_type: str
    path: str
    mask: ImageSource | None = None
    crop: tuple[int, int, int, int] | None = None


def open_image(source: ImageSource) -> PILImage.Image:
    """`source` as a PIL image turned upright by its EXIF orientation, as `datasets` decodes the image files
    it stores by path, so crops and masks line up with those images."""
    if isinstance(source, PILImage.Image):
        return upright(source)
    if isinstance(source, np.ndarray):
        return PILImage.fromarray(source)
    return read_upright(source)


def image_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) of an image file once upright (`open_image`), read from its header."""
    return read_upright_size(path)


def binary_mask(source: ImageSource) -> PILImage.Image:
    """A mask as mode "L" with 0 (normal) and 255 (anomalous): every non-zero pixel counts as anomalous."""
    values = np.asarray(open_image(source).convert("L"))
    return PILImage.fromarray(np.where(values > 0, 255, 0).astype(np.uint8), mode="L")


def _decode(record: Record) -> dict:
    on_disk = isinstance(record.image, (str, os.PathLike))
    # Uncropped files stay paths: `datasets` stores the path and decodes the image lazily.
    image = None if on_disk and record.crop is None else open_image(record.image)
    mask = None
    if record.mask is not None:
        mask = binary_mask(record.mask)
        size = image.size if image is not None else image_size(record.image)
        if mask.size != size:
            raise BenchmarkLayoutError(
                f"The mask of {record.path} is {mask.size[0]}x{mask.size[1]} but the image is "
                f"{size[0]}x{size[1]} (both upright, by their EXIF orientation): masks must align with their "
                "images."
            )
    if record.crop is not None:
        image = image.crop(record.crop)
        mask = mask.crop(record.crop) if mask is not None else None
    return {
        "image": str(record.image) if image is None else image,
        "mask": mask,
        "label": record.label,
        "category": record.category,
        "defect_type": record.defect_type,
        "path": record.path,
    }


def _generate(records: Sequence[Record]) -> Iterator[dict]:
    """Decoded records; one whose image or mask file cannot be used is reported (a warning naming the file
    and the reason) and left out, so one broken file does not stop a benchmark."""
    for record in records:
        try:
            for source in (record.image, record.mask):
                if isinstance(source, (str, os.PathLike)):
                    check_image_file(source, max_pixels=None)
        except ImageReadError as error:
            logger.warning("skipped %s: %s %s", record.path, source, error)
            continue
        yield _decode(record)


def _file_stamps(records: Sequence[Record]) -> list[tuple[str, int, int] | None]:
    """(path, size, modification time) of every image and mask file (None for arrays and missing files)."""
    stamps = []
    for record in records:
        for source in (record.image, record.mask):
            try:
                stat = os.stat(source) if isinstance(source, (str, os.PathLike)) else None
            except OSError:
                stat = None
            stamps.append(None if stat is None else (str(source), stat.st_size, stat.st_mtime_ns))
    return stamps


def build_dataset(records: Sequence[Record], name: str, split: str) -> Dataset:
    """Records -> Dataset (decoded by `Dataset.from_generator`); `name` becomes `info.dataset_name`.

    The cache fingerprint covers the files' sizes and modification times, not only their paths: an image or
    mask edited in place is read again, not served stale from the `datasets` cache."""
    if not records:
        dataset = Dataset.from_dict({key: [] for key in FEATURES}, features=FEATURES, split=split)
    else:
        records = list(records)
        try:
            dataset = Dataset.from_generator(
                _generate,
                features=FEATURES,
                gen_kwargs={"records": records},
                split=split,
                fingerprint=Hasher.hash([records, _file_stamps(records)]),
            )
        except DatasetGenerationError as error:
            if isinstance(error.__cause__, BenchmarkLayoutError):
                raise error.__cause__ from None
            raise
    dataset.info.dataset_name = name
    return dataset


def build_dataset_dict(splits: dict[str, Sequence[Record]], name: str) -> DatasetDict:
    """`{"train": records, "test": records}` -> DatasetDict; train must hold normal images only."""
    anomalous = [record.path for record in splits["train"] if record.label != 0]
    if anomalous:
        raise ValueError(
            f"The train split must hold normal images only, but has {len(anomalous)} anomalous ones."
        )
    return DatasetDict({split: build_dataset(records, name, split) for split, records in splits.items()})


def split_normals(
    records: Sequence[Record], train_fraction: float, seed: int
) -> tuple[list[Record], list[Record]]:
    """Seeded split of normal records into (train, test); the order of `records` does not matter."""
    ordered = sorted(records, key=lambda record: record.path)
    order = np.random.default_rng(seed).permutation(len(ordered))
    num_train = round(train_fraction * len(ordered))
    return [ordered[i] for i in order[:num_train]], [ordered[i] for i in order[num_train:]]


# --- What a dataset module declares, and the helpers its builder uses --------------------------------------

Splits = dict[str, list[Record]]


@dataclass(frozen=True)
class BenchmarkSpec:
    """A builder `(root, category, seed, **options) -> {"train": records, "test": records}` and its layout.

    categories: None when they are read from the folder. default_root: where the data is found when no root
    is given (e.g. an installed package), None if nowhere. class_name: the word prompts name for every
    category (e.g. "solar cell" for ELPV's mono and poly); None: the category's own name. needs_folder: False
    for data made or bundled in Python (no root needed).
    """

    build: Callable[..., Splits]
    layout: str
    categories: tuple[str, ...] | None = None
    default_root: Callable[[], Path | None] | None = None
    class_name: str | None = None
    needs_folder: bool = True

    def class_name_for(self, category: str) -> str:
        """The prompt class word of `category`."""
        return self.class_name or category.replace("_", " ")


def relative_path(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def require_mask(image: Path, mask_dir: Path, names: Sequence[str], layout: str) -> Path:
    """The mask of `image`: the one file of `mask_dir` named by a pattern of `names` (`{stem}` = the image's
    stem) that exists; a BenchmarkLayoutError naming the expected files when none or several do."""
    candidates = [mask_dir / name.format(stem=image.stem) for name in names]
    found = [candidate for candidate in candidates if candidate.is_file()]
    if not found:
        expected = " or ".join(str(candidate) for candidate in candidates)
        raise BenchmarkLayoutError(f"No mask for {image}: expected {expected}. Expected layout: {layout}")
    if len(found) > 1:
        raise BenchmarkLayoutError(f"{image} has several masks: {', '.join(map(str, found))}; keep one.")
    return found[0]


def require_images(folder: Path, layout: str) -> list[Path]:
    """The images in `folder` (sorted), or a BenchmarkLayoutError when it is missing or holds none."""
    files = image_files(require_dir(folder, layout))
    if not files:
        raise BenchmarkLayoutError(f"The folder {folder} holds no images. Expected layout: {layout}")
    return files


def folder_records(
    root: Path,
    folder: Path,
    category: str,
    defect_type: str,
    layout: str,
    mask_dir: Path | None = None,
    mask_names: Sequence[str] = ("{stem}.png",),
) -> list[Record]:
    """A record per image of `folder` (an error when it is missing or holds none): normal when `defect_type`
    is "good", else anomalous, with its mask from `mask_dir` (see `require_mask`) when one is given."""
    label = int(defect_type != "good")
    if mask_dir is not None:
        require_dir(mask_dir, layout)
    return [
        Record(
            str(file),
            label,
            category,
            defect_type,
            relative_path(file, root),
            None if mask_dir is None else str(require_mask(file, mask_dir, mask_names, layout)),
        )
        for file in require_images(folder, layout)
    ]


def build_mvtec_style(
    root: Path,
    category: str | None,
    layout: str,
    normal: str = "good",
    mask_names: Sequence[str] = ("{stem}_mask.png",),
) -> Splits:
    """A dataset laid out as MVTec AD: per category (each folder of ROOT that holds train/),
    train/<normal>/ (the reference pool), test/<normal or defect>/, and ground_truth/<defect>/ with one mask
    per defect image named by `mask_names` (patterns of `{stem}`, see `require_mask`)."""
    found = sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(found, category, root, layout):
        base = root / name
        splits["train"] += folder_records(root, base / "train" / normal, name, "good", layout)
        for defect_dir in sorted(d for d in require_dir(base / "test", layout).iterdir() if d.is_dir()):
            if defect_dir.name == normal:
                splits["test"] += folder_records(root, defect_dir, name, "good", layout)
            else:
                mask_dir = base / "ground_truth" / defect_dir.name
                splits["test"] += folder_records(
                    root, defect_dir, name, defect_dir.name, layout, mask_dir, mask_names
                )
    return splits


def build_anomalous_only(
    root: Path,
    category: str | None,
    name: str,
    image_dir: str,
    mask_dir: str,
    mask_names: Sequence[str],
    layout: str,
) -> Splits:
    """A segmentation dataset in which every image shows the anomaly (a lesion, a polyp), its mask beside it:
    one category `name`, every image of ROOT/<image_dir>/ a test image labelled anomalous with its mask from
    ROOT/<mask_dir>/, and an empty train split (no normal image exists). Image metrics are undefined on it (one
    class), so it is scored by its pixel metrics, as AnomalyCLIP and AF-CLIP do, zero-shot (k = 0)."""
    choose_categories([name], category, root, layout)
    test = folder_records(root, root / image_dir, name, "anomaly", layout, root / mask_dir, mask_names)
    return {"train": [], "test": test}


def choose_categories(found: list[str], requested: str | None, source: object, layout: str) -> list[str]:
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
