"""RESC (Retinal Edema Segmentation Challenge): retinal OCT scans, normal or with edema, with pixel masks.

Layout source: the RESC release of the BMAD benchmark (Bao et al. 2023, DorisBao/BMAD), as BMAD's own loaders
read it (`MKD/data.py`: `RESC/Train/train/good`, `RESC/Val/val/{good,Ungood}` with `Val/val_label/Ungood`,
and `Test/test`, `Test/test_label` alike; 4,297 training scans, 1,805 test scans of which 764 abnormal).
Uncertain: One-to-Normal's Table 2 cites RESC (Hu et al. 2019) without naming the release or split it used; the
challenge's own release (behind a request form) and MVFA's reorganisation (`Retina_RESC_AD/{valid,test}/
{good,Ungood}/{img,anomaly_mask}`) are other layouts, not read here. Masks carry their image's file name.
"""

from __future__ import annotations

from pathlib import Path

from .common import BenchmarkSpec, Splits, choose_categories, folder_records

RESC_LAYOUT = (
    "ROOT/Train/train/good/*.png, ROOT/Test/test/{good,Ungood}/*.png, ROOT/Test/test_label/Ungood/<image "
    "name>.png (BMAD's RESC release; ROOT/Val is not used)"
)


def build_resc(root: Path, category: str | None, seed: int) -> Splits:
    choose_categories(["resc"], category, root, RESC_LAYOUT)
    test = root / "Test"
    return {
        "train": folder_records(root, root / "Train" / "train" / "good", "resc", "good", RESC_LAYOUT),
        "test": folder_records(root, test / "test" / "good", "resc", "good", RESC_LAYOUT)
        + folder_records(
            root, test / "test" / "Ungood", "resc", "edema", RESC_LAYOUT, test / "test_label" / "Ungood"
        ),
    }


RESC_BENCHMARK = BenchmarkSpec(build_resc, RESC_LAYOUT, ("resc",), class_name="retinal OCT scan")
