"""What a benchmark cell records beside its scores: threshold-free metrics, the decisions at its calibrated
threshold, and its calibration (shared by untiled and tiled cells)."""

from __future__ import annotations

import dataclasses
import time

import numpy as np

from ..bank import ReferenceBank
from ..calibration import KEPT_SCORE_FIELDS
from ..metrics import IMAGE_METRICS, PIXEL_METRICS


def metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None
) -> dict:
    """Every image metric of the test `scores` (None when the test images are all of one class, as in the
    segmentation sets ISIC and the polyp sets), and every pixel metric of the `maps` (None without masks or
    maps)."""
    both_classes = len(np.unique(labels)) == 2
    values = {
        name: function(labels, scores) if both_classes else None for name, function in IMAGE_METRICS.items()
    }
    for name, function in PIXEL_METRICS.items():
        # None without pixel labels, or for image-level methods (no maps)
        values[name] = function(masks, maps) if masks is not None and maps is not None else None
    return values


def calibration_record(
    bank: ReferenceBank,
    note: str | None,
    warnings: list[str],
    started: float,
    false_alarm_rate: float,
    notes: list[str],
) -> dict:
    """The cell's calibration record: the thresholds of `bank`'s calibration unless `note` says why it has
    none, the note or the calibration's `warnings`, the seconds since `started`, the rate it was set for and the
    bank's `notes`."""
    return {
        "target_false_alarm_rate": false_alarm_rate,
        "calibration": None  # its thresholds; the scores they were fitted to stay in the bank
        if note
        else {
            name: value
            for name, value in dataclasses.asdict(bank.calibration).items()
            if name not in KEPT_SCORE_FIELDS
        },
        "calibration_note": note or " ".join(warnings) or None,
        "calibration_seconds": None if note else time.perf_counter() - started,
        "bank_notes": notes,
    }


def decisions(calibration: dict | None, labels: np.ndarray, scores: np.ndarray) -> dict:
    """Image F1, false-alarm and miss rates of the test images at the calibrated threshold ("anomalous when
    the score is above it", as `Calibration.labels`), and the false-alarm rate the estimator promised; all
    None without a calibration."""
    if calibration is None:
        return dict.fromkeys(("calibrated_f1", "false_alarm_rate", "miss_rate", "false_alarm_bound"))
    anomalous, flagged = labels != 0, scores.astype(np.float64) > calibration["image_threshold"]
    true_positives = int((flagged & anomalous).sum())
    return {
        "calibrated_f1": 2 * true_positives / int(flagged.sum() + anomalous.sum()),
        "false_alarm_rate": float(flagged[~anomalous].mean()),
        "miss_rate": float((~flagged[anomalous]).mean()),
        "false_alarm_bound": calibration["false_alarm_bound"],
    }
