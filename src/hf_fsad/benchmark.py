"""The evaluation runner: methods x datasets x k-shots x seeds -> results.json, a Markdown table, plots.

```python
from hf_fsad.benchmark import DatasetSpec, run_benchmark
run_benchmark({"winclip": model}, [DatasetSpec("elpv")], ks=[2, 4], seeds=[0, 1, 2], out_dir="runs/elpv")
```

Protocol: per (dataset, category), k references are drawn from the normal training pool by a seeded
sampler and written to a manifest (`out/manifests/...`, reused on reruns, so a rerun is exact); the whole
test split is scored. k = 0 is zero-shot (one cell, no seeds). A model trained on another dataset records
it in `config.trained_on`, which the results carry (cross-dataset protocols). Backbone features are cached
per image and `model.feature_key()`, so every image is encoded once per backbone and feature kind, and
reused across k, seeds and methods. Finished cells are kept in results.json and skipped on a rerun.
Images are preprocessed as each method's published evaluation did (`model.paper_image_processor()`: resize and
centre crop for MetaCAN and WinCLIP, whole-image resize for the others), and masks go through the same
geometry (nearest neighbour), so pixel metrics compare the pixels the model saw.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import resource
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Self

import numpy as np
import torch
from datasets import Dataset
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .data import ReferenceManifest, load_benchmark, sample_references
from .data.sampling import row_indices, select_ids
from .metrics import IMAGE_METRICS, PIXEL_METRICS
from .modeling_base import FsadPreTrainedModel
from .visualization import mask_array, resize_center_crop, save_heatmap_panels

# Prompt class words where the category name is not a good one.
CLASS_NAMES = {
    "elpv": "solar cell",
    "headct": "head CT scan",
    "brainmri": "brain MRI scan",
    "aitex": "fabric",
    "ksdd": "metal surface",
    "sdd": "metal surface",
    "mnist": "handwritten digit",
    "sklearn_digits": "handwritten digit",
    "toy": "textured surface",
}
METRIC_NAMES = [*IMAGE_METRICS, *PIXEL_METRICS]


def class_name_for(dataset: str, category: str) -> str:
    return CLASS_NAMES.get(dataset, category.replace("_", " "))


@dataclass
class DatasetSpec:
    """A benchmark to run: `load_benchmark(name, root, category, **options)` for each category."""

    name: str
    root: str | None = None
    categories: list[str] | None = None  # None: every category the data holds
    options: dict = field(default_factory=dict)

    @classmethod
    def from_entry(cls, entry: str | dict) -> DatasetSpec:
        """A config entry: the CLI's text form, or a dict of the fields (name, root, categories, options)."""
        return cls(**entry) if isinstance(entry, dict) else cls.parse(entry)

    @classmethod
    def parse(cls, text: str) -> DatasetSpec:
        """`name`, `name:root` or `name:root:category` (the CLI's form)."""
        name, _, rest = text.partition(":")
        root, _, category = rest.partition(":")
        return cls(name, root or None, [category] if category else None)


