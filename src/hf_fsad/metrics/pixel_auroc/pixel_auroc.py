"""`pixel_auroc` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("pixel_auroc"))`."""

from hf_fsad.metrics import evaluate_support


class PixelAuroc(evaluate_support.AnomalyMetric):
    metric_name = "pixel_auroc"
