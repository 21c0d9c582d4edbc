"""Anomaly detection metrics: plain functions, and each as an `evaluate` module loadable offline.

```python
import evaluate
from hf_fsad.metrics import module_path
auroc = evaluate.load(module_path("image_auroc"))
auroc.compute(references=[0, 1, 1], predictions=[0.1, 0.8, 0.3])
```
"""

from __future__ import annotations

from pathlib import Path

from .functional import (
    IMAGE_METRICS,
    PIXEL_METRICS,
    f1_max,
    image_auprc,
    image_auroc,
    image_f1_max,
    pixel_auprc,
    pixel_aupro,
    pixel_auroc,
    pixel_f1_max,
)

METRICS = {**IMAGE_METRICS, **PIXEL_METRICS}


def module_path(name: str) -> str:
    """Path of the `evaluate` module of metric `name`, for `evaluate.load`."""
    if name not in METRICS:
        raise ValueError(f"Unknown metric {name!r}; available: {', '.join(METRICS)}.")
    return str(Path(__file__).parent / name / f"{name}.py")


__all__ = [
    "IMAGE_METRICS",
    "METRICS",
    "PIXEL_METRICS",
    "f1_max",
    "image_auprc",
    "image_auroc",
    "image_f1_max",
    "module_path",
    "pixel_auprc",
    "pixel_aupro",
    "pixel_auroc",
    "pixel_f1_max",
]
