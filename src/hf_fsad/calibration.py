"""From scores to decisions: calibrated thresholds and normalised scores for every method.

Raw scores change scale with the method, the backbone and the category; a production line needs one rule.
A `Calibration` holds an image threshold (an image is anomalous when its score is above it), optionally a
pixel threshold (a pixel is anomalous when its map value is above it) and the scales of a normalisation that
maps each threshold to 0.5, so one rule ("fail above 0.5") works for every method.

Two rules (`rule`), the false-alarm rate by default with or without anomalous images:

- **false-alarm rate**: the split-conformal threshold on the normal scores. With n normal calibration
  scores and a new normal score exchangeable with them, the new score's rank among the n + 1 is uniform, so
  the j-th smallest calibration score, j = ceil((n + 1)(1 - alpha)), is exceeded by a new normal image with
  probability at most (n - j + 1) / (n + 1) <= alpha (Vovk et al., "Algorithmic Learning in a Random
  World", 2005; Angelopoulos & Bates, "A Gentle Introduction to Conformal Prediction", arXiv:2107.07511).
  The guarantee is in expectation over calibration sets, not for each set. With a `confidence` c, j is
  instead the smallest rank whose realised false-alarm rate, Beta(n + 1 - j, j) distributed over the draw
  of the calibration set (Vovk, "Conditional validity of inductive conformal predictors", 2012), is at most
  alpha with probability >= c. When even the largest score cannot promise what is asked (n < 1 / alpha - 1;
  with c: 1 - (1 - alpha)^n < c), the threshold is the largest score and `normals_needed` records how many
  normal scores would (and `calibrate` warns). Anomalous scores do not move it: of the thresholds that keep
  the promise it is the lowest, so it catches the most defects at the guaranteed rate, and
  `calibration_miss_rate` is the share of the given anomalous scores at or below it.
- **best F1** (asked for, needs anomalous images): the threshold with the highest F1 on the calibration
  scores, as anomalib's adaptive threshold, placed halfway between the two calibration scores it separates.
  It is fitted to the data, so it carries no guarantee (`calibration_false_alarm_rate` is its rate on
  them), and it depends on the share of defects among the calibration images: more defects pull it down,
  towards more false alarms, whatever the rate on the line.

Pixel threshold: under the best-F1 rule with anomalous masks, the best pixel F1; otherwise the conformal
threshold on the normal images' map maxima, so a normal image shows any anomalous pixel with probability <=
the bound (pixel F1 would pay false-alarm pixels on normal parts for defect pixels covered, which the
false-alarm rule does not promise).

Normalised score: with z = (score - threshold) / scale, normalized = 1/2 + z / (2 (1 + |z|)), the logistic
of the log-odds sign(z) log(1 + 2 |z|). It is 0.5 at the threshold and strictly increasing, and its tails
approach 0 and 1 like 1 / |z| instead of exponentially, so float32 tells apart scores 1 % apart up to about
100,000 scales above the threshold (a logistic reads exactly 1.0 from about 37 scales in float64). The
scale puts the median normal calibration score at `MEDIAN_NORMAL_LEVEL` (z = -4), but at least
`MIN_RELATIVE_SCALE` times |threshold| (normal scores packed within a hair of each other would otherwise
make every defect read 1); when the median is not below the threshold (one normal, equal normals) it is
`FALLBACK_RELATIVE_SCALE` times |threshold|. The label and the normalised score agree exactly:
`label == (normalized > 0.5)` in float32 and float64. A score at the threshold is normal and reads 0.5 (or
just below), one above it reads at least the next float above 0.5, and a finite score stays below 1. An
optional review band (`in_review_band`) turns the verdict of parts whose normalised score lies within a
half-width of 0.5 into "review".

Non-finite scores: a NaN or infinite image score means the model's output cannot be trusted, so the part
fails: its label is anomalous, its normalised score 1.0 exactly and `score_error` says why (records written
as JSON carry it as `error`, and the score as null: `hf_fsad.io.json_safe`). A NaN map pixel is anomalous.

Calibration scores: the calibration keeps the scores it was fitted to (normal scores, normal map maxima,
anomalous scores), so a report can be drawn from a saved bank (`hf_fsad.calibration_report`) and held-out
normals added later pooled with them (`hf_fsad.calibration_report.pooled_calibration`).

Format: `to_json` writes `format_version` (`CALIBRATION_FORMAT_VERSION`); `from_json` reads every earlier
version (fields added later take their defaults) and refuses a later one, naming both versions.
"""

