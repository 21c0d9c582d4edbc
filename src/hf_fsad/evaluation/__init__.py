"""Evaluation: the benchmark runner (`runner`), its reports (`report`) and cost profiling (`profiling`)."""

import warnings

from .. import data
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

# The prompt class words moved to the datasets' modules (`BenchmarkSpec.class_name`): old name -> new path.
_MOVED = {
    "CLASS_NAMES": "hf_fsad.data.BENCHMARKS[<dataset>].class_name",
    "class_name_for": "hf_fsad.data.class_name_for",
}


def __getattr__(name: str):
    if name not in _MOVED:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    warnings.warn(
        f"hf_fsad.evaluation.{name} moved to {_MOVED[name]}; the old path goes in the next release.",
        DeprecationWarning,
        stacklevel=2,
    )
    if name == "class_name_for":
        return data.class_name_for
    return {dataset: spec.class_name for dataset, spec in data.BENCHMARKS.items() if spec.class_name}
