"""Benchmark data as `datasets.DatasetDict`s (train = normal only, test = normal + anomalous).

One module per dataset (or family: `medical` holds HeadCT and BrainMRI, `digits` MNIST and scikit-learn's
digits) declares a `BenchmarkSpec`: its builder, folder layout, categories and prompt class word. Shared
helpers live in `common`; `benchmarks.BENCHMARKS` maps names to specs and `load_benchmark` reads them.
Adding a dataset is one new module here (its builder and `<NAME>_BENCHMARK = BenchmarkSpec(...)`, importing
only `common`) and one line in `BENCHMARKS`.
"""

from .benchmarks import BENCHMARKS, class_name_for, load_benchmark
from .common import FEATURES, BenchmarkLayoutError, BenchmarkSpec
from .hub import push_benchmark, write_hub_layout
from .sampling import ReferenceManifest, sample_references
from .toy import TOY_CATEGORIES, TOY_DEFECTS, load_toy

__all__ = [
    "BENCHMARKS",
    "FEATURES",
    "TOY_CATEGORIES",
    "TOY_DEFECTS",
    "BenchmarkLayoutError",
    "BenchmarkSpec",
    "ReferenceManifest",
    "class_name_for",
    "load_benchmark",
    "load_toy",
    "push_benchmark",
    "sample_references",
    "write_hub_layout",
]
