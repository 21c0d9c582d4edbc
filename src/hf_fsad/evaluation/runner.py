"""The evaluation runner: methods x datasets x k-shots x seeds -> results.json (tables and plots: `report`).

```python
from hf_fsad.evaluation import DatasetSpec, run_benchmark
run_benchmark({"winclip": model}, [DatasetSpec("elpv")], ks=[2, 4], seeds=[0, 1, 2], out_dir="runs/elpv")
```

Protocol: per (dataset, category), k references are drawn from the normal training pool by a seeded
sampler and written to a manifest (`out/manifests/...`, reused on reruns, so a rerun is exact); the whole
test split is scored. k = 0 is zero-shot (one cell, no seeds). A model trained on another dataset records
it in `config.trained_on`, which the results carry (cross-dataset protocols). Backbone features are cached
per image and `model.feature_key()`, so every image is encoded once per backbone and feature kind, and
reused across k, seeds and methods. Finished cells are kept in results.json and skipped on a rerun, unless
the category's images changed (added, removed or relabelled: cells and manifests record a `data_id` of
them, and such cells run again on newly drawn references).
Each cell's bank is built and calibrated by the policy of the CLI, the pipeline and the Space
(`hf_fsad.calibration_policy.calibrated_bank`) for the protocol's false-alarm rate: on the protocol's
validation normals, or leave-one-out on its k references where the validation normals chose the anomalous
memory's weights (or none are drawn); and the cell records F1, false-alarm and miss rates of the test
images at that threshold beside the threshold-free metrics.
Images are preprocessed as each method's published evaluation did (`model.paper_image_processor()`: resize and
centre crop for MetaCAN and WinCLIP, whole-image resize for the others), and masks go through the same
geometry (nearest neighbour), so pixel metrics compare the pixels the model saw.
A run with a `Tiling` makes tiled cells (`hf_fsad.evaluation.tiled_cells`): their own cell ids (the tiling is
part of the id and of the record, so a resumed run never mixes tiled and untiled cells), tiles encoded in each
cell rather than cached, and metrics at the test images' full resolution.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import itertools
import json
import logging
import os
import time
import typing
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset
from PIL import Image

from ..bank import ReferenceBank
from ..calibration_inputs import calibration_mismatch
from ..calibration_policy import EncodedReferences, calibrated_bank
from ..data import ReferenceManifest, class_name_for, load_benchmark, sample_references
from ..data.sampling import row_indices, select_ids
from ..export import SCORING_RUNTIMES, ExportedScorer, check_exportable
from ..features import FeatureCache
from ..io import atomic_write_text, to_upright_rgb
from ..modeling_base import FsadPreTrainedModel
from ..progress import progress_bar
from ..tiled_scoring import fit_tiled
from ..tiling import Tiling
from ..visualization import mask_array
from .cell_records import calibration_record, decisions, metrics
from .cells import Cell, DatasetSpec, cell_id
from .report import plot_category, results_markdown, shots_label
from .tiled_cells import maps_at, mask_at, metrics_size, score_tiled_images

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Protocol:
    """How references and test images are drawn per (category, seed).

    anomalous_shots: numbers of anomalous references to run (0 = normal references only); they are drawn
    from the test split's anomalous images and every cell of a seed leaves out the same
    max(anomalous_shots) images, so methods compare on one test set. num_validation: normal train images
    kept for weight validation (methods with `validates_weights`); where leave-one-out cannot calibrate a
    cell, they calibrate it instead (unless they chose its weights). max_test: cap on scored test images
    (seeded subset; the anomalous-memory paper scores up to 100 per class). false_alarm_rate: the rate the
    calibrated threshold of every cell is set for (conformal, `hf_fsad.calibration`).
    """

    anomalous_shots: tuple[int, ...] = (0,)
    num_validation: int = 0
    max_test: int | None = None
    false_alarm_rate: float = 0.05

    def __post_init__(self):
        if not 0 < self.false_alarm_rate < 1:
            raise ValueError(f"false_alarm_rate must lie in (0, 1), got {self.false_alarm_rate}.")

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
        manifest = ReferenceManifest.load(path)
        if manifest.data_id in (None, split.data_id):  # None: written before data ids were recorded
            return manifest
        logger.warning("%s was drawn from other images of %s: drawing anew", path, split.category)
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
    manifest = dataclasses.replace(manifest, data_id=split.data_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    manifest.save(path)
    return manifest


def _test_masks(test: Dataset, to_array: typing.Callable) -> np.ndarray | None:
    """Boolean masks, each made an array by `to_array` (e.g. `mask_array` at the model's input size), or None
    unless every anomalous test image has a mask: pixel metrics are then left out (e.g. ELPV has image labels
    only)."""
    masks, labels = test["mask"], test["label"]
    if not any(labels) or any(label and mask is None for label, mask in zip(labels, masks)):
        return None
    return np.stack([to_array(mask) for mask in masks])


@torch.no_grad()
def _score(
    model: FsadPreTrainedModel, features: dict, bank, batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    model.warn_if_untrained()
    scores, maps = [], []
    count = next(iter(features.values())).shape[0]
    for start in range(0, count, batch_size):
        output = model.score_features({n: t[start : start + batch_size] for n, t in features.items()}, bank)
        scores.append(output.image_scores.float().cpu().numpy())
        if output.anomaly_maps is not None:
            maps.append(output.anomaly_maps.float().cpu().numpy())
    return np.concatenate(scores), np.concatenate(maps) if maps else None


def _score_exported(
    scorer: ExportedScorer, model: FsadPreTrainedModel, images: Sequence[Image.Image], batch_size: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """`_score` on the exported graph: images preprocessed as for the feature cache, then scored by `scorer`."""
    model.warn_if_untrained()
    outputs = [
        scorer(_paper_pixel_values(model, images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    maps = [output.anomaly_maps.numpy() for output in outputs if output.anomaly_maps is not None]
    return np.concatenate([output.image_scores.numpy() for output in outputs]), (
        np.concatenate(maps) if maps else None
    )


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
    generated_references: ReferenceGenerator | None = None,
    runtime: str = "torch",
    tiling: Tiling | None = None,
    cell_map: CellMap | None = None,
) -> dict:
    """Run every cell not already in `out_dir/results.json`; write results, table and plots. Returns the
    results dict (cells + feature-cache statistics + wall time).

    A cell is (method, dataset, category, k, anomalous references, seed). Methods that need anomalous
    references (`needs_anomalous_references`) run the protocol's anomalous shots > 0, the others 0. Methods
    fitted per category (`fits_per_category`, e.g. VTFusion) fit a copy of the model on each cell's k normal
    references, with the cell's seed and `fit_arguments` (e.g. steps, anomaly_kinds). `generated_references`
    (e.g. One-to-Normal's `GeneratedReferences`) adds generated anomaly-free images to every other method's
    k references. `runtime` scores the test images with PyTorch (default: on cached features) or with each
    cell's model and bank exported to "onnxruntime" or "openvino" (`ExportedScorer`: one export per cell, test
    images encoded by the exported graph); references and calibration stay in PyTorch.
    A cell that raises is recorded with its error (results.json and a "Failed cells" table) and the run goes
    on; a rerun tries it again. `tiling`: every cell scored tiled (`hf_fsad.evaluation.tiled_cells`).
    `cell_map(run_cell, cells)`: runs a category's cells elsewhere (`hf_fsad.ray_engine.ray_cell_map`: as Ray
    tasks) and yields their outcomes in order; this process stays the one writer of results.json.
    """
    protocol = protocol or Protocol()
    if runtime not in SCORING_RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose from {SCORING_RUNTIMES}.")
    if runtime != "torch":
        for model in models.values():
            check_exportable(model)
    fitting = [name for name, model in models.items() if model.fits_per_category]
    if fitting and 0 in ks:
        raise ValueError(f"{', '.join(fitting)} fit on k normal images: k = 0 (zero-shot) is not possible.")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    results_file = out_dir / "results.json"
    previous = json.loads(results_file.read_text()) if results_file.is_file() else {}
    results_by_id = {cell_id(cell): cell for cell in previous.get("cells", [])}
    cache = feature_cache or FeatureCache(out_dir / "feature_cache")
    started = time.perf_counter()
    skipped = 0

    for split in _category_splits(datasets):
        first_seed_scores, shown = {}, None
        cells = list(_cells(models, split, ks, seeds, protocol.anomalous_shots, tiling))
        # failed cells run again, and so do cells calibrated for another rate
        todo = [
            cell for cell in cells if not _is_finished(results_by_id.get(cell.id), protocol, runtime, split)
        ]
        skipped += len(cells) - len(todo)
        run_cell = functools.partial(
            _cell_outcome, models, cache, out_dir, split, protocol, batch_size, fit_arguments or {},
            generated_references, runtime,
        )  # fmt: skip
        if cell_map is not None:  # drawn here, so that cells running at once do not draw one manifest twice
            for cell in todo:
                _cell_manifest(out_dir, split, cell, protocol)
        outcomes = map(run_cell, todo) if cell_map is None else cell_map(run_cell, todo)
        progress = progress_bar(total=len(todo), desc=f"{split.dataset}/{split.category}", unit="cell")
        for cell, (run, hits, misses) in zip(todo, outcomes):
            progress.update(1)
            if cell_map is not None:  # counted on the copy of the cache the cell ran with
                cache.hits, cache.misses = cache.hits + hits, cache.misses + misses
            if isinstance(run, str):
                logger.warning("cell %s failed: %s", cell.id, run)
                results_by_id[cell.id] = cell.record | {"error": run}
            else:
                results_by_id[cell.id] = cell.record | run.values
                logger.info("cell %s: %.1f s", cell.id, run.values["seconds"])
                if cell.seed == seeds[0]:
                    first_seed_scores[(cell.method, cell.k, cell.anomalous)] = (run.scores, run.labels)
                    if run.maps is not None:
                        shown = (f"{cell.method} k={shots_label(cell.k, cell.anomalous)}", run)
            _write_results(results_file, results_by_id, cache, started, skipped)
        progress.close()
        if first_seed_scores:
            plot_category(out_dir, split.dataset, split.category, first_seed_scores, shown, num_heatmaps)

    results = _write_results(results_file, results_by_id, cache, started, skipped)
    plots = sorted((out_dir / "plots").glob("*.png")) if (out_dir / "plots").is_dir() else []
    atomic_write_text(out_dir / "results.md", results_markdown(results, title, [path.name for path in plots]))
    return results


def _cell_outcome(
    models: dict[str, FsadPreTrainedModel],
    cache: FeatureCache,
    out_dir: Path,
    split: _CategorySplit,
    protocol: Protocol,
    batch_size: int,
    fit_arguments: dict,
    generated_references: ReferenceGenerator | None,
    runtime: str,
    cell: Cell,
) -> tuple[_CellRun | str, int, int]:
    """`cell`'s run, or the error message when it raised (one failing cell is reported and the others
    run); and the feature-cache hits and misses it made."""
    hits, misses = cache.hits, cache.misses
    try:
        run = _run_cell(
            models[cell.method], cache, out_dir, split, cell, protocol, batch_size, fit_arguments,
            generated_references, runtime,
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001
        run = f"{type(error).__name__}: {error}"
    return run, cache.hits - hits, cache.misses - misses


# (run_cell, cells) -> each cell's `run_cell(cell)`, in order.
CellMap = typing.Callable[[typing.Callable, Sequence["Cell"]], typing.Iterable]


class ReferenceGenerator(typing.Protocol):
    """Makes extra anomaly-free references from a cell's k normal images, e.g. One-to-Normal's
    `GeneratedReferences` (paper Sec. 4.3); the runner adds them to every other method's references."""

    count: int

    def generate(self, normal_images: Sequence[Image.Image], class_name: str, seed: int) -> list[Image.Image]:
        """`count` anomaly-free images made from `normal_images`, seeded."""
        ...


