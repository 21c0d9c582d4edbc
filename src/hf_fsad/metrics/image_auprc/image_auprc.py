"""`image_auprc` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("image_auprc"))`."""

from hf_fsad.metrics import evaluate_support


class ImageAuprc(evaluate_support.AnomalyMetric):
    metric_name = "image_auprc"