class FeatureCache:
    """Per-image features keyed by (model.feature_key(), the paper preprocessing, image id), in memory or as
    safetensors on disk. Images are preprocessed with `model.paper_image_processor()`."""

    recent_requests = 2

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory is not None else None
        self._memory: dict[tuple[str, str], dict[str, torch.Tensor]] = {}
        # The last few stacked requests (a cell asks for its references, then the same test set again).
        self._recent: dict[tuple, dict[str, torch.Tensor]] = {}
        self.hits = 0
        self.misses = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0

    def _file(self, key: str, image_id: str) -> Path:
        return self.directory / key / f"{hashlib.sha1(image_id.encode()).hexdigest()}.safetensors"

    def _get(self, key: str, image_id: str) -> dict[str, torch.Tensor] | None:
        if self.directory is None:
            return self._memory.get((key, image_id))
        file = self._file(key, image_id)
        return load_file(file) if file.is_file() else None

    def _put(self, key: str, image_id: str, features: dict[str, torch.Tensor]) -> None:
        if self.directory is None:
            self._memory[(key, image_id)] = features
            return
        file = self._file(key, image_id)
        file.parent.mkdir(parents=True, exist_ok=True)
        temporary = file.with_name(file.name + ".tmp")
        save_file({name: tensor.contiguous() for name, tensor in features.items()}, temporary)
        os.replace(temporary, file)

    def features(
        self,
        model: FsadPreTrainedModel,
        dataset: Dataset,
        rows: Sequence[int],
        batch_size: int = 8,
        desc: str = "",
    ) -> dict[str, torch.Tensor]:
        """Stacked `model.encode_images` features of `dataset[rows]`, encoding only the images not cached."""
        if not rows:
            raise ValueError(f"No images to encode ({desc or 'empty selection'}).")
        key = f"{model.feature_key()}-{model.config.paper_preprocessing}"
        prefix = dataset.info.dataset_name or "dataset"
        ids = [f"{prefix}:{path}" for path in dataset.select(rows)["path"]]
        request = (key, tuple(ids))
        if request in self._recent:
            self.hits += len(ids)
            return self._recent[request]
        found = {image_id: self._get(key, image_id) for image_id in ids}
        missing = [row for row, image_id in zip(rows, ids) if found[image_id] is None]
        self.hits += len(ids) - len(missing)
        self.misses += len(missing)
        processor = model.paper_image_processor()
        for start in tqdm(
            range(0, len(missing), batch_size), desc=desc or "encoding", unit="batch", disable=not missing
        ):
            batch = dataset.select(missing[start : start + batch_size])
            pixel_values = processor(
                [image.convert("RGB") for image in batch["image"]], return_tensors="pt"
            ).pixel_values
            encoded = model.encode_images(pixel_values)
            for index, path in enumerate(batch["path"]):
                features = {name: tensor[index].detach().cpu().clone() for name, tensor in encoded.items()}
                self._put(key, f"{prefix}:{path}", features)
                found[f"{prefix}:{path}"] = features
        stacked = {name: torch.stack([found[image_id][name] for image_id in ids]) for name in found[ids[0]]}
        self._recent[request] = stacked
        while len(self._recent) > self.recent_requests:
            self._recent.pop(next(iter(self._recent)))
        return stacked


def _atomic_write(path: Path, text: str) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)


def _cell_id(cell: dict) -> str:
    keys = ("method", "dataset", "category", "k", "seed")
    return "|".join([*(str(cell[key]) for key in keys), str(cell.get("anomalous", 0))])


@dataclass(frozen=True)
class Protocol:
    """How references and test images are drawn per (category, seed).

    anomalous_shots: numbers of anomalous references to run (0 = normal references only); they are drawn
    from the test split's anomalous images and every cell of a seed leaves out the same
    max(anomalous_shots) images, so methods compare on one test set. num_validation: normal train images
    kept for weight validation (methods with `validate_weights`). max_test: cap on scored test images
    (seeded subset; the anomalous-memory paper scores up to 100 per class).
    """

    anomalous_shots: tuple[int, ...] = (0,)
    num_validation: int = 0
    max_test: int | None = None

    def manifest_name(self, k: int, seed: int) -> str:
        name = f"k{k}-a{max(self.anomalous_shots)}-seed{seed}"
        name += f"-val{self.num_validation}" if self.num_validation else ""
        return name + (f"-max{self.max_test}" if self.max_test is not None else "") + ".json"

    @property
    def draws_from_test(self) -> bool:
        return max(self.anomalous_shots) > 0 or self.max_test is not None


