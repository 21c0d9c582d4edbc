"""From scores to decisions: calibrated thresholds and normalised scores for every method.

Raw scores change scale with the method, the backbone and the category; a production line needs one rule.
A `Calibration` holds an image threshold (an image is anomalous when its score is above it), optionally a
pixel threshold (a pixel is anomalous when its map value is above it) and the scales of a logistic
normalisation that maps each threshold to 0.5, so one rule ("fail above 0.5") works for every method.

Two estimators, chosen by the data given:

- **false-alarm rate** (normal images only): the split-conformal threshold. With n normal calibration
  scores and a new normal score exchangeable with them, the new score's rank among the n + 1 is uniform, so
  the j-th smallest calibration score, j = ceil((n + 1)(1 - alpha)), is exceeded by a new normal image with
  probability at most (n - j + 1) / (n + 1) <= alpha (Vovk et al., "Algorithmic Learning in a Random
  World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", arXiv:2107.07511).
  The guarantee is in expectation over calibration sets, not for every set. With n < 1 / alpha - 1 scores
  no order statistic reaches alpha: the threshold is the largest score and the guarantee 1 / (n + 1),
  which `false_alarm_bound` records (and `calibrate` warns).
- **best F1** (normal and anomalous images): the threshold with the highest F1 on the calibration scores,
  as anomalib's adaptive threshold, placed halfway between the two calibration scores it separates. It is
  fitted to the data, so it carries no guarantee; `calibration_false_alarm_rate` is its rate on them.

Pixel threshold: best pixel F1 when anomalous masks are given; otherwise the conformal threshold on the
normal images' map maxima, so a normal image shows any anomalous pixel with probability <= the bound.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass
from fractions import Fraction

import numpy as np
import torch

from .modeling_outputs import AnomalyDetectionOutput

RULES = ("false_alarm_rate", "best_f1")
NORMAL_SOURCES = ("leave_one_out", "held_out")
# The logistic scale puts the median normal calibration score at this normalised score.
MEDIAN_NORMAL_LEVEL = 0.1


def conformal_threshold(normal_scores: np.ndarray, false_alarm_rate: float) -> tuple[float, float]:
    """(threshold, guaranteed false-alarm rate): the j-th smallest of the n scores, j = ceil((n + 1)(1 -
    false_alarm_rate)) capped at n, and (n - j + 1) / (n + 1), the rate a new exchangeable normal score
    exceeds it with at most."""
    scores = _finite(normal_scores, "normal calibration scores")
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), got {false_alarm_rate}.")
    n = scores.size
    # (n + 1)(1 - alpha) in exact arithmetic: alpha = 0.05 with n = 19 must give j = 19, not 20
    rank = math.ceil((n + 1) * (1 - Fraction(str(false_alarm_rate))))
    rank = min(max(rank, 1), n)
    return float(np.sort(scores)[rank - 1]), (n - rank + 1) / (n + 1)


def best_f1_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """(threshold, F1): the cut with the best F1 for "anomalous when score > threshold", halfway between the
    lowest score it calls anomalous and the next lower score; among equal F1, the highest threshold (fewest
    alarms). Needs both classes and two distinct scores."""
    scores = _finite(scores, "calibration scores")
    labels = np.asarray(labels).ravel() != 0
    if labels.shape != scores.shape:
        raise ValueError(f"{labels.size} labels for {scores.size} scores.")
    if labels.all() or not labels.any():
        raise ValueError("A best-F1 threshold needs both normal and anomalous samples.")
    order = np.argsort(-scores, kind="stable")
    descending, positives = scores[order], labels[order]
    true_positives = np.cumsum(positives)
    predicted = np.arange(1, scores.size + 1)
    # a cut can only fall between two distinct scores: after the last of each run of equal scores
    cuts = np.flatnonzero(descending[:-1] > descending[1:])
    if cuts.size == 0:
        raise ValueError("All calibration scores are equal: no threshold separates them.")
    f1 = 2 * true_positives[cuts] / (predicted[cuts] + labels.sum())
    best = cuts[np.argmax(f1)]
    return float((descending[best] + descending[best + 1]) / 2), float(f1.max())


def logistic_scale(threshold: float, normal_scores: np.ndarray) -> float:
    """The scale that puts the median normal score at `MEDIAN_NORMAL_LEVEL` after normalisation; when the
    median is not below the threshold, the spread of the scores (or 1 when they are all equal)."""
    scores = _finite(normal_scores, "normal calibration scores")
    below = threshold - float(np.median(scores))
    if below > 0:
        return below / math.log(1 / MEDIAN_NORMAL_LEVEL - 1)
    spread = float(scores.std())
    return spread if spread > 0 else 1.0


@dataclass(frozen=True)
class Calibration:
    """A calibrated decision rule (see the module docstring), stored in the reference bank's metadata.

    image_threshold / pixel_threshold: raw-score cuts ("anomalous when above"); pixel None when the method
    has no maps. image_scale / pixel_scale: logistic scales of the normalised scores. rule / pixel_rule:
    "false_alarm_rate" (conformal) or "best_f1". normal_source: "leave_one_out" (each reference scored
    against a bank of the others) or "held_out" (normal images outside the bank). target_false_alarm_rate:
    the alpha asked for; false_alarm_bound: the conformal guarantee of the image threshold (None for best
    F1); calibration_false_alarm_rate / calibration_f1: measured on the calibration images.
    """

    image_threshold: float
    image_scale: float
    rule: str
    normal_source: str
    num_normal: int
    num_anomalous: int
    target_false_alarm_rate: float
    false_alarm_bound: float | None
    calibration_false_alarm_rate: float
    calibration_f1: float | None = None
    pixel_threshold: float | None = None
    pixel_scale: float | None = None
    pixel_rule: str | None = None

    def __post_init__(self):
        problems = []
        for name in (
            "image_threshold",
            "image_scale",
            "target_false_alarm_rate",
            "calibration_false_alarm_rate",
        ):
            if not _is_finite_number(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in ("false_alarm_bound", "calibration_f1", "pixel_threshold", "pixel_scale"):
            value = getattr(self, name)
            if value is not None and not _is_finite_number(value):
                problems.append(f"{name} must be a finite number or null, got {value!r}")
        for name in ("image_scale", "pixel_scale"):
            value = getattr(self, name)
            if _is_finite_number(value) and value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if self.rule not in RULES:
            problems.append(f"rule must be one of {RULES}, got {self.rule!r}")
        if self.pixel_rule not in (None, *RULES):
            problems.append(f"pixel_rule must be one of {RULES} or null, got {self.pixel_rule!r}")
        if (self.pixel_threshold is None) != (self.pixel_scale is None) or (
            (self.pixel_threshold is None) != (self.pixel_rule is None)
        ):
            problems.append("pixel_threshold, pixel_scale and pixel_rule must be given together")
        if self.normal_source not in NORMAL_SOURCES:
            problems.append(f"normal_source must be one of {NORMAL_SOURCES}, got {self.normal_source!r}")
        for name in ("num_normal", "num_anomalous"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                problems.append(f"{name} must be a non-negative integer, got {value!r}")
        if problems:
            raise ValueError("Invalid calibration: " + "; ".join(problems) + ".")

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse `to_json` output; a ValueError names what is missing, unknown or invalid."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Invalid calibration: not JSON ({error}).") from None
        if not isinstance(fields, dict):
            raise TypeError("Invalid calibration: not a JSON object.")
        unknown = set(fields) - set(cls.__dataclass_fields__)
        missing = {
            name for name, field in cls.__dataclass_fields__.items() if field.default is MISSING
        } - set(fields)
        if unknown or missing:
            problems = [f"unknown fields {sorted(unknown)}"] if unknown else []
            problems += [f"missing fields {sorted(missing)}"] if missing else []
            raise ValueError("Invalid calibration: " + "; ".join(problems) + ".")
        return cls(**fields)

    def normalize(self, image_scores: torch.Tensor) -> torch.Tensor:
        """Scores in (0, 1), strictly increasing in the raw score; the image threshold maps to 0.5."""
        return torch.sigmoid((image_scores.double() - self.image_threshold) / self.image_scale).float()

    def normalize_maps(self, anomaly_maps: torch.Tensor) -> torch.Tensor:
        """Maps on the pixel threshold's logistic scale: 0.5 at the pixel threshold (needs one)."""
        if self.pixel_threshold is None:
            raise ValueError("This calibration has no pixel threshold (the method gives no anomaly maps).")
        return torch.sigmoid((anomaly_maps.double() - self.pixel_threshold) / self.pixel_scale).float()

    def labels(self, image_scores: torch.Tensor) -> torch.Tensor:
        """1 where the image is anomalous (score above the threshold), else 0."""
        return (image_scores.double() > self.image_threshold).long()

    def masks(self, anomaly_maps: torch.Tensor | None) -> torch.Tensor | None:
        """True where a pixel is anomalous (map above the pixel threshold); None without maps or threshold."""
        if anomaly_maps is None or self.pixel_threshold is None:
            return None
        return anomaly_maps.double() > self.pixel_threshold

    def describe(self) -> str:
        """One line for logs and reports: the rule, the data and what the threshold promises."""
        data = f"{self.num_normal} {self.normal_source.replace('_', '-')} normal scores"
        data += f" and {self.num_anomalous} anomalous" if self.num_anomalous else ""
        if self.rule == "best_f1":
            return (
                f"best-F1 threshold {self.image_threshold:.6g} from {data} (F1 {self.calibration_f1:.3f}, "
                f"false alarms on them {self.calibration_false_alarm_rate:.1%}; no guarantee)"
            )
        return (
            f"conformal threshold {self.image_threshold:.6g} from {data}: false-alarm rate <= "
            f"{self.false_alarm_bound:.1%} (asked {self.target_false_alarm_rate:.1%})"
        )


