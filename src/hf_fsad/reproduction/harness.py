"""Run a paper's tables with its protocol and compare every published cell with ours.

```python
from hf_fsad.reproduction.harness import ReproductionRun, reproduce
reproduce("afclip", ReproductionRun(data_root="data", out="runs/afclip", weights={("afclip", "visa"): "w/visa"}))
```

Each (table, dataset, method) runs through the benchmark runner (`run_benchmark`: cells cached in
`out/cells/<method>[-on-<dataset>]/results.json`, so a rerun skips finished cells). A method trained on an
auxiliary dataset (MetaCAN, AF-CLIP) takes `weights[(method, trained_on)]`, else it is trained here by its
recipe (`hf_fsad.training.recipes.train`) into `out/weights/<method>-on-<dataset>`, reused on a rerun;
methods fitted per category (VTFusion, One-to-Normal) are fitted in each cell by the runner. What cannot run
(no loader for the dataset, no data folder, no backbone) is reported per cell, never raised.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..io import atomic_write_text
from .protocols import DATASET_NAMES, MethodRun, PaperProtocol, TableProtocol, paper_protocol
from .report import plot_comparison, results_markdown
from .tables import PaperCell, comparison, paper_cells

logger = logging.getLogger(__name__)

SMOKE_STEPS = 1  # training updates (recipes) and fit steps (per-category methods) of a --smoke run


@dataclass
class ReproductionRun:
    """What a reproduction runs on. weights: (method, trained_on) -> a saved model directory or Hub id.
    tables: the tables to run (None: all). seeds: the reference draws (None: the protocol's number of runs,
    0 .. n-1). backbone: a CLIP directory or Hub id replacing the paper's (converted ViT-B/16+, tiny test
    models). overrides: `METHOD.SECTION.KEY=VALUE` (SECTION: model or training; YAML values), shown in the
    output as ours. smoke: per table one dataset (the first with data), category, seed and shot, and one
    training update."""

    data_root: str | Path
    out: str | Path
    weights: dict[tuple[str, str], str] = field(default_factory=dict)
    tables: Sequence[str] | None = None
    seeds: Sequence[int] | None = None
    backbone: str | None = None
    overrides: Sequence[str] = ()
    smoke: bool = False
    device: str = "cpu"
    batch_size: int = 8


class Unavailable(Exception):
    """Why a (table, dataset, method) cannot run: reported in its cells' rows."""


def parse_overrides(overrides: Sequence[str]) -> dict[tuple[str, str], dict]:
    """`METHOD.SECTION.KEY=VALUE` entries -> {(method, section): {key: value}} (values parsed as YAML)."""
    import yaml

    parsed: dict[tuple[str, str], dict] = {}
    for entry in overrides:
        key, equals, value = entry.partition("=")
        parts = key.split(".")
        if not equals or len(parts) != 3 or parts[1] not in ("model", "training"):
            raise ValueError(f"--set {entry!r} is not METHOD.model.KEY=VALUE or METHOD.training.KEY=VALUE.")
        parsed.setdefault((parts[0], parts[1]), {})[parts[2]] = yaml.safe_load(value)
    return parsed


def dataset_status(benchmark: str, data_root: Path) -> str | None:
    """Why `benchmark` cannot be loaded from `data_root/benchmark`, or None when it can."""
    from ..data import BENCHMARKS

    if benchmark not in BENCHMARKS:
        return f"needs dataset loader {benchmark}"
    spec = BENCHMARKS[benchmark]
    if spec.needs_folder and not (data_root / benchmark).is_dir():
        return f"no data at {data_root / benchmark} (layout: {spec.layout})"
    return None


def _known_fields(cls: type) -> set[str]:
    return {item.name for item in dataclasses.fields(cls)}


def _settings(run: MethodRun, section: str, overrides: dict, known: set[str]) -> tuple[dict, dict]:
    """The section's values (protocol, then --set), and {name: why} for protocol settings this build cannot
    apply (a field its classes lack); --set names are checked by the classes themselves."""
    protocol = run.model if section == "model" else run.training
    values = {name: setting.value for name, setting in protocol.items() if name in known or name == "epochs"}
    skipped = {
        name: f"not applied: this build's {section} settings have no `{name}`"
        for name in protocol
        if name not in known and name != "epochs"
    }
    return values | overrides.get((run.method, section), {}), skipped


