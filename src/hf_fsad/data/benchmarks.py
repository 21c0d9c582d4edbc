"""The benchmarks by name: `BENCHMARKS` (name -> `BenchmarkSpec`) and `load_benchmark(name, root, category)`.

Each dataset has its module (`mvtec_ad`, `visa`, `elpv`, ...) declaring its `BenchmarkSpec`: a builder that
reads a local folder in the dataset's published layout (`layout`), its categories and its prompt class word.
A builder scans the folder into records and builds `train` (normal images only: the pool k-shot references
are drawn from) and `test` (normal + anomalous, with masks where the dataset has them). Where a dataset has no
train/test split of its normal images, a seeded `train_fraction` (default 0.75) of them forms `train`. The
`isic`, `clinicdb`, `colondb` and `kvasir` have no normal image: `train` is empty and every test image is
anomalous (pixel metrics only, zero-shot). The `folder` benchmark reads your own images in a generic layout (`FOLDER_LAYOUT`: `good/`, one folder per defect
type, optional `masks/`).
"""

from __future__ import annotations

import os
from pathlib import Path

from datasets import DatasetDict

from ..deprecation import moved_names
from .aitex import AFID_BENCHMARK, AITEX_BENCHMARK
from .btad import BTAD_BENCHMARK
from .cifar10 import CIFAR10_BENCHMARK
from .common import BenchmarkSpec, build_dataset_dict, require_dir
from .dagm import DAGM_BENCHMARK
from .digits import MNIST_BENCHMARK, SKLEARN_DIGITS_BENCHMARK
from .dtd_synthetic import DTD_SYNTHETIC_BENCHMARK
from .elpv import ELPV_BENCHMARK
from .folder import FOLDER_BENCHMARK
from .isic import ISIC_BENCHMARK
from .ksdd import KSDD_BENCHMARK
from .medical import BR35H_BENCHMARK, BRAINMRI_BENCHMARK, HEADCT_BENCHMARK
from .mvtec_ad import MVTEC_AD_BENCHMARK
from .oct2017 import OCT2017_BENCHMARK
from .polyps import CLINICDB_BENCHMARK, COLONDB_BENCHMARK, KVASIR_BENCHMARK
from .resc import RESC_BENCHMARK
from .toy import TOY_BENCHMARK
from .visa import VISA_BENCHMARK

BENCHMARKS: dict[str, BenchmarkSpec] = {
    "mvtec_ad": MVTEC_AD_BENCHMARK,
    "visa": VISA_BENCHMARK,
    "elpv": ELPV_BENCHMARK,
    "headct": HEADCT_BENCHMARK,
    "brainmri": BRAINMRI_BENCHMARK,
    "aitex": AITEX_BENCHMARK,
    "ksdd": KSDD_BENCHMARK,
    "sdd": KSDD_BENCHMARK,
    "afid": AFID_BENCHMARK,
    "btad": BTAD_BENCHMARK,
    "dagm": DAGM_BENCHMARK,
    "dtd_synthetic": DTD_SYNTHETIC_BENCHMARK,
    "oct2017": OCT2017_BENCHMARK,
    "resc": RESC_BENCHMARK,
    "br35h": BR35H_BENCHMARK,
    "isic": ISIC_BENCHMARK,
    "clinicdb": CLINICDB_BENCHMARK,
    "colondb": COLONDB_BENCHMARK,
    "kvasir": KVASIR_BENCHMARK,
    "mnist": MNIST_BENCHMARK,
    "sklearn_digits": SKLEARN_DIGITS_BENCHMARK,
    "cifar10": CIFAR10_BENCHMARK,
    "toy": TOY_BENCHMARK,
    "folder": FOLDER_BENCHMARK,
}


def load_benchmark(
    name: str, root: str | os.PathLike | None = None, category: str | None = None, seed: int = 0, **options
) -> DatasetDict:
    """A benchmark as a DatasetDict with `train` (normal only) and `test` splits.

    name: one of `BENCHMARKS`. root: the dataset's folder in its published layout (for `folder`, your own
    images in `FOLDER_LAYOUT`), or a Hub dataset written by `push_benchmark` (`hf://datasets/<owner>/<name>`,
    or a local folder holding that layout).
    category: one category, or None for all. seed: for the datasets whose normal images are split here.
    options: builder options (e.g. `train_fraction`; for `toy`, the generator's sizes).
    """
    from .hub import is_hub_layout, load_hub_benchmark

    if name not in BENCHMARKS:
        raise ValueError(f"Unknown benchmark {name!r}; available: {', '.join(sorted(BENCHMARKS))}.")
    spec = BENCHMARKS[name]
    if root is not None and (str(root).startswith("hf://") or is_hub_layout(root)):
        return load_hub_benchmark(name, root, category)
    if root is None and spec.needs_folder:
        root = spec.default_root() if spec.default_root else None
        if root is None:
            raise ValueError(f"Benchmark {name!r} needs root=: a folder laid out as {spec.layout}")
    if root is not None:
        root = require_dir(Path(root), spec.layout)
    return build_dataset_dict(spec.build(root, category, seed, **options), name)


def class_name_for(benchmark: str, category: str) -> str:
    """The class word prompts name for `category` of `benchmark` (its `BenchmarkSpec.class_name`, else the
    category's name; a benchmark not in `BENCHMARKS` uses the category's name)."""
    spec = BENCHMARKS.get(benchmark)
    return spec.class_name_for(category) if spec else category.replace("_", " ")


# Public names this module defined before each dataset had its module: old name -> new module.
_MOVED = {
    **dict.fromkeys(("MVTEC_AD_CATEGORIES", "MVTEC_AD_LAYOUT", "build_mvtec_ad"), "mvtec_ad"),
    **dict.fromkeys(("VISA_CATEGORIES", "VISA_LAYOUT", "build_visa"), "visa"),
    **dict.fromkeys(("ELPV_LAYOUT", "elpv_package_root", "build_elpv"), "elpv"),
    "build_normal_abnormal": "medical",
    **dict.fromkeys(("AITEX_TILE_WIDTH", "AITEX_LAYOUT", "build_aitex"), "aitex"),
    **dict.fromkeys(("KSDD_LAYOUT", "build_ksdd"), "ksdd"),
    **dict.fromkeys(("MNIST_LAYOUT", "read_idx", "build_mnist", "build_sklearn_digits"), "digits"),
    **dict.fromkeys(("CIFAR10_CLASSES", "CIFAR10_LAYOUT", "read_cifar10_bin", "build_cifar10"), "cifar10"),
    "build_toy": "toy",
    **dict.fromkeys(("FOLDER_LAYOUT", "build_folder"), "folder"),
    "Splits": "common",
}

__getattr__ = moved_names(
    __name__, {name: f"hf_fsad.data.{module}.{name}" for name, module in _MOVED.items()}
)