from __future__ import annotations

import json
import math
from dataclasses import MISSING, asdict, dataclass, field
from fractions import Fraction

import numpy as np
import torch

from .deploy.image_files import score_error  # noqa: F401  (the runner of an export writes the same error)
from .modeling_outputs import AnomalyDetectionOutput

RULES = ("false_alarm_rate", "best_f1")
NORMAL_SOURCES = ("leave_one_out", "held_out")
PRECISIONS = ("float32", "bfloat16", "float16", "int8")
# 2: the normalisation decays like 1 / distance (1: a logistic), `confidence`, `normals_needed`, `runtime` and
# `precision`. 3: the calibration scores (`normal_scores`, `normal_map_maxima`, `anomalous_scores`).
CALIBRATION_FORMAT_VERSION = 3
# The calibration scores a `Calibration` keeps beside its thresholds (format version 3).
KEPT_SCORE_FIELDS = ("normal_scores", "normal_map_maxima", "anomalous_scores")
# The normalised score the median normal calibration score reads (z = 1 - 1 / (2 level) = -4).
MEDIAN_NORMAL_LEVEL = 0.1
# The scale is at least this share of |threshold|: float32 tells defects 1 % apart up to 100 times it.
MIN_RELATIVE_SCALE = 1e-3
# The scale, as a share of |threshold|, when the normal scores give none: 10 % above the threshold reads 0.75.
FALLBACK_RELATIVE_SCALE = 0.1


def conformal_rank(num_scores: int, false_alarm_rate: float, confidence: float | None = None) -> int:
    """j, the rank (1 = smallest) of the conformal threshold among `num_scores` normal scores, capped at n.

    Without `confidence`: j = ceil((n + 1)(1 - false_alarm_rate)), so a new normal score exceeds it with
    probability (n - j + 1) / (n + 1) <= false_alarm_rate on average over calibration sets. With it: the
    smallest j whose realised false-alarm rate, Beta(n + 1 - j, j) over the calibration draw, is at most
    `false_alarm_rate` with probability >= `confidence`.
    """
    _check_rates(false_alarm_rate, confidence)
    if confidence is None:
        # (n + 1)(1 - alpha) in exact arithmetic: alpha = 0.05 with n = 19 must give j = 19, not 20
        rank = math.ceil((num_scores + 1) * (1 - Fraction(str(false_alarm_rate))))
        return min(max(rank, 1), num_scores)
    ranks = np.arange(1, num_scores + 1)
    reached = np.flatnonzero(probability_within_target(num_scores, ranks, false_alarm_rate) >= confidence)
    return int(ranks[reached[0]]) if reached.size else num_scores


def normals_needed(false_alarm_rate: float, confidence: float | None = None) -> int:
    """The fewest normal scores whose largest is a threshold that keeps the promise: n >= 1 / alpha - 1
    (on average), or 1 - (1 - alpha)^n >= confidence (with `confidence`)."""
    _check_rates(false_alarm_rate, confidence)
    if confidence is None:
        return max(math.ceil(1 / Fraction(str(false_alarm_rate)) - 1), 1)
    count = max(math.ceil(math.log1p(-confidence) / math.log1p(-false_alarm_rate)) - 1, 1)
    # the closed form may round low
    while probability_within_target(count, count, false_alarm_rate) < confidence:
        count += 1
    return count


def probability_within_target(num_scores: int, rank, false_alarm_rate: float):
    """P(realised false-alarm rate <= false_alarm_rate) for the `rank`-th smallest of `num_scores` scores: the
    rate is Beta(n + 1 - j, j) distributed over the draw of the calibration scores."""
    from scipy.stats import beta

    return beta.cdf(false_alarm_rate, num_scores + 1 - np.asarray(rank), rank)


