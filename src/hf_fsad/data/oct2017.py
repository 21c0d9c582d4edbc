"""OCT2017: retinal OCT scans, normal or with one of three diseases (Kermany et al., Cell 2018), image labels
only.

Layout source: the published release (Mendeley data / Kaggle "kermany2018", folder `OCT2017`): `train/` and
`test/`, each with one folder per diagnosis, NORMAL, CNV, DME and DRUSEN. One-to-Normal's Table 2 cites this
dataset without stating its split; here train/NORMAL is the reference pool and test/ the test set (250 scans
per diagnosis), the diseases the anomalies. BMAD's reorganisation of OCT2017 (train/good, test/{good,Ungood})
is another layout, not read here. The diseased scans of train/ and the optional val/ folder are not used.
"""

from __future__ import annotations

from pathlib import Path

from .common import (
    BenchmarkLayoutError,
    BenchmarkSpec,
    Splits,
    choose_categories,
    folder_records,
    require_dir,
)

OCT2017_DISEASES = ("CNV", "DME", "DRUSEN")

OCT2017_LAYOUT = (
    "ROOT/train/NORMAL/*.jpeg and ROOT/test/{NORMAL,CNV,DME,DRUSEN}/*.jpeg (the published OCT2017 folders; "
    "ROOT/train/{CNV,DME,DRUSEN} and ROOT/val are not used)"
)


def build_oct2017(root: Path, category: str | None, seed: int) -> Splits:
    choose_categories(["oct2017"], category, root, OCT2017_LAYOUT)
    test_dir = require_dir(root / "test", OCT2017_LAYOUT)
    unknown = sorted(
        d.name for d in test_dir.iterdir() if d.is_dir() and d.name not in ("NORMAL", *OCT2017_DISEASES)
    )
    if unknown:
        raise BenchmarkLayoutError(
            f"{test_dir} has the folder(s) {', '.join(unknown)}, not a diagnosis of OCT2017. "
            f"Expected layout: {OCT2017_LAYOUT}"
        )
    test = folder_records(root, test_dir / "NORMAL", "oct2017", "good", OCT2017_LAYOUT)
    for disease in OCT2017_DISEASES:
        test += folder_records(root, test_dir / disease, "oct2017", disease.lower(), OCT2017_LAYOUT)
    return {
        "train": folder_records(root, root / "train" / "NORMAL", "oct2017", "good", OCT2017_LAYOUT),
        "test": test,
    }


OCT2017_BENCHMARK = BenchmarkSpec(build_oct2017, OCT2017_LAYOUT, ("oct2017",), class_name="retinal OCT scan")
