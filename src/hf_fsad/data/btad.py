"""BTAD (beanTech Anomaly Detection): three industrial products with pixel masks, in MVTec AD's layout.

Layout source: the published `BTech_Dataset_transformed` folders, as AF-CLIP's README and dataset code
(Faustinaqq/AF-CLIP, `dataset/btad.py`) and AdaCLIP's (caoyunkang/AdaCLIP, `data_preprocess/btad.py`) read
them: normal images in `ok/`, anomalous ones in `ko/`, masks in `ground_truth/ko/`. Images are .bmp or .png
depending on the product, and so are masks; a mask carries its image's stem (`0001.bmp` -> `0001.png`), which
the third-party loaders imply by pairing sorted lists rather than state, so a mismatch is reported here.
"""

from __future__ import annotations

from pathlib import Path

from .common import BenchmarkSpec, Splits, build_mvtec_style

BTAD_CATEGORIES = ("01", "02", "03")

BTAD_LAYOUT = (
    "ROOT/<01|02|03>/train/ok/*.bmp|png, ROOT/<product>/test/<ok|ko>/*.bmp|png, "
    "ROOT/<product>/ground_truth/ko/<image stem>.png|bmp (the published BTech_Dataset_transformed folders)"
)


def build_btad(root: Path, category: str | None, seed: int) -> Splits:
    return build_mvtec_style(
        root, category, BTAD_LAYOUT, normal="ok", mask_names=("{stem}.png", "{stem}.bmp")
    )


# BTAD does not name its three products.
BTAD_BENCHMARK = BenchmarkSpec(build_btad, BTAD_LAYOUT, BTAD_CATEGORIES, class_name="industrial product")
