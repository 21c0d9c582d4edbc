"""Evaluation: the benchmark runner (`runner`), its reports (`report`) and cost profiling (`profiling`)."""

from .. import data
from ..deprecation import Replaced, moved_names
from .profiling import ProfileRow, alternating_medians, matmul_flops, median_seconds, profile_models
from .report import results_markdown
from .runner import Cell, DatasetSpec, Protocol, ReferenceGenerator, run_benchmark

__all__ = [
    "Cell",
    "DatasetSpec",
    "ProfileRow",
    "Protocol",
    "ReferenceGenerator",
    "alternating_medians",
    "matmul_flops",
    "median_seconds",
    "profile_models",
    "results_markdown",
    "run_benchmark",
]

# The prompt class words moved to the datasets' modules (`BenchmarkSpec.class_name`).
__getattr__ = moved_names(
    __name__,
    {
        "CLASS_NAMES": Replaced(
            "hf_fsad.data.BENCHMARKS[<dataset>].class_name",
            lambda: {
                dataset: spec.class_name for dataset, spec in data.BENCHMARKS.items() if spec.class_name
            },
        ),
        "class_name_for": "hf_fsad.data.class_name_for",
    },
)
