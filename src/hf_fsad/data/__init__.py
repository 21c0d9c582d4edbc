"""Benchmark data as `datasets.DatasetDict`s (train = normal only, test = normal + anomalous)."""

from .toy import TOY_CATEGORIES, TOY_DEFECTS, load_toy

__all__ = ["TOY_CATEGORIES", "TOY_DEFECTS", "load_toy"]
