"""The `evaluate.Metric` behind every module in `hf_fsad/metrics/<name>/<name>.py`.

Image metrics take `predictions` (scores) and `references` (0 normal, 1 anomalous) per image; pixel metrics
take per-image anomaly maps and masks (2-D lists or arrays of one shape).
"""

from __future__ import annotations

import datasets
import evaluate
import numpy as np

from .functional import IMAGE_METRICS, PIXEL_METRICS

_CITATION = "hf_fsad (https://github.com/hf-fsad/hf_fsad)"


class AnomalyMetric(evaluate.Metric):
    """Set `metric_name` (a key of IMAGE_METRICS or PIXEL_METRICS) in a subclass."""

    metric_name: str

    def _info(self) -> evaluate.MetricInfo:
        function = {**IMAGE_METRICS, **PIXEL_METRICS}[self.metric_name]
        if self.metric_name in IMAGE_METRICS:
            features = {"predictions": datasets.Value("float64"), "references": datasets.Value("int32")}
        else:
            features = {
                "predictions": datasets.Sequence(datasets.Sequence(datasets.Value("float64"))),
                "references": datasets.Sequence(datasets.Sequence(datasets.Value("int32"))),
            }
        return evaluate.MetricInfo(
            description=function.__doc__,
            citation=_CITATION,
            inputs_description=__doc__,
            features=datasets.Features(features),
        )

    def _compute(self, predictions, references, **options) -> dict[str, float]:
        function = {**IMAGE_METRICS, **PIXEL_METRICS}[self.metric_name]
        return {self.metric_name: function(np.asarray(references), np.asarray(predictions), **options)}
