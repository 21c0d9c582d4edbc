"""DTD-Synthetic: twelve textures of the Describable Textures Dataset with synthetic defects and pixel masks,
in MVTec AD's layout (Aota et al., "Zero-shot versus Many-shot: Unsupervised Texture Anomaly Detection",
WACV 2023).

Layout source: AF-CLIP's README and dataset code (Faustinaqq/AF-CLIP, `dataset/dtd.py`) and AdaCLIP's
(`data_preprocess/dtd.py`): `<texture>/train/good`, `test/{good,bad}`, `ground_truth/bad`. Both pair images
and masks by sorted order, so the mask's file name is not stated there: it is read here as MVTec AD's
`<stem>_mask.png`, or `<stem>.png`, whichever exists (uncertain; an image with neither is an error naming both).
"""

from __future__ import annotations

from pathlib import Path

from .common import BenchmarkSpec, Splits, build_mvtec_style

DTD_SYNTHETIC_CATEGORIES = (
    "Blotchy_099", "Fibrous_183", "Marbled_078", "Matted_069", "Mesh_114", "Perforated_037", "Stratified_154",
    "Woven_001", "Woven_068", "Woven_104", "Woven_125", "Woven_127",
)  # fmt: skip

DTD_SYNTHETIC_LAYOUT = (
    "ROOT/<texture>/train/good/*.png, ROOT/<texture>/test/<good|bad>/*.png, "
    "ROOT/<texture>/ground_truth/bad/<image stem>_mask.png or <image stem>.png (the published DTD-Synthetic "
    "folders, e.g. ROOT/Woven_001/)"
)


def build_dtd_synthetic(root: Path, category: str | None, seed: int) -> Splits:
    return build_mvtec_style(
        root, category, DTD_SYNTHETIC_LAYOUT, mask_names=("{stem}_mask.png", "{stem}.png")
    )


DTD_SYNTHETIC_BENCHMARK = BenchmarkSpec(
    build_dtd_synthetic, DTD_SYNTHETIC_LAYOUT, DTD_SYNTHETIC_CATEGORIES, class_name="texture"
)
