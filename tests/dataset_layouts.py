"""Writers of tiny folders in the published layouts of the datasets the papers' tables use (each layout and its
source: the docstring of src/hf_fsad/data/<module>.py), for the loader tests and `hf-fsad reproduce --smoke`.

`LAYOUT_WRITERS[name](root, categories)` writes benchmark `name` under `root`, for `categories` (datasets with
one category write theirs whatever is passed). Images are 16 x 16 (AITEX/AFID: 512 x 4, two 256 px tiles);
every mask marks `MASK_BOX`. Each writer's docstring gives the counts the tests rely on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 16
MASK_BOX = (2, 6, 3, 9)  # top, bottom, left, right


def box_mask(shape: tuple[int, int] = (SIZE, SIZE), box: tuple[int, int, int, int] = MASK_BOX) -> np.ndarray:
    mask = np.zeros(shape, np.uint8)
    top, bottom, left, right = box
    mask[top:bottom, left:right] = 255
    return mask


def write_image(path: Path, seed: int, shape: tuple[int, ...] = (SIZE, SIZE, 3)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=shape, dtype=np.uint8)).save(path)


def write_mask(path: Path, mask: np.ndarray | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(box_mask() if mask is None else mask).save(path)


def _write_mvtec_style(
    root: Path, categories: Sequence[str], normal: str, defect: str, image: str, mask: str
) -> None:
    """Per category: train/<normal> 3 images, test/<normal> 1, test/<defect> 2 with their masks in
    ground_truth/<defect>/ (`image`, `mask`: file names of the index `{0}`)."""
    for category in categories:
        base = root / category
        for index in range(3):
            write_image(base / "train" / normal / image.format(index), index)
        write_image(base / "test" / normal / image.format(0), 10)
        for index in range(2):
            write_image(base / "test" / defect / image.format(index), 20 + index)
            write_mask(base / "ground_truth" / defect / mask.format(index))


def write_btad(root: Path, categories: Sequence[str]) -> None:
    """Per product: train/ok 3 .bmp, test/ok 1, test/ko 2 .bmp with masks ground_truth/ko/<stem>.png."""
    _write_mvtec_style(root, categories, "ok", "ko", "{0:04d}.bmp", "{0:04d}.png")


def write_dtd_synthetic(root: Path, categories: Sequence[str]) -> None:
    """Per texture: train/good 3, test/good 1, test/bad 2 with masks ground_truth/bad/<stem>_mask.png."""
    _write_mvtec_style(root, categories, "good", "bad", "{0:03d}.png", "{0:03d}_mask.png")


def write_mvtec_ad(root: Path, categories: Sequence[str]) -> None:
    """Per category: train/good 3, test/good 1, test/broken 2 with masks ground_truth/broken/NNN_mask.png."""
    _write_mvtec_style(root, categories, "good", "broken", "{0:03d}.png", "{0:03d}_mask.png")


def write_visa(root: Path, categories: Sequence[str]) -> None:
    """Per category: Data/Images/Normal 3 train and 1 test, Data/Images/Anomaly 2 with 0/1 masks in
    Data/Masks/Anomaly, listed in split_csv/1cls.csv."""
    rows = ["object,split,label,image,mask"]
    for category in categories:
        for index in range(4):
            image = f"{category}/Data/Images/Normal/{index:04d}.JPG"
            write_image(root / image, index)
            rows.append(f"{category},{'train' if index < 3 else 'test'},normal,{image},")
        for index in range(2):
            image = f"{category}/Data/Images/Anomaly/{index:03d}.JPG"
            mask = f"{category}/Data/Masks/Anomaly/{index:03d}.png"
            write_image(root / image, 20 + index)
            write_mask(root / mask, box_mask() // 255)
            rows.append(f"{category},test,anomaly,{image},{mask}")
    (root / "split_csv").mkdir(parents=True, exist_ok=True)
    (root / "split_csv" / "1cls.csv").write_text("\n".join(rows) + "\n")


def _write_dagm_folder(folder: Path, count: int, defective: int, seed: int) -> None:
    lines = ["1"]
    for number in range(1, count + 1):
        name = f"{number:04d}.PNG"
        write_image(folder / name, seed + number, (SIZE, SIZE))
        if number == defective:
            write_mask(folder / "Label" / f"{number:04d}_label.PNG")
            lines.append(f"{number}\t1\t{name}\t0\t{number:04d}_label.PNG")
        else:
            lines.append(f"{number}\t0\t{name}\t0")
    (folder / "Label" / "Labels.txt").write_text("\n".join(lines) + "\n")


def write_dagm(root: Path, categories: Sequence[str]) -> None:
    """Per class: Train 0001-0004.PNG (0003 defective), Test 0001-0003.PNG (0002 defective), each folder with
    Label/Labels.txt and Label/<stem>_label.PNG."""
    for index, category in enumerate(categories):
        _write_dagm_folder(root / category / "Train", 4, 3, 100 * index)
        _write_dagm_folder(root / category / "Test", 3, 2, 100 * index + 50)


def write_oct2017(root: Path, categories: Sequence[str]) -> None:
    """train/NORMAL 3 and train/CNV 1 (not used), test/NORMAL 2 and one scan in test/CNV, DME, DRUSEN."""
    for index in range(3):
        write_image(root / "train" / "NORMAL" / f"NORMAL-{index}-1.jpeg", index, (SIZE, SIZE))
    write_image(root / "train" / "CNV" / "CNV-9-1.jpeg", 9, (SIZE, SIZE))
    for index in range(2):
        write_image(root / "test" / "NORMAL" / f"NORMAL-{10 + index}-1.jpeg", 10 + index, (SIZE, SIZE))
    for index, disease in enumerate(("CNV", "DME", "DRUSEN")):
        write_image(root / "test" / disease / f"{disease}-{20 + index}-1.jpeg", 20 + index, (SIZE, SIZE))


def write_resc(root: Path, categories: Sequence[str]) -> None:
    """Train/train/good 3, Test/test/good 2, Test/test/Ungood 2 with masks Test/test_label/Ungood/<name>.png,
    and a Val/ folder (not used)."""
    for index in range(3):
        write_image(root / "Train" / "train" / "good" / f"{index}_1.png", index)
    for index in range(2):
        write_image(root / "Test" / "test" / "good" / f"{10 + index}_1.png", 10 + index)
        write_image(root / "Test" / "test" / "Ungood" / f"{20 + index}_1.png", 20 + index)
        write_mask(root / "Test" / "test_label" / "Ungood" / f"{20 + index}_1.png")
    write_image(root / "Val" / "val" / "good" / "30_1.png", 30)


def write_afid(root: Path, categories: Sequence[str]) -> None:
    """AITEX's folders, 512 x 4 images (two tiles): NODefect_images of fabric 05 (two images) and 04 (one),
    Defect_images/0044_019_04.png with its mask marking the second tile only."""
    for index, (folder, name) in enumerate(
        [
            ("2311694-2040n7u", "0001_000_05"),
            ("2311694-2040n7u", "0002_000_05"),
            ("2306881-210020u", "0003_000_04"),
        ]
    ):
        write_image(root / "NODefect_images" / folder / f"{name}.png", index, (4, 512))
    write_image(root / "Defect_images" / "0044_019_04.png", 9, (4, 512))
    mask = np.zeros((4, 512), np.uint8)
    mask[1:3, 300:310] = 255
    write_mask(root / "Mask_images" / "0044_019_04_mask.png", mask)


def write_br35h(root: Path, categories: Sequence[str]) -> None:
    """no/ 4 scans, yes/ 2 scans (.jpg), and pred/ (unlabelled, not used)."""
    for index in range(4):
        write_image(root / "no" / f"no{index}.jpg", index)
    for index in range(2):
        write_image(root / "yes" / f"y{index}.jpg", 10 + index)
    write_image(root / "pred" / "pred0.jpg", 20)


def write_isic(root: Path, categories: Sequence[str]) -> None:
    """Two lesion images (.jpg) with masks <stem>_Segmentation.png."""
    for index in range(2):
        write_image(root / "ISBI2016_ISIC_Part1_Test_Data" / f"ISIC_000000{index}.jpg", index)
        write_mask(root / "ISBI2016_ISIC_Part1_Test_GroundTruth" / f"ISIC_000000{index}_Segmentation.png")


def write_polyps(root: Path, categories: Sequence[str]) -> None:
    """images/1.png, 2.png with masks masks/1.png, 2.png."""
    for index in (1, 2):
        write_image(root / "images" / f"{index}.png", index)
        write_mask(root / "masks" / f"{index}.png")


LAYOUT_WRITERS: dict[str, Callable[[Path, Sequence[str]], None]] = {
    "mvtec_ad": write_mvtec_ad,
    "visa": write_visa,
    "btad": write_btad,
    "dagm": write_dagm,
    "dtd_synthetic": write_dtd_synthetic,
    "oct2017": write_oct2017,
    "resc": write_resc,
    "afid": write_afid,
    "br35h": write_br35h,
    "isic": write_isic,
    "clinicdb": write_polyps,
    "colondb": write_polyps,
    "kvasir": write_polyps,
}
