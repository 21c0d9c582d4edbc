"""CVC-ClinicDB, CVC-ColonDB and Kvasir-SEG: colonoscopy frames with polyp masks; every frame shows a polyp.

Layout source: the folders `images/` and `masks/` (a mask carries its frame's stem), as AF-CLIP's README and
dataset code (Faustinaqq/AF-CLIP, `dataset/{clinicdb,colondb,kvasir}.py`, folders `CVC-ClinicDB`,
`CVC-ColonDB`, `Kvasir`) and AnomalyCLIP's json generators read them; that is how Kvasir-SEG is published and
how the polyp-segmentation test sets (PraNet's `TestDataset`) ship ClinicDB and ColonDB. CVC-ClinicDB's own
release (`Original/`, `Ground Truth/`, .tif) is not this layout: rename its folders. Every frame is anomalous:
train is empty, and the sets are scored by pixel metrics only (`build_anomalous_only`).
Masks count every non-zero pixel as polyp: Kvasir-SEG's own masks are JPEG, whose compression noise
would widen them, so prefer the PNG masks of the test sets (the ones AF-CLIP reads) or binarise at 128 first.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

from .common import BenchmarkSpec, Splits, build_anomalous_only

POLYP_LAYOUT = (
    "ROOT/images/*.png|jpg and ROOT/masks/<image stem>.png|jpg (CVC-ClinicDB, CVC-ColonDB and Kvasir-SEG as "
    "the polyp-segmentation test sets ship them)"
)


def build_polyps(root: Path, category: str | None, seed: int, name: str) -> Splits:
    return build_anomalous_only(
        root, category, name, "images", "masks", ("{stem}.png", "{stem}.jpg", "{stem}.tif"), POLYP_LAYOUT
    )


CLINICDB_BENCHMARK = BenchmarkSpec(
    partial(build_polyps, name="clinicdb"), POLYP_LAYOUT, ("clinicdb",), class_name="colon"
)
COLONDB_BENCHMARK = BenchmarkSpec(
    partial(build_polyps, name="colondb"), POLYP_LAYOUT, ("colondb",), class_name="colon"
)
KVASIR_BENCHMARK = BenchmarkSpec(
    partial(build_polyps, name="kvasir"), POLYP_LAYOUT, ("kvasir",), class_name="colon"
)
