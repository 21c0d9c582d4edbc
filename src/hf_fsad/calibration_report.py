"""What a calibration's kept scores give (`Calibration.normal_scores`, `anomalous_scores`): the report a
quality engineer reads, and a recalibration with more held-out normals.

`write_calibration_report` writes a folder: `report.md` (what the threshold promises in one sentence, the
misses on the defects given, the per-threshold table and the figures), `thresholds.csv` (the table),
`histogram.png` (normal and defect scores with the threshold), `roc.png` and `precision_recall.png` (with
defects) and `calibration.json`. `pooled_calibration` refits a calibration on its images and more held-out
ones.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .calibration import Calibration, fit_calibration, probability_within_target
from .io import atomic_directory
from .metrics.functional import image_auprc, image_auroc

REPORT_FILES = ("report.md", "thresholds.csv", "histogram.png", "calibration.json")
DEFECT_FIGURES = ("roc.png", "precision_recall.png")


@dataclass(frozen=True)
class ThresholdRow:
    """What "anomalous when the score is above `threshold`" does on the calibration images and promises.

    normals_at_or_below: c, the normal calibration scores at or below it; false_alarms: the n - c above it
    (false_alarm_rate = (n - c) / n); false_alarm_bound: (n + 1 - c) / (n + 1), the probability a new
    normal part exchangeable with them is flagged, on average over the draw of the normals;
    probability_within_target: the probability over that draw that the line's false-alarm rate is at most
    the calibration's target (Beta(n + 1 - c, c), 0 when c = 0); misses: the defect scores at or below it
    (None without defects).
    """

    threshold: float
    chosen: bool
    normals_at_or_below: int
    false_alarms: int
    false_alarm_rate: float
    false_alarm_bound: float
    probability_within_target: float
    misses: int | None
    miss_rate: float | None


def threshold_table(calibration: Calibration) -> list[ThresholdRow]:
    """One row per distinct normal calibration score, ascending (each is the conformal threshold of some
    rate), and one for the calibration's own threshold when it is none of them (best F1 cuts between
    scores)."""
    normal, anomalous = _kept_scores(calibration)
    n, target = normal.size, calibration.target_false_alarm_rate
    thresholds = np.union1d(normal, [calibration.image_threshold])
    rows = []
    for threshold in thresholds.tolist():
        at_or_below = int((normal <= threshold).sum())
        misses = None if anomalous is None else int((anomalous <= threshold).sum())
        rows.append(
            ThresholdRow(
                threshold=threshold,
                chosen=threshold == calibration.image_threshold,
                normals_at_or_below=at_or_below,
                false_alarms=n - at_or_below,
                false_alarm_rate=(n - at_or_below) / n,
                false_alarm_bound=(n + 1 - at_or_below) / (n + 1),
                probability_within_target=(
                    float(probability_within_target(n, at_or_below, target)) if at_or_below else 0.0
                ),
                misses=misses,
                miss_rate=None if misses is None else misses / anomalous.size,
            )
        )
    return rows


def guarantee_sentence(calibration: Calibration) -> str:
    """What the image threshold promises about normal parts, in one sentence with the number of normals."""
    n = calibration.num_normal
    if calibration.rule == "best_f1":
        return (
            f"No false-alarm rate is guaranteed: the threshold has the best F1 on {n} normal and "
            f"{calibration.num_anomalous} defective images and flags "
            f"{calibration.calibration_false_alarm_rate:.1%} of those normals (it moves with the share of "
            "defects among them)."
        )
    if calibration.normal_source == "held_out":
        normals = f"{n} held-out normal images"
    else:
        normals = (
            f"{n} references, each scored against a bank of the others (leave-one-out: it errs towards fewer "
            "false alarms, except for the methods docs/calibration.md names),"
        )
    draw = f"over the draw of the {normals} that set the threshold"
    if calibration.confidence is None:
        return f"At most {calibration.false_alarm_bound:.1%} of normal parts are flagged, on average {draw}."
    kept = _chosen_row(calibration).probability_within_target
    probability = (
        f"{calibration.confidence:.0%}" if calibration.normals_needed is None else f"only {kept:.1%}"
    )
    return (
        f"With probability {probability} {draw}, at most {calibration.target_false_alarm_rate:.1%} of normal "
        f"parts are flagged (on average at most {calibration.false_alarm_bound:.1%})."
    )


def write_calibration_report(
    calibration: Calibration, folder: str | os.PathLike, title: str = "Calibration report"
) -> list[Path]:
    """Write the report folder (module docstring) of a calibration that kept its scores, replacing `folder`
    atomically; the paths of the files written, as they are once it is in place."""
    rows = threshold_table(calibration)
    folder = Path(folder)
    with atomic_directory(folder) as temporary:
        (temporary / "thresholds.csv").write_text(_csv(rows))
        (temporary / "calibration.json").write_text(calibration.to_json() + "\n")
        _plot_histogram(calibration, temporary / "histogram.png")
        if calibration.anomalous_scores is not None:
            _plot_defect_curves(calibration, temporary)
        (temporary / "report.md").write_text(_markdown(calibration, rows, title))
        names = sorted(path.name for path in temporary.iterdir())
    return [folder / name for name in names]


def pooled_calibration(calibration: Calibration, added: Calibration, **settings) -> Calibration:
    """`calibration` refitted on its held-out calibration scores pooled with those of `added`, a calibration
    of the same bank on more held-out images (`model.calibrate(bank, normal_pixel_values=...)`) at the same
    runtime and precision: the thresholds `fit_calibration` gives on all the images at once. The rule, the
    runtime and the precision are `calibration`'s; `settings` (false_alarm_rate, confidence) replace its own.

    A ValueError when pooling cannot keep the promise: a leave-one-out calibration on either side (its scores
    come from banks of the other k - 1 references, held-out ones from the full bank: a pool of both is
    exchangeable with no new part, so the conformal rank argument holds for neither), a pixel best-F1
    threshold (the calibration keeps no defect maps or masks), a file from before calibration format version
    3 (no scores kept), scores from another runtime or precision, or anomaly maps on one side only.
    """
    for which, rule in (("the calibration", calibration), ("the added calibration", added)):
        refusal = pooling_refusal(rule)
        if refusal is not None:
            raise ValueError(f"{which} {refusal}")
    if (added.runtime, added.precision) != (calibration.runtime, calibration.precision):
        raise ValueError(
            f"the calibration was fitted on {calibration.runtime} at {calibration.precision}, the added "
            f"scores were computed on {added.runtime} at {added.precision}: score them where the "
            "calibration was fitted"
        )
    if (calibration.normal_map_maxima is None) != (added.normal_map_maxima is None):
        raise ValueError(
            "one calibration kept anomaly maps' maxima and the other did not: they come from different models"
        )

    def pooled(name: str) -> torch.Tensor | None:
        scores = [*(getattr(calibration, name) or ()), *(getattr(added, name) or ())]
        return torch.tensor(scores, dtype=torch.float64) if scores else None

    maxima = pooled("normal_map_maxima")
    refitted = fit_calibration(
        pooled("normal_scores"),
        None if maxima is None else maxima[:, None],  # one-pixel maps: the pixel rule reads their maxima
        pooled("anomalous_scores"),
        normal_source="held_out",
        rule=calibration.rule,
        **{"false_alarm_rate": calibration.target_false_alarm_rate, "confidence": calibration.confidence}
        | settings,
    )
    return dataclasses.replace(refitted, runtime=calibration.runtime, precision=calibration.precision)


def pooling_refusal(calibration: Calibration) -> str | None:
    """Why more held-out scores cannot be pooled into `calibration` (`pooled_calibration`), or None: checked
    before any image is scored."""
    if calibration.normal_scores is None:
        return (
            "keeps no calibration scores (it was saved before calibration format version 3): calibrate again "
            "on all the normal images"
        )
    if calibration.normal_source == "leave_one_out":
        return (
            "scored its references leave-one-out, against banks of the other k - 1; held-out normals are "
            "scored against the full bank, and a pool of both keeps neither promise: calibrate on held-out "
            "normal images alone first (their calibration replaces the leave-one-out one)"
        )
    if calibration.pixel_rule == "best_f1":
        return (
            "has the best pixel F1 on the defect masks as its pixel threshold, and keeps no maps or masks of "
            "the defects: calibrate again on all the images"
        )
    return None


def _kept_scores(calibration: Calibration) -> tuple[np.ndarray, np.ndarray | None]:
    if calibration.normal_scores is None:
        raise ValueError(
            "the calibration keeps no calibration scores (saved before calibration format version 3): "
            "calibrate again to report on it"
        )
    anomalous = calibration.anomalous_scores
    return np.asarray(calibration.normal_scores), None if anomalous is None else np.asarray(anomalous)


def _chosen_row(calibration: Calibration) -> ThresholdRow:
    return next(row for row in threshold_table(calibration) if row.chosen)


def _csv(rows: list[ThresholdRow]) -> str:
    """The table with every number at full precision (floats as Python writes them back exactly)."""
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    names = [field.name for field in dataclasses.fields(ThresholdRow)]
    writer.writerow(names)
    for row in rows:
        writer.writerow(["" if getattr(row, name) is None else getattr(row, name) for name in names])
    return text.getvalue()


def _markdown(calibration: Calibration, rows: list[ThresholdRow], title: str) -> str:
    chosen = next(row for row in rows if row.chosen)
    lines = [f"# {title}", "", guarantee_sentence(calibration), ""]
    shortfall = calibration.shortfall()
    if shortfall is not None:
        lines += [shortfall, ""]
    if chosen.misses is not None:
        lines += [
            (
                f"At the threshold, {chosen.misses} of the {calibration.num_anomalous} defective images "
                f"given are missed ({chosen.miss_rate:.1%}): the share of defects the line would pass, "
                "estimated on them."
            ),
            "",
        ]
    lines += [
        (
            f"- Image threshold: {calibration.image_threshold:.6g} (raw score; a part above it fails, and "
            "its normalised score is above 0.5)"
        ),
        f"- Calibration: {calibration.describe()}",
        f"- Scored on: {calibration.runtime} at {calibration.precision}",
        "",
        "![Calibration scores and the threshold](histogram.png)",
        "",
    ]
    if chosen.misses is not None:
        lines += ["![ROC curve](roc.png) ![Precision-recall curve](precision_recall.png)", ""]
    target = f"{calibration.target_false_alarm_rate:.1%}"
    header = [
        "threshold",
        "false alarms on the normals",
        "false-alarm rate promised (average)",
        f"P(rate <= {target})",
    ]
    header += ["misses on the defects"] if chosen.misses is not None else []
    lines += [
        "## False alarms and misses per threshold",
        "",
        (
            "Each normal calibration score is a threshold one could choose (a part fails above it); **bold** "
            "is the one chosen. thresholds.csv holds the same table at full precision."
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    n = calibration.num_normal
    for row in rows:
        cells = [
            f"{row.threshold:.6g}",
            f"{row.false_alarms} of {n} ({row.false_alarm_rate:.1%})",
            f"{row.false_alarm_bound:.1%}",
            f"{row.probability_within_target:.1%}",
        ]
        if row.misses is not None:
            cells.append(f"{row.misses} of {calibration.num_anomalous} ({row.miss_rate:.1%})")
        if row.chosen:
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _plot_histogram(calibration: Calibration, path: Path) -> None:
    from matplotlib.figure import Figure

    normal, anomalous = _kept_scores(calibration)
    edges = np.histogram_bin_edges(np.r_[normal, [] if anomalous is None else anomalous], bins="auto")
    figure = Figure(figsize=(6, 4))
    axis = figure.subplots()
    axis.hist(normal, bins=edges, alpha=0.6, label=f"normal ({normal.size})", color="tab:blue")
    if anomalous is not None:
        axis.hist(anomalous, bins=edges, alpha=0.6, label=f"defective ({anomalous.size})", color="tab:red")
    axis.axvline(calibration.image_threshold, color="black", linestyle="--", label="threshold")
    axis.set(xlabel="image score", ylabel="images", title="Calibration scores")
    axis.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)


def _plot_defect_curves(calibration: Calibration, folder: Path) -> None:
    """roc.png and precision_recall.png of the normal (negative) and defective (positive) calibration scores,
    with the threshold's operating point."""
    from matplotlib.figure import Figure
    from sklearn.metrics import precision_recall_curve, roc_curve

    normal, anomalous = _kept_scores(calibration)
    labels, scores = np.r_[np.zeros(normal.size), np.ones(anomalous.size)], np.r_[normal, anomalous]
    flagged = scores > calibration.image_threshold
    caught = int((flagged & (labels == 1)).sum())
    recall, false_alarm_rate = caught / anomalous.size, float(flagged[labels == 0].mean())
    precision = caught / flagged.sum() if flagged.any() else 1.0
    false_positives, true_positives, _ = roc_curve(labels, scores)
    precisions, recalls, _ = precision_recall_curve(labels, scores)
    curves = (
        ("roc.png", false_positives, true_positives, (false_alarm_rate, recall), "false-alarm rate",
         "share of defects caught", f"ROC (AUROC {image_auroc(labels, scores):.3f})"),
        ("precision_recall.png", recalls, precisions, (recall, precision), "share of defects caught",
         "precision", f"Precision-recall (AP {image_auprc(labels, scores):.3f})"),
    )  # fmt: skip
    for name, x, y, point, x_label, y_label, title in curves:
        figure = Figure(figsize=(4.5, 4.5))
        axis = figure.subplots()
        axis.plot(x, y, drawstyle="steps-post" if name == "precision_recall.png" else "default")
        axis.plot(*point, "o", color="black", label="the threshold")
        axis.set(xlabel=x_label, ylabel=y_label, title=title, xlim=(-0.02, 1.02), ylim=(-0.02, 1.02))
        axis.legend(loc="lower left" if name == "precision_recall.png" else "lower right")
        figure.tight_layout()
        figure.savefig(folder / name, dpi=100)