class Harness:
    """One reproduction: models built or trained once per (method, trained_on), cells through the runner."""

    def __init__(self, paper: PaperProtocol, run: ReproductionRun):
        self.paper, self.run = paper, run
        self.data_root, self.out = Path(run.data_root), Path(run.out)
        self.overrides = parse_overrides(run.overrides)
        self.models: dict[tuple[str, str | None], tuple] = {}
        self.method_records: dict[str, dict] = {}
        self._feature_cache = None

    @property
    def feature_cache(self):
        """One feature cache for every method's cells (entries are keyed by the model's feature key)."""
        from ..features import FeatureCache

        if self._feature_cache is None:
            self._feature_cache = FeatureCache(self.out / "feature_cache")
        return self._feature_cache

    def backbone(self) -> str:
        if self.run.backbone:
            return self.run.backbone
        if self.paper.backbone_source.startswith("hf-fsad convert"):
            raise Unavailable(f"needs --backbone: a CLIP directory made by `{self.paper.backbone_source}`")
        return self.paper.backbone_source

    def model(self, run: MethodRun, trained_on: str | None):
        """The method's model (built, loaded from --weights or trained here) and its settings record."""
        key = (run.method, trained_on if self._trained(run) else None)
        if key not in self.models:
            self.models[key] = self._build(run, key[1])
        return self.models[key]

    def _trained(self, run: MethodRun) -> bool:
        return run.method == self.paper.trained_method

    def _build(self, run: MethodRun, trained_on: str | None):
        from ..loading import ModelLoadError, load_method
        from ..registry import method_spec

        spec = method_spec(run.method)
        model_settings, skipped = _settings(run, "model", self.overrides, _known_fields(spec.config))
        training_known = _known_fields(spec.training_arguments) if spec.training_arguments else set()
        training, skipped_training = _settings(
            run, "training", self.overrides, training_known | ({"steps"} if spec.fits_per_category else set())
        )
        record = {"model": model_settings, "training": training, "not_applied": skipped | skipped_training}
        if self._trained(run):
            weights = self.run.weights.get((run.method, trained_on))
            if weights is None:
                weights = self._train(run.method, trained_on, model_settings, training)
                record["weights"] = f"trained here on {trained_on}: {weights}"
            else:
                record["weights"] = f"--weights {run.method}:{trained_on}={weights}"
            try:
                model = load_method(str(weights))
            except ModelLoadError as error:
                raise Unavailable(f"--weights {run.method}:{trained_on}: {error}") from None
            for name, value in model_settings.items():  # saved weights keep their own config
                if getattr(model.config, name, value) != value:
                    record["not_applied"][name] = f"the weights' config has {getattr(model.config, name)!r}"
        else:
            model = spec.model.from_clip(self.backbone(), **model_settings)
            record["weights"] = f"{self.backbone()} (training-free parts)"
        if spec.fits_per_category:
            training.pop("epochs", None)
            if self.run.smoke:
                training["steps"] = SMOKE_STEPS
        self.method_records[f"{run.method}" + (f" (trained on {trained_on})" if trained_on else "")] = record
        return model.to(self.run.device).eval(), training if spec.fits_per_category else None

    def _train(self, method: str, trained_on: str, model_settings: dict, training: dict) -> Path:
        """Train `method` on `trained_on` by its recipe into out/weights (reused when saved there)."""
        from ..training.recipes import train

        output_dir = self.out / "weights" / f"{method}-on-{trained_on}"
        if (output_dir / "config.json").is_file():
            return output_dir
        status = dataset_status(trained_on, self.data_root)
        if status is not None:
            raise Unavailable(
                f"training {method} on {trained_on}: {status}; or pass --weights {method}:{trained_on}=DIR"
            )
        splits = list(
            next(run for table in self.paper.tables for run in table.runs if run.method == method).splits
        )
        data = {"dataset": trained_on, "root": str(self.data_root / trained_on), "splits": splits}
        training = dict(training)
        epochs = training.pop("epochs", None)
        if self.run.smoke:
            training["max_steps"] = SMOKE_STEPS
        elif epochs is not None and "max_steps" not in training:
            training["max_steps"] = math.ceil(epochs * _count_images(data) / training.get("batch_size", 8))
        config = {
            "method": method,
            "output_dir": str(output_dir),
            "model": {"clip": self.backbone(), **model_settings},
            "data": data,
            "training": training,
        }
        logger.info("training %s on %s -> %s", method, trained_on, output_dir)
        train(config, method, resume=True)
        return output_dir

    def run_cells(self, table: TableProtocol, label: str, run: MethodRun) -> Path:
        """Run the table's cells of `run` on dataset `label`; the runner's output directory."""
        from ..data import load_benchmark
        from ..evaluation import DatasetSpec, Protocol, run_benchmark

        trained_on = table.datasets[label]
        benchmark = DATASET_NAMES[label]
        status = dataset_status(benchmark, self.data_root)
        if status is not None:
            raise Unavailable(status)
        model, fit_arguments = self.model(run, trained_on)
        root = self.data_root / benchmark
        root = str(root) if root.is_dir() else None
        seeds = list(self.run.seeds or range(table.num_runs))
        shots = list(table.shots)
        categories = None
        if self.run.smoke:
            seeds, shots = seeds[:1], shots[:1]
            categories = [min(set(load_benchmark(benchmark, root)["test"]["category"]))]
        if model.fits_per_category:
            shots = [shot for shot in shots if shot > 0]
        anomalous = tuple(sorted({0, *(r.anomalous for r in table.runs)}))
        cell_shots = sorted({run.cell_shots(shot)[0] for shot in shots})
        name = run.method + (f"-on-{trained_on}" if self._trained(run) else "")
        out_dir = self.out / "cells" / name
        run_benchmark(
            {run.method: model},
            [DatasetSpec(benchmark, root, categories)],
            ks=cell_shots,
            seeds=seeds,
            out_dir=out_dir,
            batch_size=self.run.batch_size,
            protocol=Protocol(anomalous, max_test=table.max_test),
            fit_arguments=fit_arguments,
            feature_cache=self.feature_cache,
            title=f"{self.paper.name} {table.table}: {run.method}",
        )
        return out_dir


