"""`pixel_aupro` as an `evaluate` module: `evaluate.load(hf_fsad.metrics.module_path("pixel_aupro"))`."""

from hf_fsad.metrics import evaluate_support


class PixelAupro(evaluate_support.AnomalyMetric):
    metric_name = "pixel_aupro"
