"""MVTec AD: fifteen industrial object and texture categories with pixel masks (the published folders)."""

from __future__ import annotations

from pathlib import Path

from .common import (
    BenchmarkSpec,
    Record,
    Splits,
    choose_categories,
    relative_path,
    require_dir,
    require_file,
    require_images,
)

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

MVTEC_AD_LAYOUT = (
    "ROOT/<category>/train/good/*.png, ROOT/<category>/test/<defect or good>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<image stem>_mask.png (the published MVTec AD folders)"
)


def build_mvtec_ad(root: Path, category: str | None, seed: int) -> Splits:
    found = sorted(d.name for d in root.iterdir() if (d / "train").is_dir())
    splits: Splits = {"train": [], "test": []}
    for name in choose_categories(found, category, root, MVTEC_AD_LAYOUT):
        base = root / name
        for file in require_images(base / "train" / "good", MVTEC_AD_LAYOUT):
            splits["train"].append(Record(str(file), 0, name, "good", relative_path(file, root)))
        for defect_dir in sorted(
            d for d in require_dir(base / "test", MVTEC_AD_LAYOUT).iterdir() if d.is_dir()
        ):
            defect = defect_dir.name
            for file in require_images(defect_dir, MVTEC_AD_LAYOUT):
                mask = None
                if defect != "good":
                    mask = str(
                        require_file(
                            base / "ground_truth" / defect / f"{file.stem}_mask.png", MVTEC_AD_LAYOUT
                        )
                    )
                splits["test"].append(
                    Record(str(file), int(defect != "good"), name, defect, relative_path(file, root), mask)
                )
    return splits


MVTEC_AD_BENCHMARK = BenchmarkSpec(build_mvtec_ad, MVTEC_AD_LAYOUT, MVTEC_AD_CATEGORIES)
