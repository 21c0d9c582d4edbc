"""The reproduction's texts: each table's protocol as markdown (results.md and docs/faithfulness.md, from the
one encoding), the comparison table, `hf-fsad reproduce --list`, and the plot of ours against the paper."""

from __future__ import annotations

from pathlib import Path

from .protocols import DATASET_NAMES, PAPERS, PaperProtocol, Setting, TableProtocol


def _value(value: object) -> str:
    if isinstance(value, (list, tuple)):
        return ", ".join(str(item) for item in value)
    return str(value)


def _setting_row(name: str, setting: Setting | dict) -> str:
    setting = setting if isinstance(setting, dict) else vars(setting)
    return f"| {name} | {_value(setting['value'])} | {setting['source']} | {setting['note']} |"


def protocol_markdown(paper: PaperProtocol, heading: str = "###") -> str:
    """`paper`'s protocol per table: the settings and each method's model and training settings, with
    their source (paper / official code / ours)."""
    lines = []
    for table in paper.tables:
        lines += [f"{heading} {paper.name} {table.table}: {table.title}", "", *_table_protocol(table), ""]
    return "\n".join(lines).rstrip() + "\n"


def _table_protocol(table: TableProtocol) -> list[str]:
    trained = ", ".join(
        f"{label} ({'trained on ' + on if on else 'no auxiliary training'})"
        for label, on in table.datasets.items()
    )
    lines = ["| setting | value | source | note |", "|---|---|---|---|"]
    lines += [_setting_row(name, setting) for name, setting in table.settings.items()]
    lines.append(f"| datasets | {trained} | paper | |")
    for run in table.runs:
        for section, settings in (("model", run.model), ("training", run.training)):
            lines += [
                _setting_row(f"{run.method} {section}.{name}", setting) for name, setting in settings.items()
            ]
    return lines


def list_text() -> str:
    """`hf-fsad reproduce --list`: per paper, its tables and what each needs."""
    from ..data import BENCHMARKS
    from ..registry import METHODS

    lines = []
    for paper in PAPERS.values():
        lines.append(f"{paper.name}: {paper.title} (values printed as {paper.unit})")
        lines.append(f"  backbone: {paper.backbone.value} -> {paper.backbone_source}")
        if paper.trained_method:
            sets = sorted({on for table in paper.tables for on in table.datasets.values() if on})
            lines.append(
                f"  weights: --weights {' '.join(f'{paper.trained_method}:{on}=DIR' for on in sets)} "
                f"(else trained here by the {paper.trained_method} recipe)"
            )
        for table in paper.tables:
            methods = ", ".join(run.method for run in table.runs)
            fitted = [run.method for run in table.runs if METHODS[run.method].fits_per_category]
            lines.append(f"  {table.table}: {table.title}; methods {methods}; ~{table.gpu_hours:g} GPU hours")
            datasets = []
            for label in table.datasets:
                name = DATASET_NAMES[label]
                datasets.append(name if name in BENCHMARKS else f"{name} (needs dataset loader {name})")
            lines.append(f"    datasets: {', '.join(datasets)}")
            if fitted:
                lines.append(f"    training: {', '.join(fitted)} fitted per category in each cell")
    return "\n".join(lines) + "\n"


def _number(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def comparison_markdown(rows: list[dict]) -> list[str]:
    """The rows as a markdown table (values in percentage points)."""
    lines = [
        (
            "| method | dataset | category | setting | metric | paper (as printed) | source | paper | ours | "
            "ours - paper | tolerance | within | note |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        printed = row["paper_value"] + (f" ± {row['paper_std']}" if row["paper_std"] else "")
        within = {True: "yes", False: "no", None: "-"}[row["within_tolerance"]]
        lines.append(
            f"| {row['method']} | {row['dataset']} | {row['category']} | {row['setting']} | {row['metric']} | "
            f"{printed} ({row['paper_unit']}) | {row['source']} | {_number(row['paper_points'])} | "
            f"{_number(row['ours_points'])} | {_number(row['difference_points'])} | "
            f"{_number(row['tolerance_points'])} | {within} | {row['note']} |"
        )
    return lines


def results_markdown(paper: PaperProtocol, results: dict, plot: str | None) -> str:
    """results.md: per table its protocol and the comparison; then the methods' settings as run and the plot."""
    rows = results["rows"]
    compared = [row for row in rows if row["within_tolerance"] is not None]
    within = sum(row["within_tolerance"] for row in compared)
    lines = [
        f"# Reproduction of {paper.title}",
        "",
        (
            f"Values in percentage points ({results['unit']}); tolerance: the paper's std where printed, else 1 "
            f"point. {len(compared)} of {len(rows)} published cells compared, {within} within tolerance."
        ),
    ]
    if results["smoke"]:
        lines.append("**Smoke run**: one dataset, category, seed and shot per table; not a reproduction.")
    tables = {table.table: table for table in paper.tables}
    for record in results["tables"]:
        table = tables[record["table"]]
        lines += ["", f"## {table.table}: {table.title}", "", "### Protocol", "", *_table_protocol(table), ""]
        lines += [
            "### Ours vs the paper",
            "",
            *comparison_markdown([r for r in rows if r["table"] == table.table]),
        ]
    lines += ["", "## Methods as run", ""]
    for name, record in results["methods"].items():
        lines.append(
            f"- {name}: weights {record['weights']}; model {record['model']}; training {record['training']}"
        )
        lines += [f"  - {setting}: {why}" for setting, why in record["not_applied"].items()]
    if plot:
        lines += ["", f"![ours vs the paper]({plot})"]
    else:
        lines += ["", "No plot: no cell has both values."]
    return "\n".join(lines) + "\n"


def plot_comparison(rows: list[dict], path: Path, title: str) -> str | None:
    """A scatter of ours against the paper's value (percentage points) with the diagonal; the file's name, or
    None when no row has both."""
    points = [(row["paper_points"], row["ours_points"]) for row in rows if row["ours_points"] is not None]
    if not points:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(5, 5))
    paper, ours = zip(*points)
    axes.scatter(paper, ours, s=12)
    low, high = min(*paper, *ours), max(*paper, *ours)
    axes.plot([low, high], [low, high], color="grey", linewidth=1, label="ours = paper")
    axes.set(xlabel="paper (points)", ylabel="ours (points)", title=title)
    axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return path.name
