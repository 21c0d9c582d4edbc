"""MVTec AD: fifteen industrial object and texture categories with pixel masks (the published folders)."""

from __future__ import annotations

from pathlib import Path

from .common import BenchmarkSpec, Splits, build_mvtec_style

MVTEC_AD_CATEGORIES = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill", "screw",
    "tile", "toothbrush", "transistor", "wood", "zipper",
)  # fmt: skip

MVTEC_AD_LAYOUT = (
    "ROOT/<category>/train/good/*.png, ROOT/<category>/test/<defect or good>/*.png, "
    "ROOT/<category>/ground_truth/<defect>/<image stem>_mask.png (the published MVTec AD folders)"
)


def build_mvtec_ad(root: Path, category: str | None, seed: int) -> Splits:
    return build_mvtec_style(root, category, MVTEC_AD_LAYOUT)


MVTEC_AD_BENCHMARK = BenchmarkSpec(build_mvtec_ad, MVTEC_AD_LAYOUT, MVTEC_AD_CATEGORIES)