def _generated_features(
    model: FsadPreTrainedModel, images: Sequence[Image.Image], batch_size: int
) -> dict[str, torch.Tensor]:
    """`model`'s features of generated images, preprocessed as its paper's evaluation."""
    parts = [
        model.encode_images(_paper_pixel_values(model, images[start : start + batch_size]))
        for start in range(0, len(images), batch_size)
    ]
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]}


def _rgb_images(rows: Dataset) -> list[Image.Image]:
    """The images of `rows` as the CLI reads files (`to_upright_rgb`), for methods that take PIL images."""
    return [to_upright_rgb(image) for image in rows["image"]]


def _paper_pixel_values(model: FsadPreTrainedModel, images: Sequence[Image.Image]) -> torch.Tensor:
    """`images` preprocessed as `model`'s paper evaluated (the feature cache's preprocessing)."""
    return model.paper_image_processor()(
        [to_upright_rgb(image) for image in images], return_tensors="pt"
    ).pixel_values


@dataclass
class _CategorySplit:
    dataset: str
    category: str
    train: Dataset
    test: Dataset

    @functools.cached_property
    def data_id(self) -> str:
        """The identity of the category's images: their ids in each split and the test labels. Cells and
        manifests record it, so a rerun after images were added, removed or relabelled runs again."""
        content = [sorted(self.train["path"]), sorted(zip(self.test["path"], self.test["label"]))]
        return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