def _count_images(data: dict) -> int:
    from ..data import load_benchmark

    splits = load_benchmark(data["dataset"], data["root"])
    return sum(splits[name].num_rows for name in data["splits"])


def _normal_category(name: str) -> str:
    return name.lower().replace(" ", "_").replace("-", "_")


def ours_value(cells: list[dict], paper_cell: PaperCell, run: MethodRun) -> tuple[float | None, str]:
    """Our value of `paper_cell` from the runner's cells (a fraction), and a note: the mean over seeds per
    category, then (for "mean"/"all" rows) over the categories run."""
    k, anomalous = run.cell_shots(paper_cell.shots)
    matching = [
        cell
        for cell in cells
        if cell["dataset"] == paper_cell.benchmark
        and cell["k"] == k
        and cell.get("anomalous", 0) == anomalous
        and "error" not in cell
        and (
            paper_cell.category in ("mean", "all")
            or _normal_category(cell["category"]) == _normal_category(paper_cell.category)
        )
    ]
    failed = [cell["error"] for cell in cells if "error" in cell and cell["dataset"] == paper_cell.benchmark]
    if not matching:
        return None, f"no cell ran ({failed[0]})" if failed else "no cell ran"
    per_category: dict[str, list[float]] = {}
    for cell in matching:
        value = cell["metrics"].get(paper_cell.metric_key)
        if value is not None:
            per_category.setdefault(cell["category"], []).append(value)
    if not per_category:
        return None, f"{paper_cell.metric_key} not computed (pixel metrics need masks and maps)"
    value = statistics.mean(statistics.mean(values) for values in per_category.values())
    seeds = max(len(values) for values in per_category.values())
    note = f"{len(per_category)} categories, {seeds} seeds"
    expected = _category_count(paper_cell.benchmark)
    if paper_cell.category == "mean" and expected is not None and len(per_category) < expected:
        note = f"partial: {len(per_category)} of {expected} categories, {seeds} seeds"
    return value, note


def _category_count(benchmark: str) -> int | None:
    """The number of categories `benchmark` declares (None when they are read from the folder)."""
    from ..data import BENCHMARKS

    categories = BENCHMARKS[benchmark].categories
    return len(categories) if categories else None


