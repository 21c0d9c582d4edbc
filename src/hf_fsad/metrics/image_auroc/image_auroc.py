"""`image_auroc` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("image_auroc"))`."""

from hf_fsad.metrics import evaluate_support


class ImageAuroc(evaluate_support.AnomalyMetric):
    metric_name = "image_auroc"
