"""`pixel_auprc` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("pixel_auprc"))`."""

from hf_fsad.metrics import evaluate_support


class PixelAuprc(evaluate_support.AnomalyMetric):
    metric_name = "pixel_auprc"
