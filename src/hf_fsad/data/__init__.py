"""Benchmark data as `datasets.DatasetDict`s (train = normal only, test = normal + anomalous)."""

from .benchmarks import BENCHMARKS, load_benchmark
from .common import FEATURES, BenchmarkLayoutError
from .hub import push_benchmark, write_hub_layout
from .sampling import ReferenceManifest, sample_references
from .toy import TOY_CATEGORIES, TOY_DEFECTS, load_toy

__all__ = [
    "BENCHMARKS",
    "FEATURES",
    "TOY_CATEGORIES",
    "TOY_DEFECTS",
    "BenchmarkLayoutError",
    "ReferenceManifest",
    "load_benchmark",
    "load_toy",
    "push_benchmark",
    "sample_references",
    "write_hub_layout",
]
