"""Evaluation: the benchmark runner (`runner`), its reports (`report`) and cost profiling (`profiling`)."""

from .profiling import ProfileRow, alternating_medians, matmul_flops, median_seconds, profile_models
from .report import results_markdown
from .runner import CLASS_NAMES, DatasetSpec, Protocol, ReferenceGenerator, class_name_for, run_benchmark

__all__ = [
    "CLASS_NAMES",
    "DatasetSpec",
    "ProfileRow",
    "Protocol",
    "ReferenceGenerator",
    "alternating_medians",
    "class_name_for",
    "matmul_flops",
    "median_seconds",
    "profile_models",
    "results_markdown",
    "run_benchmark",
]
