"""ISIC 2016: dermoscopic images of skin lesions with their segmentation masks; every image shows a lesion.

Layout source: the published ISBI 2016 challenge part 1 test set (379 images), as AF-CLIP's README and dataset
code (Faustinaqq/AF-CLIP, `dataset/isic.py`, folder `ISIC2016`) and AnomalyCLIP (`generate_dataset_json/
isbi.py`) read it: `ISBI2016_ISIC_Part1_Test_Data/ISIC_NNNNNNN.jpg` with
`ISBI2016_ISIC_Part1_Test_GroundTruth/ISIC_NNNNNNN_Segmentation.png`. Every image is anomalous (no normal skin
image exists): train is empty, and the set is scored by pixel metrics only (`build_anomalous_only`).
"""

from __future__ import annotations

from pathlib import Path

from .common import BenchmarkSpec, Splits, build_anomalous_only

ISIC_LAYOUT = (
    "ROOT/ISBI2016_ISIC_Part1_Test_Data/*.jpg and ROOT/ISBI2016_ISIC_Part1_Test_GroundTruth/<image "
    "stem>_Segmentation.png (the published ISIC 2016 part 1 test set)"
)


def build_isic(root: Path, category: str | None, seed: int) -> Splits:
    return build_anomalous_only(
        root,
        category,
        "isic",
        "ISBI2016_ISIC_Part1_Test_Data",
        "ISBI2016_ISIC_Part1_Test_GroundTruth",
        ("{stem}_Segmentation.png",),
        ISIC_LAYOUT,
    )


ISIC_BENCHMARK = BenchmarkSpec(build_isic, ISIC_LAYOUT, ("isic",), class_name="skin")