def _check_rates(false_alarm_rate: float, confidence: float | None) -> None:
    if not 0 < false_alarm_rate < 1:
        raise ValueError(f"false_alarm_rate must lie in (0, 1), got {false_alarm_rate}.")
    if confidence is not None and not 0 < confidence < 1:
        raise ValueError(f"confidence must lie in (0, 1) or be None, got {confidence}.")


def conformal_threshold(
    normal_scores: np.ndarray, false_alarm_rate: float, confidence: float | None = None
) -> tuple[float, float]:
    """(threshold, guaranteed false-alarm rate): the j-th smallest of the n scores (`conformal_rank`) and
    (n - j + 1) / (n + 1), the rate a new exchangeable normal score exceeds it with on average."""
    scores = _finite(normal_scores, "normal calibration scores")
    n = scores.size
    rank = conformal_rank(n, false_alarm_rate, confidence)
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
    """The normalisation's scale (module docstring): the one that puts the median normal score at
    `MEDIAN_NORMAL_LEVEL`, at least `MIN_RELATIVE_SCALE` |threshold|; when the median is not below the
    threshold, `FALLBACK_RELATIVE_SCALE` |threshold| (1 for a threshold of exactly 0, which has no size)."""
    scores = _finite(normal_scores, "normal calibration scores")
    below = threshold - float(np.median(scores))
    if below > 0:
        median_distance = 1 / (2 * MEDIAN_NORMAL_LEVEL) - 1  # |z| at which the normalised score is the level
        return max(below / median_distance, MIN_RELATIVE_SCALE * abs(threshold))
    return FALLBACK_RELATIVE_SCALE * abs(threshold) or 1.0


def normalize_around(values: torch.Tensor, threshold: float, scale: float) -> torch.Tensor:
    """`values` normalised around `threshold` (module docstring), in float64 for float64 input, else float32.

    Above the threshold (or not finite) the result is at least the next float above 0.5, at or below it at
    most 0.5, so `result > 0.5` is exactly `exceeds_threshold(values, threshold)`; a finite value stays
    below 1 and a non-finite one reads 1.0.
    """
    dtype = torch.float64 if values.dtype == torch.float64 else torch.float32
    distance = (values.double() - threshold) / scale
    tail = 0.5 / (1 + distance.abs())  # each side's distance to 0 or 1, without cancellation below 0.5
    result = torch.where(distance > 0, 1 - tail, tail).to(dtype)
    half, one = torch.tensor(0.5, dtype=dtype), torch.tensor(1.0, dtype=dtype)
    result = result.clamp(max=torch.nextafter(one, half).item())
    result = torch.where(
        exceeds_threshold(values, threshold), result.clamp(min=torch.nextafter(half, one).item()), result
    )
    return result.masked_fill(~torch.isfinite(values), 1.0)


def score_at_level(level: float, threshold: float, scale: float) -> float:
    """The raw value that `normalize_around(., threshold, scale)` maps to `level` in (0, 1): its inverse, e.g.
    the ends of a colour scale over normalised levels 0.01 to 0.99."""
    if not 0 < level < 1:
        raise ValueError(f"A normalised level lies in (0, 1), got {level}.")
    distance = 1 / (2 * (1 - level)) - 1 if level > 0.5 else 1 - 1 / (2 * level)
    return threshold + scale * distance


def exceeds_threshold(values: torch.Tensor, threshold: float) -> torch.Tensor:
    """True where a value is above `threshold` or not finite (a NaN or infinite score cannot be trusted)."""
    return (values.double() > threshold) | ~torch.isfinite(values)


def check_review_band(review_band: float) -> None:
    """A ValueError unless `review_band` is a half-width in (0, 0.5) of normalised-score units."""
    if not (_is_finite_number(review_band) and 0 < review_band < 0.5):
        raise ValueError(
            "review_band is a half-width around 0.5 in normalised-score units, in (0, 0.5); got "
            f"{review_band!r}."
        )


def in_review_band(normalized_scores: torch.Tensor, review_band: float) -> torch.Tensor:
    """True where a normalised score lies within `review_band` of the threshold's 0.5, both ends included:
    0.5 - review_band <= normalized <= 0.5 + review_band, compared in float64. Such a part reads "review"
    instead of pass or fail; outside the band the verdict is the label, `normalized > 0.5`. A non-finite
    score (normalised 1.0) is never in the band, since review_band < 0.5."""
    check_review_band(review_band)
    values = normalized_scores.double()
    return (values >= 0.5 - review_band) & (values <= 0.5 + review_band)