@dataclass
class _CellRun:
    scores: np.ndarray
    maps: np.ndarray | None
    labels: np.ndarray
    masks: np.ndarray | None
    test: Dataset
    values: dict
    crop: bool


def _is_finished(cell: dict | None, protocol: Protocol, runtime: str, split: _CategorySplit) -> bool:
    """Whether a saved cell needs no rerun: it ran without error, calibrated for the protocol's rate, on
    `runtime`, on the split's current images (cells saved before data ids were recorded count as current)."""
    return (
        cell is not None
        and "error" not in cell
        and cell.get("target_false_alarm_rate") == protocol.false_alarm_rate
        and cell.get("runtime", "torch") == runtime
        and cell.get("data_id", split.data_id) == split.data_id
    )


def _calibrated_bank(
    model: FsadPreTrainedModel,
    references: EncodedReferences | list[Image.Image] | None,
    class_name: str,
    anomalous_references: Dataset | None,
    validation_normals: list[Image.Image],
    protocol: Protocol,
    batch_size: int,
    runtime: str = "torch",
    tiling: Tiling | None = None,
) -> tuple[ReferenceBank, dict]:
    """The cell's bank, by the policy of the CLI, pipeline and Space (`calibrated_bank`, in the paper
    preprocessing, or tiled by `tiling` from reference images): from its references and anomalous references (with their masks when every one has one),
    its score weights chosen on the validation normals (methods with `validates_weights`), calibrated for the
    protocol's rate on the validation normals or leave-one-out; and the cell's calibration record. On an
    exported `runtime` the validation normals are scored by the exported graph, as the test images are; a
    leave-one-out calibration (fitted in PyTorch) is refused there, as `hf-fsad score` refuses it. Why it is
    not calibrated, or the calibration's warnings (too few normals for the rate asked), become the cell's
    note, so a run of many cells reports them in its table rather than once per cell; `calibration_seconds`
    times the whole policy (bank, weight search, calibration)."""
    defects, masks = [], None
    if anomalous_references is not None:
        defects = _rgb_images(anomalous_references)
        masks = anomalous_references["mask"]
        masks = None if any(mask is None for mask in masks) else masks
    started = time.perf_counter()
    made = calibrated_bank(
        model,
        references,
        class_name=class_name,
        defects=defects,
        defect_masks=masks,
        held_out_normals=validation_normals,
        false_alarm_rate=protocol.false_alarm_rate,
        paper_preprocessing=tiling is None,
        tiling=tiling,
        batch_size=batch_size,
        runtime=runtime,
        runtime_scorer=None if runtime == "torch" else lambda bank: ExportedScorer(model, bank, runtime),
    )
    note = made.refusal
    calibration = made.bank.calibration
    if note is None and calibration is not None:
        note = calibration_mismatch(calibration, runtime, calibration.precision)
        if note is not None:
            note += " (leave-one-out on an export would take one export per reference)"
    if note is not None and not validation_normals:
        note += ", and no validation normals (Protocol.num_validation, --validation)"
    bank = made.bank if note is None else dataclasses.replace(made.bank, calibration=None)
    return bank, calibration_record(bank, note, made.warnings, started, protocol.false_alarm_rate, made.notes)


