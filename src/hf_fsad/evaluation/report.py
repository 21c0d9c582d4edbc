"""Reports of benchmark results: Markdown tables in the papers' style, ROC curves and heatmap panels."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..metrics import IMAGE_METRICS, PIXEL_METRICS
from ..visualization import resize_center_crop, save_heatmap_panels

METRIC_NAMES = [*IMAGE_METRICS, *PIXEL_METRICS]
# Decisions at each cell's calibrated threshold (`run_benchmark`), shown beside image AUROC.
DECISION_NAMES = ["calibrated_f1", "false_alarm_rate", "false_alarm_bound"]
COLUMN_NAMES = ["image_auroc", *DECISION_NAMES, *(name for name in METRIC_NAMES if name != "image_auroc")]


def shots_label(k: int, anomalous: int) -> str:
    """A cell's references as its tables label them: "4", or "4 + 1 anomalous"."""
    return f"{k}" if not anomalous else f"{k} + {anomalous} anomalous"


def plot_category(
    out_dir: Path, dataset: str, category: str, scores_by_cell: dict, shown, num_heatmaps: int
) -> None:
    """ROC curves of every (method, k, anomalous) at the first seed; heatmaps of `shown`, a (label, cell run)
    pair of the last cell with maps (its scores, maps, labels, masks, test split and crop flag)."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import roc_curve

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    name = f"{dataset}_{category}"
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for (method, k, anomalous), (scores, labels) in scores_by_cell.items():
        false_positive, true_positive, _ = roc_curve(labels, scores)
        axis.plot(false_positive, true_positive, label=f"{method} k={shots_label(k, anomalous)}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(xlabel="false positive rate", ylabel="true positive rate", title=f"{dataset} / {category}")
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(plot_dir / f"roc_{name}.png", dpi=90)
    plt.close(figure)

    if shown is None or num_heatmaps < 1:
        return
    label, run = shown
    picked = [i for i in np.argsort(-run.scores) if run.labels[i]][: num_heatmaps - 1] + [
        int(np.argmin(run.scores))
    ]
    images = [run.test[int(i)]["image"].convert("RGB") for i in picked]
    if run.crop:  # show what the model saw
        images = [resize_center_crop(image, run.maps.shape[-1]) for image in images]
    save_heatmap_panels(
        plot_dir / f"heatmaps_{name}.png",
        images,
        run.masks[picked] if run.masks is not None else None,
        run.maps[picked],
        [f"{label}: {run.test[int(i)]['defect_type']}" for i in picked],
        [float(run.scores[i]) for i in picked],
    )


def _mean_std(values: list[float]) -> str:
    if not values:
        return "–"
    mean = 100 * statistics.mean(values)
    return f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}" if len(values) > 1 else f"{mean:.1f}"


def method_label(cell: dict) -> str:
    """The cell's method, with its tiling where it has one: tiled and untiled cells are separate rows."""
    tiling = cell.get("tiling")
    if not tiling:
        return cell["method"]
    size, stride = list(tiling["tile_size"]), list(tiling["tile_stride"])
    every = "" if stride == size else f" every {stride[0]}x{stride[1]}"
    return f"{cell['method']} ({tiling['mode']} tiles {size[0]}x{size[1]}{every})"


def _value(cell: dict, name: str) -> float | None:
    """A cell's metric or calibrated decision (None where it has none)."""
    return cell["metrics"][name] if name in METRIC_NAMES else cell.get(name)


def _calibration_lines(cells: list[dict]) -> list[str]:
    """What the calibrated columns mean and promise; why cells have no calibration, or what limits it."""
    calibrations = [cell["calibration"] for cell in cells if cell.get("calibration")]
    lines = []
    if calibrations:
        rates = ", ".join(sorted({f"{c['target_false_alarm_rate']:.1%}" for c in calibrations}))
        sources = {c["normal_source"] for c in calibrations}
        normals = " and ".join(
            text
            for source, text in (
                ("leave_one_out", "the k references scored leave-one-out (banks of k - 1 references)"),
                ("held_out", "the protocol's held-out validation normals"),
            )
            if source in sources
        )
        explanation = (
            f"calibrated_f1, false_alarm_rate: image F1, and the share of normal test images flagged, at the "
            f"conformal threshold for a false-alarm rate of {rates} set on {normals}. Its promise: "
            "false_alarm_rate <= false_alarm_bound in expectation over reference draws, not in every draw "
            "(with fewer than 1 / rate - 1 normals the threshold is their highest score, and the bound "
            "1 / (normals + 1))."
        )
        lines += ["", explanation]
    notes = {
        (
            method_label(cell),
            shots_label(cell["k"], cell.get("anomalous", 0)),
            not cell.get("calibration"),
            note,
        )
        for cell in cells
        if (note := cell.get("calibration_note"))
    }
    if notes:
        lines += ["", "Calibration notes:"]
        lines += [
            f"- {method} k={k}{' (not calibrated)' if uncalibrated else ''}: {note}"
            for method, k, uncalibrated, note in sorted(notes)
        ]
    return lines