def fit_calibration(
    normal_scores: torch.Tensor,
    normal_maps: torch.Tensor | None,
    anomalous_scores: torch.Tensor | None = None,
    anomalous_maps: torch.Tensor | None = None,
    anomalous_masks: torch.Tensor | None = None,
    *,
    normal_source: str,
    false_alarm_rate: float,
) -> Calibration:
    """The `Calibration` of calibration images' scores (N,) / (A,) and maps (N, H, W) / (A, H, W): conformal
    thresholds from the normals alone, best-F1 ones where anomalous scores (image) or masks (pixel) are
    given (see the module docstring)."""
    normal_scores = normal_scores.double().cpu().numpy().ravel()
    if anomalous_scores is None:
        image_threshold, bound = conformal_threshold(normal_scores, false_alarm_rate)
        rule, f1 = "false_alarm_rate", None
    else:
        anomalous_scores = anomalous_scores.double().cpu().numpy().ravel()
        labels = np.r_[np.zeros(normal_scores.size), np.ones(anomalous_scores.size)]
        image_threshold, f1 = best_f1_threshold(labels, np.r_[normal_scores, anomalous_scores])
        bound, rule = None, "best_f1"
    pixel = {}
    if normal_maps is not None:
        normal_maxima = normal_maps.flatten(1).amax(1).double().cpu().numpy()
        if anomalous_masks is None:
            pixel_threshold, _ = conformal_threshold(normal_maxima, false_alarm_rate)
            pixel_rule = "false_alarm_rate"
        else:
            masks = torch.as_tensor(anomalous_masks).cpu() != 0
            if anomalous_maps is None or masks.shape != anomalous_maps.shape:
                raise ValueError(
                    f"anomalous_masks have shape {tuple(masks.shape)}, but the anomalous anomaly maps are "
                    f"{None if anomalous_maps is None else tuple(anomalous_maps.shape)} (one mask per "
                    "anomalous image, at the input size)."
                )
            if not masks.any():
                raise ValueError("anomalous_masks mark no defect pixel: a pixel threshold needs some.")
            maps = torch.cat([normal_maps.cpu(), anomalous_maps.cpu()]).double().numpy().ravel()
            pixel_labels = np.r_[np.zeros(normal_maps.numel()), masks.numpy().ravel()]
            pixel_threshold, _ = best_f1_threshold(pixel_labels, maps)
            pixel_rule = "best_f1"
        pixel = {
            "pixel_threshold": pixel_threshold,
            "pixel_scale": logistic_scale(pixel_threshold, normal_maxima),
            "pixel_rule": pixel_rule,
        }
    return Calibration(
        image_threshold=image_threshold,
        image_scale=logistic_scale(image_threshold, normal_scores),
        rule=rule,
        normal_source=normal_source,
        num_normal=int(normal_scores.size),
        num_anomalous=0 if anomalous_scores is None else int(anomalous_scores.size),
        target_false_alarm_rate=false_alarm_rate,
        false_alarm_bound=bound,
        calibration_false_alarm_rate=float((normal_scores > image_threshold).mean()),
        calibration_f1=f1,
        **pixel,
    )


def _finite(values, what: str) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    if array.size == 0:
        raise ValueError(f"No {what}: calibration needs at least one.")
    if not np.isfinite(array).all():
        raise ValueError(f"The {what} contain NaN or infinite values.")
    return array


def _is_finite_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def apply_calibration(output: AnomalyDetectionOutput, calibration: Calibration) -> AnomalyDetectionOutput:
    """`output` with the calibrated decisions: normalised scores, labels and (with a pixel threshold) masks."""
    return AnomalyDetectionOutput(
        image_scores=output.image_scores,
        anomaly_maps=output.anomaly_maps,
        branch_scores=output.branch_scores,
        normalized_scores=calibration.normalize(output.image_scores),
        labels=calibration.labels(output.image_scores),
        anomaly_masks=calibration.masks(output.anomaly_maps),
    )