def _run_cell(
    model: FsadPreTrainedModel,
    cache: FeatureCache,
    out_dir: Path,
    split: _CategorySplit,
    cell: Cell,
    protocol: Protocol,
    batch_size: int,
    fit_arguments: dict,
    generated_references: ReferenceGenerator | None = None,
    runtime: str = "torch",
) -> _CellRun:
    """Score one cell of `split`: k normal and `anomalous` anomalous references drawn with `seed`."""
    k, anomalous, seed, tiling = cell.k, cell.anomalous, cell.seed, cell.tiling
    if tiling is not None and generated_references is not None:
        raise ValueError("Generated references are not tiled: run tiled cells without them.")
    started = time.perf_counter()
    manifest = _cell_manifest(out_dir, split, cell, protocol)
    test = split.test
    if manifest is not None and manifest.test_ids is not None:
        test = select_ids(split.test, manifest.test_ids)
    size, crop = model.config.image_size, model.config.paper_preprocessing == "crop"
    class_name = class_name_for(split.dataset, split.category)
    references, reference_images, fit_seconds = None, [], None
    if model.fits_per_category:
        model = copy.deepcopy(model)
        normals = _rgb_images(split.train.select(row_indices(split.train, manifest.image_ids)))
        fit_seconds = time.perf_counter()
        if tiling is None:
            model.fit(normals, class_name=class_name, **({"seed": seed} | fit_arguments))
        else:
            fit_tiled(model, normals, tiling, class_name, **({"seed": seed} | fit_arguments))
        fit_seconds = time.perf_counter() - fit_seconds
    elif k > 0 and tiling is not None:
        reference_images = _rgb_images(split.train.select(row_indices(split.train, manifest.image_ids)))
    elif k > 0:
        rows = row_indices(split.train, manifest.image_ids)
        features = cache.features(model, split.train, rows, batch_size, "references")
        references = EncodedReferences(features)
        if generated_references is not None:
            normals = _rgb_images(split.train.select(rows))
            images = generated_references.generate(normals, class_name, seed)
            extra = _generated_features(model, images, batch_size)
            features = {
                name: torch.cat([tensor, extra[name].to(tensor.device)]) for name, tensor in features.items()
            }
            references = EncodedReferences(features, generated=len(images))
    anomalous_ids = manifest.anomalous_ids[:anomalous] if manifest is not None else []
    anomalous_references = select_ids(split.test, anomalous_ids) if anomalous_ids else None
    validation_ids = manifest.validation_ids if manifest is not None else None
    validation_normals = _rgb_images(select_ids(split.train, validation_ids)) if validation_ids else []
    bank, calibration = _calibrated_bank(
        model,
        references if tiling is None else reference_images,
        class_name,
        anomalous_references,
        validation_normals,
        protocol,
        batch_size,
        runtime,
        tiling,
    )
    if tiling is not None:
        test_images = _rgb_images(test)
        scores, tile_maps = score_tiled_images(model, bank, test_images, batch_size, runtime)
        full_size, crop = metrics_size(test_images), False
        maps = None if tile_maps is None else maps_at(tile_maps, full_size)
        masks = _test_masks(test, functools.partial(mask_at, size=full_size))
    else:
        scores, maps = _untiled_scores(model, cache, split, test, bank, batch_size, runtime)
        masks = _test_masks(test, functools.partial(mask_array, size=size, crop=crop))
    labels = np.asarray(test["label"])
    validation_auroc = bank.tensors.get("validation_auroc")
    values = {
        "trained_on": model.config.trained_on,
        "metrics": metrics(labels, scores, masks, maps),
        "num_test": int(test.num_rows),
        "reference_ids": manifest.image_ids if manifest else [],
        "anomalous_ids": anomalous_ids,
        "validation_auroc": float(validation_auroc) if validation_auroc is not None else None,
        "fit_seconds": fit_seconds,
        "runtime": runtime,
        "metrics_size": list(full_size) if tiling is not None else [size, size],
        "data_id": split.data_id,
        "generated_references": bank.generated_references,
        **calibration,
        **decisions(calibration["calibration"], labels, scores),
        "seconds": time.perf_counter() - started,
        "image_scores": scores.tolist(),
    }
    return _CellRun(scores, maps, labels, masks, test, values, crop)