def results_markdown(results: dict, title: str | None = None, plots: Sequence[str] = ()) -> str:
    """Tables in the papers' style: per dataset, method x k rows, metrics x100 as mean ± std over seeds of
    the mean over categories, with F1 and false-alarm rate at the calibrated threshold beside image AUROC;
    then image/pixel AUROC per category; then the cells that failed, with their errors."""
    failed = [cell for cell in results["cells"] if "error" in cell]
    cells = [cell for cell in results["cells"] if "error" not in cell]
    lines = [f"# {title or 'hf_fsad benchmark'}", ""]
    for dataset in sorted({cell["dataset"] for cell in cells}):
        in_dataset = [cell for cell in cells if cell["dataset"] == dataset]
        metrics = [
            name for name in COLUMN_NAMES if any(_value(cell, name) is not None for cell in in_dataset)
        ]
        lines += [
            f"## {dataset}",
            "",
            "| method | k | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]

        def row_key(cell: dict) -> tuple:
            return method_label(cell), cell["k"], cell.get("anomalous", 0), cell.get("trained_on") or ""

        for method, k, anomalous, trained_on in sorted({row_key(cell) for cell in in_dataset}):
            group = [c for c in in_dataset if row_key(c) == (method, k, anomalous, trained_on)]
            label = f"{method} (trained on {trained_on})" if trained_on else method
            values = []
            for name in metrics:
                per_seed = {}
                for cell in group:
                    if _value(cell, name) is not None:
                        per_seed.setdefault(cell["seed"], []).append(_value(cell, name))
                values.append(_mean_std([statistics.mean(v) for v in per_seed.values()]))
            lines.append(f"| {label} | {shots_label(k, anomalous)} | " + " | ".join(values) + " |")
        lines += _calibration_lines(in_dataset)
        categories = sorted({cell["category"] for cell in in_dataset})
        columns = sorted({(method_label(cell), cell["k"], cell.get("anomalous", 0)) for cell in in_dataset})
        per_category = [name for name in ("image_auroc", "pixel_auroc") if name in metrics]
        if len(categories) > 1:
            for name in per_category:
                headers = " | ".join(f"{m} k={shots_label(k, a)}" for m, k, a in columns)
                lines += ["", f"{name} per category:", "", f"| category | {headers} |"]
                lines.append("|---|" + "---|" * len(columns))
                for category in categories:
                    entries = [
                        _mean_std(
                            [
                                c["metrics"][name]
                                for c in in_dataset
                                if (method_label(c), c["k"], c.get("anomalous", 0), c["category"])
                                == (m, k, a, category)
                                and c["metrics"][name] is not None  # e.g. a category without masks
                            ]
                        )
                        for m, k, a in columns
                    ]
                    lines.append(f"| {category} | " + " | ".join(entries) + " |")
        lines.append("")
    if failed:
        lines += [
            "## Failed cells",
            "",
            "| method | dataset | category | k | seed | error |",
            "|---|---|---|---|---|---|",
        ]
        for cell in failed:
            shots = shots_label(cell["k"], cell.get("anomalous", 0))
            error = cell["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {method_label(cell)} | {cell['dataset']} | {cell['category']} | {shots} | {cell['seed']} | {error} |"
            )
        lines.append("")
    cache = results["feature_cache"]
    lines += [
        (
            f"Metrics x100, mean ± std over seeds. Feature cache: {cache['hits']} hits, {cache['misses']} misses "
            f"(hit rate {100 * cache['hit_rate']:.1f} %). Wall time of this run: {results['wall_seconds']:.0f} s."
        ),
        "",
    ]
    lines += [f"![{Path(name).stem}](plots/{name})" for name in plots]
    return "\n".join(lines) + "\n"
