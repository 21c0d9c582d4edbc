"""What every method's `forward` returns: `AnomalyDetectionOutput`, apart from the models as transformers keeps
its `modeling_outputs`."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.utils import ModelOutput


@dataclass
class AnomalyDetectionOutput(ModelOutput):
    """Output of every method.

    image_scores: (B,) higher = more anomalous.
    anomaly_maps: (B, H, W) at input resolution, or None for image-level-only methods.
    branch_scores: name -> (B,) per-branch image scores, to explain which cue fired.
    With a calibrated bank (`model.calibrate`), also: normalized_scores (B,) in (0, 1), 0.5 at the
    threshold; labels (B,) 1 = anomalous, exactly where normalized_scores > 0.5 (a NaN or infinite score is
    anomalous and normalises to 1.0: `hf_fsad.calibration.score_error`); anomaly_masks (B, H, W) True where
    the map is above the pixel threshold. Without one they stay None.
    """

    image_scores: torch.Tensor | None = None
    anomaly_maps: torch.Tensor | None = None
    branch_scores: dict[str, torch.Tensor] | None = None
    normalized_scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    anomaly_masks: torch.Tensor | None = None


def concatenated_outputs(outputs: list[AnomalyDetectionOutput]) -> AnomalyDetectionOutput:
    """Image scores and maps of several outputs joined along the batch, in float32 on the CPU (the other
    fields are dropped)."""
    maps = [output.anomaly_maps for output in outputs]
    return AnomalyDetectionOutput(
        image_scores=torch.cat([output.image_scores.float().cpu() for output in outputs]),
        anomaly_maps=None if maps[0] is None else torch.cat([part.float().cpu() for part in maps]),
    )