def _cell_manifest(
    out_dir: Path, split: _CategorySplit, cell: Cell, protocol: Protocol
) -> ReferenceManifest | None:
    """The manifest of the images `cell` draws (drawn and saved on first use), None when it draws none."""
    draws = cell.k > 0 or cell.anomalous > 0 or protocol.draws_from_test or protocol.num_validation > 0
    return _manifest(out_dir, split, cell.k, cell.seed, protocol) if draws else None


def _untiled_scores(
    model: FsadPreTrainedModel,
    cache: FeatureCache,
    split: _CategorySplit,
    test: Dataset,
    bank: ReferenceBank,
    batch_size: int,
    runtime: str,
) -> tuple[np.ndarray, np.ndarray | None]:
    """The test images' scores and maps at the model's input size: on cached features, or exported."""
    if runtime == "torch":
        test_features = cache.features(
            model, test, range(test.num_rows), batch_size, f"{split.dataset}/{split.category} test"
        )
        return _score(model, test_features, bank, batch_size)
    return _score_exported(ExportedScorer(model, bank, runtime), model, test["image"], batch_size)


def _category_splits(datasets: Sequence[DatasetSpec]) -> Iterator[_CategorySplit]:
    """Each category of each dataset, loaded when its turn comes."""
    for spec in datasets:
        if spec.categories:
            for category in spec.categories:
                data = load_benchmark(spec.name, spec.root, category, **spec.options)
                yield _CategorySplit(spec.name, category, data["train"], data["test"])
            continue
        data = load_benchmark(spec.name, spec.root, None, **spec.options)
        for category in sorted(set(data["test"]["category"])):
            yield _CategorySplit(
                spec.name, category, _only(data["train"], category), _only(data["test"], category)
            )