def compare(
    paper: PaperProtocol, cells_by_run: dict, unavailable: dict, tables: Sequence[TableProtocol]
) -> list[dict]:
    """One row per published cell of `tables`: the paper's value with its source, ours and the comparison.
    cells_by_run / unavailable: (table, dataset label, method) -> the runner's cells / why it did not run."""
    rows = []
    names = {table.table: table for table in tables}
    row_table = {row: table.table for table in tables for row in table.row_table_names}
    for cell in paper_cells(paper):
        if cell.table not in row_table:
            continue
        table = names[row_table[cell.table]]
        run = next(r for r in table.runs if cell.method in r.methods)
        key = (table.table, cell.dataset, run.method)
        if key in unavailable:
            ours, note = None, unavailable[key]
        else:
            ours, note = ours_value(cells_by_run.get(key, []), cell, run)
        rows.append(
            {
                "table": table.table,
                "method": cell.method,
                "ours_method": run.method,
                "dataset": cell.dataset,
                "category": cell.category,
                "setting": cell.setting,
                "metric": cell.metric,
                "paper_value": cell.value,
                "paper_std": cell.std,
                "paper_unit": cell.unit,
                "source": cell.source,
                **comparison(cell, ours),
                "note": note,
            }
        )
        if note.startswith("partial"):  # a mean over some of the categories is not the paper's quantity
            rows[-1]["within_tolerance"] = None
    return rows


def reproduce(paper_name: str, run: ReproductionRun) -> dict:
    """Run `paper_name`'s tables (`run.tables`, default all) and write out/results.json, results.md and the
    plot of ours against the paper; returns the results."""
    paper = paper_protocol(paper_name)
    tables = [paper.table(name) for name in run.tables] if run.tables else list(paper.tables)
    harness = Harness(paper, run)
    harness.out.mkdir(parents=True, exist_ok=True)
    cells_by_run, unavailable = {}, {}
    for table in tables:
        for label in _datasets(table, harness):
            for method_run in table.runs:
                key = (table.table, label, method_run.method)
                try:
                    out_dir = harness.run_cells(table, label, method_run)
                except Unavailable as reason:
                    unavailable[key] = str(reason)
                    logger.warning("%s %s %s: %s", table.table, label, method_run.method, reason)
                    continue
                cells_by_run[key] = json.loads((out_dir / "results.json").read_text())["cells"]
        if run.smoke:
            for label in set(table.datasets) - set(_datasets(table, harness)):
                for method_run in table.runs:
                    unavailable[(table.table, label, method_run.method)] = "not in the --smoke selection"
    rows = compare(paper, cells_by_run, unavailable, tables)
    results = {
        "paper": paper.name,
        "title": paper.title,
        "unit": "percentage points (the paper's fractions x 100)" if paper.unit == "fraction" else "%",
        "smoke": run.smoke,
        "tables": [_table_record(table) for table in tables],
        "methods": harness.method_records,
        "rows": rows,
    }
    out = harness.out
    plot = plot_comparison(rows, out / "paper_vs_ours.png", f"{paper.name}: ours vs the paper")
    atomic_write_text(out / "results.json", json.dumps(results, indent=1) + "\n")
    atomic_write_text(out / "results.md", results_markdown(paper, results, plot))
    return results


def _datasets(table: TableProtocol, harness: Harness) -> list[str]:
    """The table's dataset labels to run: all, or with --smoke the first whose data is there (else the first)."""
    labels = list(table.datasets)
    if not harness.run.smoke:
        return labels
    ready = [label for label in labels if dataset_status(DATASET_NAMES[label], harness.data_root) is None]
    return (ready or labels)[:1]


def _table_record(table: TableProtocol) -> dict:
    return {
        "table": table.table,
        "title": table.title,
        "datasets": table.datasets,
        "protocol": {name: dataclasses.asdict(setting) for name, setting in table.settings.items()},
        "methods": {
            run.method: {
                "model": {name: dataclasses.asdict(setting) for name, setting in run.model.items()},
                "training": {name: dataclasses.asdict(setting) for name, setting in run.training.items()},
            }
            for run in table.runs
        },
    }
