"""`pixel_f1_max` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("pixel_f1_max"))`."""

from hf_fsad.metrics import evaluate_support


class PixelF1Max(evaluate_support.AnomalyMetric):
    metric_name = "pixel_f1_max"