def _manifest(
    out_dir: Path, split: _CategorySplit, k: int, seed: int, protocol: Protocol
) -> ReferenceManifest:
    path = out_dir / "manifests" / split.dataset / split.category / protocol.manifest_name(k, seed)
    if path.is_file():
        return ReferenceManifest.load(path)
    manifest = sample_references(
        split.train,
        k,
        seed,
        split.category,
        test=split.test if protocol.draws_from_test else None,
        num_anomalous=max(protocol.anomalous_shots),
        num_validation=protocol.num_validation,
        max_test=protocol.max_test,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.save(path)
    return manifest


def _metrics(
    labels: np.ndarray, scores: np.ndarray, masks: np.ndarray | None, maps: np.ndarray | None
) -> dict:
    values = {name: function(labels, scores) for name, function in IMAGE_METRICS.items()}
    for name, function in PIXEL_METRICS.items():
        # None without pixel labels, or for image-level methods (no maps)
        values[name] = function(masks, maps) if masks is not None and maps is not None else None
    return values


def _test_masks(test: Dataset, size: int, crop: bool) -> np.ndarray | None:
    """Boolean masks at the model's input size (centre-cropped like the images when `crop`), or None unless
    every anomalous test image has a mask: pixel metrics are then left out (e.g. ELPV has image labels only)."""
    masks, labels = test["mask"], test["label"]
    if not any(labels) or any(label and mask is None for label, mask in zip(labels, masks)):
        return None
    return np.stack([mask_array(mask, size, crop) for mask in masks])


def _reference_masks(references: Dataset, size: int, crop: bool) -> torch.Tensor | None:
    """Masks of anomalous references at the model's input size; None when any lacks one (the method then
    treats them as references without pixel labels)."""
    masks = references["mask"]
    if any(mask is None for mask in masks):
        return None
    return torch.from_numpy(np.stack([mask_array(mask, size, crop) for mask in masks]))


@torch.no_grad()
def _score(
    model: FsadPreTrainedModel, features: dict, bank, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    scores, maps = [], []
    count = next(iter(features.values())).shape[0]
    for start in range(0, count, batch_size):
        output = model.score_features({n: t[start : start + batch_size] for n, t in features.items()}, bank)
        scores.append(output.image_scores.float().cpu().numpy())
        if output.anomaly_maps is not None:
            maps.append(output.anomaly_maps.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps) if maps else None


def run_benchmark(
    models: dict[str, FsadPreTrainedModel],
    datasets: Sequence[DatasetSpec],
    ks: Sequence[int] = (2, 4, 8),
    seeds: Sequence[int] = (0, 1, 2),
    out_dir: str | os.PathLike = "benchmark_results",
    batch_size: int = 8,
    feature_cache: FeatureCache | None = None,
    title: str | None = None,
    num_heatmaps: int = 4,
    protocol: Protocol | None = None,
    fit_arguments: dict | None = None,
    generated_references: GeneratedReferences | None = None,
) -> dict:
    """Run every cell not already in `out_dir/results.json`; write results, table and plots. Returns the
    results dict (cells + feature-cache statistics + wall time).

    A cell is (method, dataset, category, k, anomalous references, seed). Methods that need anomalous
    references (`needs_anomalous_references`) run the protocol's anomalous shots > 0, the others 0. Methods
    fitted per category (`fits_per_category`, e.g. VTFusion) fit a copy of the model on each cell's k normal
    references, with the cell's seed and `fit_arguments` (e.g. steps, anomaly_kinds). `generated_references`
    adds generated anomaly-free images to every other method's k references (One-to-Normal, Sec. 4.3).
    A cell that raises is recorded with its error (results.json and a "Failed cells" table) and the run goes
    on; a rerun tries it again.
    """
    protocol = protocol or Protocol()
    fitting = [name for name, model in models.items() if getattr(model, "fits_per_category", False)]
    if fitting and 0 in ks:
        raise ValueError(f"{', '.join(fitting)} fit on k normal images: k = 0 (zero-shot) is not possible.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    cells = {_cell_id(cell): cell for cell in previous.get("cells", [])}
    cache = feature_cache or FeatureCache(out_dir / "feature_cache")
    started = time.perf_counter()
    skipped = 0

    for spec in datasets:
        for category, train, test in _category_splits(spec):
            split = _CategorySplit(spec.name, category, train, test)
            first_seed_scores, shown = {}, None
            for method, model in models.items():
                for anomalous in protocol.anomalous_shots:
                    if (anomalous > 0) != model.needs_anomalous_references:
                        continue
                    for k in ks:
                        zero_shot = k == 0 and anomalous == 0
                        for seed in seeds[:1] if zero_shot else seeds:
                            cell = {
                                "method": method,
                                "dataset": spec.name,
                                "category": category,
                                "k": k,
                                "seed": seed,
                                "anomalous": anomalous,
                            }
                            finished = cells.get(_cell_id(cell))
                            if finished is not None and "error" not in finished:  # failed cells run again
                                skipped += 1
                                continue
                            try:
                                run = _run_cell(
                                    model,
                                    cache,
                                    out_dir,
                                    split,
                                    (k, anomalous, seed),
                                    protocol,
                                    batch_size,
                                    fit_arguments or {},
                                    generated_references,
                                )
                            # one failing cell is reported, and the others run
                            except Exception as error:  # noqa: BLE001
                                message = f"{type(error).__name__}: {error}"
                                tqdm.write(f"cell {_cell_id(cell)} failed: {message}")
                                cells[_cell_id(cell)] = cell | {"error": message}
                                _write_results(results_file, cells, cache, started, skipped)
                                continue
                            cells[_cell_id(cell)] = cell | run.values
                            _write_results(results_file, cells, cache, started, skipped)
                            if seed == seeds[0]:
                                first_seed_scores[(method, k, anomalous)] = (run.scores, run.labels)
                                shown = (
                                    (f"{method} k={_shots_label(k, anomalous)}", run)
                                    if run.maps is not None
                                    else shown
                                )
            if first_seed_scores:
                _plot_category(out_dir, split, first_seed_scores, shown, num_heatmaps)

    results = _write_results(results_file, cells, cache, started, skipped)
    plots = sorted((out_dir / "plots").glob("*.png")) if (out_dir / "plots").is_dir() else []
    _atomic_write(out_dir / "results.md", results_markdown(results, title, [path.name for path in plots]))
    return results


@dataclass
class GeneratedReferences:
    """One-to-Normal's reference augmentation (paper Sec. 4.3) for other methods: per cell, a copy of
    `generator` (a `OneToNormalModel`) is fitted on the cell's k normal references and generates `count`
    anomaly-free images, which join the references in the method's bank. Run such methods under their own
    labels. The generator's own pool is not used (pool_size=1 skips generating it)."""

    generator: FsadPreTrainedModel
    count: int
    fit_arguments: dict = field(default_factory=dict)

    def features(
        self, model: FsadPreTrainedModel, normals: Sequence, class_name: str, seed: int, batch_size: int
    ) -> dict[str, torch.Tensor]:
        """`model`'s features of `count` images generated from `normals`."""
        generator = copy.deepcopy(self.generator)
        generator.fit(normals, class_name=class_name, **({"seed": seed} | self.fit_arguments))
        images = generator.generate_normals(normals, self.count)
        processor = model.paper_image_processor()
        parts = [
            model.encode_images(
                processor(images[start : start + batch_size], return_tensors="pt").pixel_values
            )
            for start in range(0, len(images), batch_size)
        ]
        return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


@dataclass
class _CategorySplit:
    dataset: str
    category: str
    train: Dataset
    test: Dataset


@dataclass
class _CellRun:
    scores: np.ndarray
    maps: np.ndarray | None
    labels: np.ndarray
    masks: np.ndarray | None
    test: Dataset
    values: dict
    crop: bool


def _run_cell(
    model: FsadPreTrainedModel,
    cache: FeatureCache,
    out_dir: Path,
    split: _CategorySplit,
    shots: tuple[int, int, int],
    protocol: Protocol,
    batch_size: int,
    fit_arguments: dict,
    generated_references: GeneratedReferences | None = None,
) -> _CellRun:
    """Score one cell: k normal and `anomalous` anomalous references drawn with `seed`."""
    k, anomalous, seed = shots
    started = time.perf_counter()
    needs_manifest = k > 0 or anomalous > 0 or protocol.draws_from_test
    manifest = _manifest(out_dir, split, k, seed, protocol) if needs_manifest else None
    test = split.test
    if manifest is not None and manifest.test_ids is not None:
        test = select_ids(split.test, manifest.test_ids)
    size, crop = model.config.image_size, model.config.paper_preprocessing == "crop"
    class_name = class_name_for(split.dataset, split.category)
    bank_inputs = {"class_name": class_name}
    fit_seconds, generated = None, 0
    if getattr(model, "fits_per_category", False):
        model = copy.deepcopy(model)
        normals = split.train.select(row_indices(split.train, manifest.image_ids))["image"]
        fit_seconds = time.perf_counter()
        model.fit(normals, class_name=class_name, **({"seed": seed} | fit_arguments))
        fit_seconds = time.perf_counter() - fit_seconds
    elif k > 0:
        rows = row_indices(split.train, manifest.image_ids)
        features = cache.features(model, split.train, rows, batch_size, "references")
        if generated_references is not None:
            normals = split.train.select(rows)["image"]
            extra = generated_references.features(model, normals, class_name, seed, batch_size)
            generated = generated_references.count
            features = {
                name: torch.cat([tensor, extra[name].to(tensor.device)]) for name, tensor in features.items()
            }
        bank_inputs["reference_features"] = features
    anomalous_ids = manifest.anomalous_ids[:anomalous] if manifest is not None else []
    if anomalous_ids:
        rows = row_indices(split.test, anomalous_ids)
        anomalous_references = split.test.select(rows)
        bank_inputs["anomalous_features"] = cache.features(
            model, split.test, rows, batch_size, "anomalous references"
        )
        bank_inputs["anomalous_masks"] = _reference_masks(anomalous_references, size, crop)
    bank = model.build_reference_bank(**bank_inputs)
    if anomalous_ids and manifest.validation_ids and hasattr(model, "validate_weights"):
        normals = select_ids(split.train, manifest.validation_ids)["image"]
        views, view_labels = model.validation_set(normals, anomalous_references["image"])
        bank = model.validate_weights(bank, views, view_labels)
    test_features = cache.features(
        model, test, range(test.num_rows), batch_size, f"{split.dataset}/{split.category} test"
    )
    scores, maps = _score(model, test_features, bank, batch_size)
    labels, masks = np.asarray(test["label"]), _test_masks(test, size, crop)
    validation_auroc = bank.tensors.get("validation_auroc")
    values = {
        "trained_on": model.config.trained_on,
        "metrics": _metrics(labels, scores, masks, maps),
        "num_test": int(test.num_rows),
        "reference_ids": manifest.image_ids if manifest else [],
        "anomalous_ids": anomalous_ids,
        "validation_auroc": float(validation_auroc) if validation_auroc is not None else None,
        "fit_seconds": fit_seconds,
        "generated_references": generated,
        "seconds": time.perf_counter() - started,
        "image_scores": scores.tolist(),
    }
    return _CellRun(scores, maps, labels, masks, test, values, crop)


def _category_splits(spec: DatasetSpec):
    """(category, train, test) for each category of `spec`."""
    if spec.categories:
        for category in spec.categories:
            data = load_benchmark(spec.name, spec.root, category, **spec.options)
            yield category, data["train"], data["test"]
        return
    data = load_benchmark(spec.name, spec.root, None, **spec.options)
    for category in sorted(set(data["test"]["category"])):
        yield category, _only(data["train"], category), _only(data["test"], category)


def _only(dataset: Dataset, category: str) -> Dataset:
    return dataset.filter(lambda name: name == category, input_columns="category")


def _write_results(path: Path, cells: dict, cache: FeatureCache, started: float, skipped: int) -> dict:
    results = {
        "cells": list(cells.values()),
        "feature_cache": {"hits": cache.hits, "misses": cache.misses, "hit_rate": cache.hit_rate},
        "skipped_cells": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    _atomic_write(path, json.dumps(results, indent=1) + "\n")
    return results


def _shots_label(k: int, anomalous: int) -> str:
    return f"{k}" if not anomalous else f"{k} + {anomalous} anomalous"


def _plot_category(
    out_dir: Path, split: _CategorySplit, scores_by_cell: dict, shown, num_heatmaps: int
) -> None:
    """ROC curves of every (method, k, anomalous) at the first seed; heatmaps of the last cell with maps."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt
    from sklearn.metrics import roc_curve

    plot_dir = out_dir / "plots"
    plot_dir.mkdir(exist_ok=True)
    name = f"{split.dataset}_{split.category}"
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    for (method, k, anomalous), (scores, labels) in scores_by_cell.items():
        false_positive, true_positive, _ = roc_curve(labels, scores)
        axis.plot(false_positive, true_positive, label=f"{method} k={_shots_label(k, anomalous)}")
    axis.plot([0, 1], [0, 1], color="grey", linestyle=":")
    axis.set(
        xlabel="false positive rate", ylabel="true positive rate", title=f"{split.dataset} / {split.category}"
    )
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


def results_markdown(results: dict, title: str | None = None, plots: Sequence[str] = ()) -> str:
    """Tables in the papers' style: per dataset, method x k rows, metrics x100 as mean ± std over seeds of
    the mean over categories; then image/pixel AUROC per category; then the cells that failed, with their
    errors."""
    failed = [cell for cell in results["cells"] if "error" in cell]
    cells = [cell for cell in results["cells"] if "error" not in cell]
    lines = [f"# {title or 'hf_fsad benchmark'}", ""]
    for dataset in sorted({cell["dataset"] for cell in cells}):
        in_dataset = [cell for cell in cells if cell["dataset"] == dataset]
        metrics = [
            name for name in METRIC_NAMES if any(cell["metrics"][name] is not None for cell in in_dataset)
        ]
        lines += [
            f"## {dataset}",
            "",
            "| method | k | " + " | ".join(metrics) + " |",
            "|---|---|" + "---|" * len(metrics),
        ]

        def row_key(cell: dict) -> tuple:
            return cell["method"], cell["k"], cell.get("anomalous", 0), cell.get("trained_on")

        for method, k, anomalous, trained_on in sorted({row_key(cell) for cell in in_dataset}, key=str):
            group = [c for c in in_dataset if row_key(c) == (method, k, anomalous, trained_on)]
            label = method if trained_on is None else f"{method} (trained on {trained_on})"
            values = []
            for name in metrics:
                per_seed = {}
                for cell in group:
                    if cell["metrics"][name] is not None:
                        per_seed.setdefault(cell["seed"], []).append(cell["metrics"][name])
                values.append(_mean_std([statistics.mean(v) for v in per_seed.values()]))
            lines.append(f"| {label} | {_shots_label(k, anomalous)} | " + " | ".join(values) + " |")
        categories = sorted({cell["category"] for cell in in_dataset})
        columns = sorted(
            {(cell["method"], cell["k"], cell.get("anomalous", 0)) for cell in in_dataset}, key=str
        )
        per_category = [name for name in ("image_auroc", "pixel_auroc") if name in metrics]
        if len(categories) > 1:
            for name in per_category:
                headers = " | ".join(f"{m} k={_shots_label(k, a)}" for m, k, a in columns)
                lines += ["", f"{name} per category:", "", f"| category | {headers} |"]
                lines.append("|---|" + "---|" * len(columns))
                for category in categories:
                    entries = [
                        _mean_std(
                            [
                                c["metrics"][name]
                                for c in in_dataset
                                if (c["method"], c["k"], c.get("anomalous", 0), c["category"])
                                == (m, k, a, category)
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
            shots = _shots_label(cell["k"], cell.get("anomalous", 0))
            error = cell["error"].replace("|", "\\|").replace("\n", " ")
            lines.append(
                f"| {cell['method']} | {cell['dataset']} | {cell['category']} | {shots} | {cell['seed']} | {error} |"
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


@dataclass
class ProfileRow:
    """One method's costs, measured beside a bare backbone forward of the same size in the same run.

    Per batch size: seconds per image, images per second, and the bare forward's seconds per image (the
    smallest batch size is timed after a warm-up call, larger ones without, to keep long runs bearable). Setup:
    the prompt ensemble + bank assembly from encoded references (text cache cleared), encoding the 2
    references, and for methods fitted per category one fit of `fit_steps` updates on them. Peak memory:
    growth of the process's resident memory (CUDA: allocated memory) while the largest batch is timed. Work:
    the floating-point operations of scoring one query and of one bare forward (`matmul_flops`).
    """

    method: str
    per_image_seconds: dict[int, float]
    images_per_second: dict[int, float]
    bare_forward_seconds: dict[int, float]
    text_setup_seconds: float
    reference_seconds: float | None
    fit_seconds: float | None
    fit_steps: int | None
    peak_memory_mb: float
    k_scaling: dict[int, float] | None
    flops_per_image: int
    bare_forward_flops: int

    def bare_forward_multiple(self, batch_size: int) -> float:
        """Per-image cost in bare backbone forwards of the same batch size."""
        return self.per_image_seconds[batch_size] / self.bare_forward_seconds[batch_size]

    def work_multiple(self) -> float:
        """Per-image work (`matmul_flops`, one query scored) in bare backbone forwards: the floor of
        `bare_forward_multiple` where both run at the same arithmetic rate."""
        return self.flops_per_image / self.bare_forward_flops


def matmul_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of `function`'s matrix products, convolutions and attention, as torch's
    FlopCounterMode counts them (elementwise work is not counted; MultiheadAttention's fused fast path is
    off meanwhile, so its products are counted too). The algorithm's work, whatever the machine."""
    from torch.utils.flop_counter import FlopCounterMode, register_flop_formula, sdpa_flop_count

    cpu_attention = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
    if cpu_attention not in torch.utils.flop_counter.flop_registry:

        @register_flop_formula(cpu_attention)
        def _(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
            return sdpa_flop_count(query_shape, key_shape, value_shape)

    fast_path = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with FlopCounterMode(display=False) as counter:
            function()
    finally:
        torch.backends.mha.set_fastpath_enabled(fast_path)
    return counter.get_total_flops()


def alternating_medians(
    functions: dict[str, Callable[[], object]],
    repeats: int,
    before: dict[str, Callable[[], object]] | None = None,
    warm_up: bool = True,
) -> dict[str, float]:
    """Median wall time of each function over `repeats` rounds that call them in turn, after one untimed
    round if `warm_up`; `before[name]` runs untimed before each call of `name`. Alternating keeps ratios
    between the functions honest on a machine whose speed drifts."""
    times = {name: [] for name in functions}
    for attempt in range(repeats + warm_up):
        for name, function in functions.items():
            if before is not None and name in before:
                before[name]()
            started = time.perf_counter()
            function()
            if attempt or not warm_up:
                times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values) for name, values in times.items()}


def median_seconds(
    function: Callable[[], object],
    repeats: int,
    before: Callable[[], object] | None = None,
    warm_up: bool = True,
) -> float:
    """Median wall time of one function (see `alternating_medians`)."""
    return alternating_medians({"": function}, repeats, None if before is None else {"": before}, warm_up)[""]


class _PeakMemory:
    """Peak memory growth (MB) inside a `with` block: CUDA's allocator peak, or on CPU the resident set
    size sampled every few milliseconds from /proc (Linux) by a background thread."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak_mb = 0.0

    @staticmethod
    def _resident_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * resource.getpagesize() / 2**20

    def _sample(self) -> None:
        while not self._stop.wait(0.005):
            self._highest = max(self._highest, self._resident_mb())

    def __enter__(self) -> Self:
        import threading

        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device) / 2**20
        else:
            self._start = self._highest = self._resident_mb()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_mb = max(self._highest, self._resident_mb()) - self._start


@torch.no_grad()
def profile_models(
    models: dict[str, FsadPreTrainedModel],
    images: Sequence,
    out_dir: str | os.PathLike,
    ks: Sequence[int] = (2, 8, 32, 128, 256),
    batch_sizes: Sequence[int] = (1, 16),
    repeats: int = 3,
    fit_steps: int = 2,
) -> list[ProfileRow]:
    """Profile every model side by side: per-image latency and images/s at each batch size, each as a
    multiple of a bare backbone forward of the same size; setup (prompt ensemble, 2 references, a short
    fit for per-category methods); peak memory; per-image latency as the bank grows to k references (the 2
    encoded references repeated: the search costs as for k distinct images). Writes profile.{json,md} and
    plots to `out_dir`, rewritten after each method so a long run keeps what it has measured.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = []
    for method, model in tqdm(models.items(), desc="profiling", unit="method"):
        rows.append(_profile_model(method, model, images, ks, batch_sizes, repeats, fit_steps))
        _write_profile(out_dir, rows, ks, batch_sizes)
    return rows


def _profile_model(
    method: str,
    model: FsadPreTrainedModel,
    images: Sequence,
    ks: Sequence[int],
    batch_sizes: Sequence[int],
    repeats: int,
    fit_steps: int,
) -> ProfileRow:
    images = [image.convert("RGB") for image in images]
    largest = max(batch_sizes)
    if len(images) < largest + 2:
        raise ValueError(f"Profiling needs at least {largest + 2} images, got {len(images)}.")
    pixels = model.image_processor()(images[: largest + 2], return_tensors="pt").pixel_values
    references, queries = pixels[:2].to(model.device), pixels[2:].to(model.device)

    fit_seconds = None
    if getattr(model, "fits_per_category", False):
        model = copy.deepcopy(model)
        started = time.perf_counter()
        with torch.enable_grad():
            model.fit(images[:2], class_name=model.config.default_class_name, steps=fit_steps)
        fit_seconds = time.perf_counter() - started
        model.eval()
    # Methods that keep what they learnt from their references (VTFusion's prototypes) build banks without.
    own_references = getattr(model, "saves_its_references", False)
    reference_features = None if own_references else model.encode_images(references)

    def bank_from_features():
        return _profile_bank(model, reference_features)

    text_setup = median_seconds(bank_from_features, repeats, before=model.backbone.clear_text_cache)
    reference_seconds = (
        None if own_references else median_seconds(lambda: model.encode_images(references), repeats)
    )
    bank = bank_from_features()
    per_image, bare = {}, {}
    for size in sorted(batch_sizes):  # the smallest batch warms up; the largest is timed for peak memory
        batch, warm_up = queries[:size], size == min(batch_sizes)
        with _PeakMemory(model.device) as memory:
            timed = alternating_medians(
                {
                    "model": _scorer(model, batch, bank),
                    "bare": lambda batch=batch: model.backbone.encode_image(batch),
                },
                repeats,
                warm_up=warm_up,
            )
        per_image[size], bare[size] = timed["model"] / size, timed["bare"] / size
    flops = matmul_flops(_scorer(model, queries[:1], bank))
    bare_flops = matmul_flops(lambda: model.backbone.encode_image(queries[:1]))
    scaling = None
    if not own_references:
        scaling = {}
        for k in ks:
            repeat = -(-k // 2)
            tiled = {
                name: tensor.repeat_interleave(repeat, dim=0)[:k]
                for name, tensor in reference_features.items()
            }
            scaling[k] = median_seconds(_scorer(model, queries[:1], _profile_bank(model, tiled)), repeats)
    return ProfileRow(
        method=method,
        per_image_seconds=per_image,
        images_per_second={size: 1 / seconds for size, seconds in per_image.items()},
        bare_forward_seconds=bare,
        text_setup_seconds=text_setup,
        reference_seconds=reference_seconds,
        fit_seconds=fit_seconds,
        fit_steps=fit_steps if fit_seconds is not None else None,
        peak_memory_mb=memory.peak_mb,
        k_scaling=scaling,
        flops_per_image=flops,
        bare_forward_flops=bare_flops,
    )


def _profile_bank(model: FsadPreTrainedModel, reference_features: dict[str, torch.Tensor] | None):
    """A bank of the given references (none: the model's own, e.g. fitted prototypes); for methods that need
    anomalous references the last one serves as a mask-less anomalous reference (same search cost)."""
    if reference_features is None:
        return model.build_reference_bank()
    if not model.needs_anomalous_references:
        return model.build_reference_bank(reference_features=reference_features)
    normal = {name: tensor[:-1] for name, tensor in reference_features.items()}
    anomalous = {name: tensor[-1:] for name, tensor in reference_features.items()}
    return model.build_reference_bank(reference_features=normal, anomalous_features=anomalous)


def _scorer(model: FsadPreTrainedModel, pixel_values: torch.Tensor, bank):
    return lambda: model(pixel_values, reference_bank=bank)


def _write_profile(
    out_dir: Path, rows: list[ProfileRow], ks: Sequence[int], batch_sizes: Sequence[int]
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    _atomic_write(out_dir / "profile.json", json.dumps([asdict(row) for row in rows], indent=1) + "\n")
    speed = " | ".join(f"batch {size}: s/image (× bare) | batch {size}: images/s" for size in batch_sizes)
    lines = [
        f"| method | work: GFLOP/image (× bare) | {speed} | setup: prompts + bank (s) | setup: 2 refs (s) "
        + "| fit (s) | peak memory (MB) |",
        "|---|---|" + "---|---|" * len(batch_sizes) + "---|---|---|---|",
    ]
    for row in rows:
        cells = " | ".join(
            f"{row.per_image_seconds[size]:.3f} ({row.bare_forward_multiple(size):.2f}×) | "
            f"{row.images_per_second[size]:.2f}"
            for size in batch_sizes
        )
        fit = "–" if row.fit_seconds is None else f"{row.fit_seconds:.1f} ({row.fit_steps} updates)"
        references = "–" if row.reference_seconds is None else f"{row.reference_seconds:.2f}"
        lines.append(
            f"| {row.method} | {row.flops_per_image / 1e9:.1f} ({row.work_multiple():.2f}×) | {cells} "
            f"| {row.text_setup_seconds:.2f} | {references} | {fit} | {row.peak_memory_mb:.0f} |"
        )
    scaled = [row for row in rows if row.k_scaling]
    lines += [
        "",
        "| method | " + " | ".join(f"k={k} (× k={ks[0]})" for k in ks) + " |",
        "|---|" + "---|" * len(ks),
    ]
    figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    for row in scaled:
        base = row.k_scaling[ks[0]]
        ratios = " | ".join(f"{row.k_scaling[k]:.3f} s ({row.k_scaling[k] / base:.2f}×)" for k in ks)
        lines.append(f"| {row.method} | {ratios} |")
        axes[1].plot(list(ks), [row.k_scaling[k] / base for k in ks], marker="o", label=row.method)
    axes[1].set(xscale="log", xlabel="references k", ylabel=f"latency / latency at k={ks[0]}")
    axes[1].set_xticks(list(ks), [str(k) for k in ks])
    axes[1].axhline(1.0, color="grey", linestyle=":")
    if scaled:
        axes[1].legend(fontsize=7)
    positions = np.arange(len(rows))
    width = 0.8 / len(batch_sizes)
    for offset, size in enumerate(batch_sizes):
        multiples = [row.bare_forward_multiple(size) for row in rows]
        axes[0].bar(positions + offset * width, multiples, width, label=f"batch {size}")
    axes[0].axhline(1.3, color="grey", linestyle=":", label="1.3×")
    axes[0].set_xticks(
        positions + width * (len(batch_sizes) - 1) / 2, [row.method for row in rows], rotation=30, ha="right"
    )
    axes[0].set(yscale="log", ylabel="per-image cost / bare backbone forward")
    axes[0].legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(out_dir / "profile.png", dpi=90)
    plt.close(figure)
    _atomic_write(out_dir / "profile.md", "\n".join(lines) + "\n\n![cost and k scaling](profile.png)\n")