def _cells(
    models: dict[str, FsadPreTrainedModel],
    split: _CategorySplit,
    ks: Sequence[int],
    seeds: Sequence[int],
    anomalous_shots: Sequence[int],
    tiling: Tiling | None = None,
) -> Iterator[Cell]:
    """The cells of one category in the order they run: by method, anomalous shots, k, seed. A method runs the
    anomalous shots > 0 if it needs anomalous references, else 0; zero-shot cells (no references) run once."""
    for (method, model), anomalous, k in itertools.product(models.items(), anomalous_shots, ks):
        if (anomalous > 0) != model.needs_anomalous_references:
            continue
        zero_shot = k == 0 and anomalous == 0
        for seed in seeds[:1] if zero_shot else seeds:
            yield Cell(method, split.dataset, split.category, k, seed, anomalous, tiling)


def _only(dataset: Dataset, category: str) -> Dataset:
    return dataset.filter(lambda name: name == category, input_columns="category")


def _write_results(path: Path, cells: dict, cache: FeatureCache, started: float, skipped: int) -> dict:
    results = {
        "cells": list(cells.values()),
        "feature_cache": {"hits": cache.hits, "misses": cache.misses, "hit_rate": cache.hit_rate},
        "skipped_cells": skipped,
        "wall_seconds": time.perf_counter() - started,
    }
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")
    return results
