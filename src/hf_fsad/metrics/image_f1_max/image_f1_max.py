"""`image_f1_max` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("image_f1_max"))`."""

from hf_fsad.metrics import evaluate_support


class ImageF1Max(evaluate_support.AnomalyMetric):
    metric_name = "image_f1_max"