@dataclass(frozen=True)
class Calibration:
    """A calibrated decision rule (see the module docstring), stored in the reference bank's metadata.

    image_threshold / pixel_threshold: raw-score cuts ("anomalous when above"); pixel None when the method
    has no maps. image_scale / pixel_scale: logistic scales of the normalised scores. rule / pixel_rule:
    "false_alarm_rate" (conformal) or "best_f1". normal_source: "leave_one_out" (each reference scored
    against a bank of the others) or "held_out" (normal images outside the bank). target_false_alarm_rate:
    the alpha asked for; false_alarm_bound: the conformal guarantee of the image threshold (None for best
    F1); calibration_false_alarm_rate / calibration_f1: measured on the calibration images;
    calibration_miss_rate: the share of the anomalous calibration images at or below the image threshold
    (None without anomalous images). confidence: the
    probability asked for the false-alarm rate to stay within the target (None: on average); normals_needed:
    how many normal scores the promise asked would need, when the threshold had too few (else None).
    runtime / precision: where the calibration scores were computed ("torch" or an exported runtime; the
    CLI's --precision), which the scores it judges must match (`hf_fsad.calibration_policy`).
    normal_scores / normal_map_maxima / anomalous_scores: the calibration scores it was fitted to, in order
    (maxima None without maps, anomalous None without anomalous images; all None in files before format
    version 3).
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
    confidence: float | None = None
    normals_needed: int | None = None
    calibration_miss_rate: float | None = None
    runtime: str = "torch"
    precision: str = "float32"
    normal_scores: tuple[float, ...] | None = field(default=None, repr=False)
    normal_map_maxima: tuple[float, ...] | None = field(default=None, repr=False)
    anomalous_scores: tuple[float, ...] | None = field(default=None, repr=False)

    def __post_init__(self):
        problems = []
        counts = (self.num_normal, self.num_normal, self.num_anomalous)
        for name, count in zip(KEPT_SCORE_FIELDS, counts):
            problems += self._checked_scores(name, count)
        for name in (
            "image_threshold",
            "image_scale",
            "target_false_alarm_rate",
            "calibration_false_alarm_rate",
        ):
            if not _is_finite_number(getattr(self, name)):
                problems.append(f"{name} must be a finite number, got {getattr(self, name)!r}")
        for name in (
            "false_alarm_bound",
            "calibration_f1",
            "calibration_miss_rate",
            "pixel_threshold",
            "pixel_scale",
            "confidence",
        ):
            value = getattr(self, name)
            if value is not None and not _is_finite_number(value):
                problems.append(f"{name} must be a finite number or null, got {value!r}")
        for name in ("image_scale", "pixel_scale"):
            value = getattr(self, name)
            if _is_finite_number(value) and value <= 0:
                problems.append(f"{name} must be positive, got {value}")
        if _is_finite_number(self.confidence) and not 0 < self.confidence < 1:
            problems.append(f"confidence must lie in (0, 1), got {self.confidence}")
        if self.normals_needed is not None and (
            isinstance(self.normals_needed, bool)
            or not isinstance(self.normals_needed, int)
            or self.normals_needed < 1
        ):
            problems.append(f"normals_needed must be a positive integer or null, got {self.normals_needed!r}")
        if self.precision not in PRECISIONS:
            problems.append(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not isinstance(self.runtime, str) or not self.runtime:
            problems.append(f"runtime must be a runtime's name, got {self.runtime!r}")
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

    def _checked_scores(self, name: str, count) -> list[str]:
        """Store the calibration scores `name` as a tuple of floats (JSON gives a list); the problems with
        them: not finite numbers, or not `count` of them."""
        values = getattr(self, name)
        if values is None:
            return []
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            return [f"{name} must be a list of numbers or null, got {values!r}"]
        values = tuple(values)
        if not all(_is_finite_number(value) for value in values):
            return [f"{name} must hold finite numbers only"]
        object.__setattr__(self, name, tuple(float(value) for value in values))  # frozen: set once, here
        if len(values) != count:
            return [f"{name} holds {len(values)} scores for {count} calibration images"]
        return []

    def to_json(self) -> str:
        return json.dumps({"format_version": CALIBRATION_FORMAT_VERSION} | asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Calibration:
        """Parse `to_json` output of this or an earlier format version; a ValueError names what is missing,
        unknown or invalid, or both versions when the text is of a later one."""
        try:
            fields = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"Invalid calibration: not JSON ({error}).") from None
        if not isinstance(fields, dict):
            raise TypeError("Invalid calibration: not a JSON object.")
        version = fields.pop("format_version", 1)  # version 1 wrote none
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            raise ValueError(
                f"Invalid calibration: format_version must be a positive integer, got {version!r}."
            )
        if version > CALIBRATION_FORMAT_VERSION:
            raise ValueError(
                f"The calibration is in format version {version}, but this hf_fsad reads calibration format "
                f"versions up to {CALIBRATION_FORMAT_VERSION}: upgrade hf_fsad to use it."
            )
        unknown = set(fields) - set(cls.__dataclass_fields__)
        missing = {
            name for name, field in cls.__dataclass_fields__.items() if field.default is MISSING
        } - set(fields)
        if unknown or missing:
            problems = [f"unknown fields {sorted(unknown)} (format version {version})"] if unknown else []
            problems += [f"missing fields {sorted(missing)}"] if missing else []
            raise ValueError("Invalid calibration: " + "; ".join(problems) + ".")
        return cls(**fields)

    def normalize(self, image_scores: torch.Tensor) -> torch.Tensor:
        """Scores in (0, 1), strictly increasing in the raw score, 0.5 at the image threshold and above 0.5
        exactly where `labels` is 1 (see the module docstring); float64 for float64 input, else float32."""
        return normalize_around(image_scores, self.image_threshold, self.image_scale)

    def normalize_maps(self, anomaly_maps: torch.Tensor) -> torch.Tensor:
        """Maps normalised around the pixel threshold as `normalize` does the scores (needs one)."""
        if self.pixel_threshold is None:
            raise ValueError("This calibration has no pixel threshold (the method gives no anomaly maps).")
        return normalize_around(anomaly_maps, self.pixel_threshold, self.pixel_scale)

    def labels(self, image_scores: torch.Tensor) -> torch.Tensor:
        """1 where the image is anomalous (score above the threshold, or not finite: `score_error`), else
        0."""
        return exceeds_threshold(image_scores, self.image_threshold).long()

    def masks(self, anomaly_maps: torch.Tensor | None) -> torch.Tensor | None:
        """True where a pixel is anomalous (map above the pixel threshold, or not finite); None without maps
        or threshold."""
        if anomaly_maps is None or self.pixel_threshold is None:
            return None
        return exceeds_threshold(anomaly_maps, self.pixel_threshold)

    def shortfall(self) -> str | None:
        """Why the image threshold cannot keep the promise asked, with the number of normals that would; None
        when it does (or for best F1, which promises nothing)."""
        if self.normals_needed is None:
            return None
        asked = f"a false-alarm rate of {self.target_false_alarm_rate:.1%}"
        if self.confidence is None:
            reached = f"guarantees {self.false_alarm_bound:.1%}"
        else:
            asked += f" with {self.confidence:.0%} confidence"
            reached = f"keeps it with probability {self._maximum_keeps_target():.1%}"
        return (
            f"{self.num_normal} normal scores cannot guarantee {asked}: the threshold (their maximum) "
            f"{reached}. Give at least {self.normals_needed} normal images for the rate asked."
        )

    def describe(self) -> str:
        """One line for logs and reports: the rule, the data and what the threshold promises."""
        data = f"{self.num_normal} {self.normal_source.replace('_', '-')} normal scores"
        data += f" and {self.num_anomalous} anomalous" if self.num_anomalous else ""
        if self.rule == "best_f1":
            return (
                f"best-F1 threshold {self.image_threshold:.6g} from {data} (F1 {self.calibration_f1:.3f}, "
                f"false alarms on them {self.calibration_false_alarm_rate:.1%}; no guarantee, and it moves "
                "with the share of defects among them)"
            )
        misses = ""
        if self.calibration_miss_rate is not None:
            misses = f"; misses {self.calibration_miss_rate:.1%} of the {self.num_anomalous} anomalous"
        threshold = f"conformal threshold {self.image_threshold:.6g} from {data}: false-alarm rate"
        on_average = f"<= {self.false_alarm_bound:.1%} on average"
        if self.confidence is None:
            return f"{threshold} {on_average} (asked {self.target_false_alarm_rate:.1%}{misses})"
        if self.normals_needed is None:
            kept, asked = f"{self.confidence:.0%}", ""
        else:
            kept = f"only {self._maximum_keeps_target():.1%}"
            asked = f"; {self.confidence:.0%} asked needs {self.normals_needed} normals"
        return (
            f"{threshold} <= {self.target_false_alarm_rate:.1%} with probability {kept} over the calibration "
            f"draw ({on_average}{asked}{misses})"
        )

    def _maximum_keeps_target(self) -> float:
        """The probability over the calibration draw that the largest normal score, as the threshold, keeps
        the false-alarm rate within the target."""
        return float(
            probability_within_target(self.num_normal, self.num_normal, self.target_false_alarm_rate)
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
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
) -> Calibration:
    """The `Calibration` of calibration images' scores (N,) / (A,) and maps (N, H, W) / (A, H, W).

    rule="false_alarm_rate": conformal thresholds from the normals alone (kept with probability `confidence`
    over the calibration draw when given, else on average), with the miss rate on the anomalous scores when
    given. rule="best_f1" (needs anomalous scores): the best-F1 image threshold, and the best pixel F1 where
    `anomalous_masks` are given (see the module docstring).
    """
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}.")
    if rule == "best_f1" and anomalous_scores is None:
        raise ValueError('rule="best_f1" needs anomalous images: F1 counts the defects caught.')
    if rule == "false_alarm_rate" and anomalous_masks is not None:
        raise ValueError(
            'anomalous_masks set the pixel threshold by best pixel F1, which needs rule="best_f1"; the '
            "false-alarm rule sets it on the normal images' maps alone."
        )
    normal_scores = normal_scores.double().cpu().numpy().ravel()
    if anomalous_scores is not None:
        anomalous_scores = _finite(anomalous_scores.double().cpu().numpy(), "anomalous calibration scores")
    needed = misses = None
    if rule == "false_alarm_rate":
        image_threshold, bound = conformal_threshold(normal_scores, false_alarm_rate, confidence)
        f1 = None
        needed = normals_needed(false_alarm_rate, confidence)
        if anomalous_scores is not None:
            misses = float((anomalous_scores <= image_threshold).mean())
    else:
        labels = np.r_[np.zeros(normal_scores.size), np.ones(anomalous_scores.size)]
        image_threshold, f1 = best_f1_threshold(labels, np.r_[normal_scores, anomalous_scores])
        bound = None
    pixel, normal_maxima = {}, None
    if normal_maps is not None:
        normal_maxima = normal_maps.flatten(1).amax(1).double().cpu().numpy()
        if anomalous_masks is None:
            pixel_threshold, _ = conformal_threshold(normal_maxima, false_alarm_rate, confidence)
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
        calibration_miss_rate=misses,
        confidence=confidence,
        normals_needed=needed if needed is not None and needed > normal_scores.size else None,
        normal_scores=tuple(normal_scores.tolist()),
        normal_map_maxima=None if normal_maxima is None else tuple(normal_maxima.tolist()),
        anomalous_scores=None if anomalous_scores is None else tuple(anomalous_scores.tolist()),
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


def fit_calibration_of_outputs(
    normal: AnomalyDetectionOutput,
    anomalous: AnomalyDetectionOutput | None = None,
    anomalous_masks: torch.Tensor | None = None,
    **settings,
) -> Calibration:
    """`fit_calibration` of the scores and maps of scored normal (and anomalous) calibration images;
    `settings` are its keyword arguments (normal_source, false_alarm_rate, confidence, rule)."""
    return fit_calibration(
        normal.image_scores,
        normal.anomaly_maps,
        None if anomalous is None else anomalous.image_scores,
        None if anomalous is None else anomalous.anomaly_maps,
        anomalous_masks,
        **settings,
    )


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
