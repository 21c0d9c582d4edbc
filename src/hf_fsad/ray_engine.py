"""Scoring past one machine on Ray Data (`hf-fsad score --engine ray`; the `ray` extra).

```python
import ray
from hf_fsad.ray_engine import score_to_file

ray.init()  # or ray.init("ray://head:10001"); score_to_file starts a local one when none is running
score_to_file(["queries/"], model, bank, "results.parquet", num_workers=4, num_gpus_per_worker=1)
```

Images are read and preprocessed in CPU tasks; the model scores in a pool of actors, each of which gets the
model, the bank and its calibration once from the object store (put there once by the driver), not per
batch. Each actor builds its records with `hf_fsad.batch_scoring.image_record`, the local engine's function,
so a record holds what `hf-fsad score` writes for the same image; an image that cannot be read becomes a
record with its `error` (and no score) instead of failing the job. The driver collects the records as they
come, keeps the first record of each input (a batch retried after a worker died is not written twice), and
replaces the output atomically at the end: Parquet, or JSON lines when its name ends in `.jsonl`.

Nothing here is imported by `import hf_fsad`: ray is imported when a function of this module runs.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .batch_scoring import RecordOptions, batch_scorer, image_record
from .io import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    atomic_file,
    distinct_paths,
    expand_inputs,
    json_line,
    previous_results,
    read_image,
    read_image_bytes,
    unique_name,
)

if TYPE_CHECKING:
    import ray.data

    from .bank import ReferenceBank
    from .modeling_base import FsadPreTrainedModel

# Columns a Parquet input may hold: an image path, its encoded bytes, or `datasets`' Image struct
# ({"bytes", "path"}) under "image".
INPUT_COLUMNS = ("path", "bytes", "image")
# Retries of a benchmark cell whose worker died (process killed, node lost).
CELL_RETRIES = 3


@dataclass(frozen=True)
class RayResources:
    """What each scoring actor reserves: `num_workers` actors of `num_gpus` GPUs and `num_cpus` CPUs each.
    Reserve fewer CPUs than the cluster has: the read and preprocessing tasks need some to run at all."""

    num_workers: int = 1
    num_gpus: float = 0.0
    num_cpus: float = 1.0


@dataclass
class RaySummary:
    """What `score_to_file` did: records written in this run, inputs kept from earlier runs (`--resume`),
    duplicates dropped (a retried batch), and the records of this run whose image could not be read."""

    scored: int = 0
    resumed: int = 0
    duplicates: int = 0
    errors: int = 0
    records: list[dict] = field(default_factory=list, repr=False)


def is_parquet_input(item: str | os.PathLike) -> bool:
    """Whether an input is a Parquet table of images (a `.parquet` file, a folder of them, an `hf://` path)
    rather than an image file or a folder of images."""
    text = str(item)
    if text.startswith("hf://") or text.endswith(".parquet"):
        return True
    path = Path(text)
    return path.is_dir() and any(path.rglob("*.parquet"))


def input_dataset(inputs: Sequence[str | os.PathLike]) -> ray.data.Dataset:
    """The Ray Dataset of `inputs`: image files and folders as `hf-fsad score` expands them (a `path` and
    `heatmap_name` per image, names as the local engine gives them), and Parquet tables (`is_parquet_input`:
    a `path`, `bytes` or `datasets` `image` column; `hf://datasets/...` read from the Hub without being
    materialised on one node)."""
    import ray.data

    tables = [str(item) for item in inputs if is_parquet_input(item)]
    files = [item for item in inputs if not is_parquet_input(item)]
    parts = []
    if files:
        used: set[str] = set()
        paths = distinct_paths(expand_inputs(files))
        rows = [{"path": str(path), "heatmap_name": unique_name(path.stem, used)} for path in paths]
        parts.append(ray.data.from_items(rows))
    for table in tables:
        parts.append(_parquet_dataset(table))
    if not parts:
        raise ValueError("no inputs")
    return parts[0] if len(parts) == 1 else parts[0].union(*parts[1:])


def _parquet_dataset(table: str) -> ray.data.Dataset:
    import ray.data

    filesystem = None
    if table.startswith("hf://"):
        from huggingface_hub import HfFileSystem
        from pyarrow.fs import FSSpecHandler, PyFileSystem

        filesystem, table = PyFileSystem(FSSpecHandler(HfFileSystem())), table.removeprefix("hf://")
    dataset = ray.data.read_parquet(table, filesystem=filesystem)
    columns = [name for name in INPUT_COLUMNS if name in dataset.schema().names]
    if not columns:
        raise ValueError(
            f"{table}: a Parquet input needs a `path`, `bytes` or `image` column, it has "
            f"{', '.join(dataset.schema().names)}"
        )
    return dataset.select_columns(columns)


def _row_sources(batch: dict[str, np.ndarray]) -> list[tuple[str, bytes | None]]:
    """(path, encoded bytes or None: read the path) of each row of an input batch."""
    count = len(next(iter(batch.values())))
    paths = list(batch["path"]) if "path" in batch else [None] * count
    data = list(batch["bytes"]) if "bytes" in batch else [None] * count
    if "image" in batch:
        for row, image in enumerate(batch["image"]):
            if isinstance(image, dict):
                data[row] = data[row] if image.get("bytes") is None else image["bytes"]
                paths[row] = paths[row] if paths[row] is not None else image.get("path")
            elif image is not None:
                data[row] = image
    sources = []
    for row, (path, encoded) in enumerate(zip(paths, data)):
        if path is None:
            raise ValueError(f"row {row} of a Parquet input has no `path`: the records could not name it")
        sources.append((str(path), None if encoded is None else bytes(encoded)))
    return sources


def _heatmap_name(path: str) -> str:
    """A heatmap file name for an input of a table, whose other names are not known here: its stem and a
    digest of its path."""
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:8]}"


@functools.lru_cache(maxsize=1)
def _skipped(reference) -> frozenset[str]:
    """The paths to skip, fetched once per worker process rather than once per batch."""
    import ray

    return ray.get(reference)


def _preprocess(
    batch: dict[str, np.ndarray],
    processor,
    pixel_shape: tuple[int, ...],
    max_pixels: int | None,
    keep_image: bool,
    skip: list,
) -> dict[str, np.ndarray]:
    """A CPU task: read each input not in `skip` (a reference to the paths already scored) by the local
    engine's rule (`read_image`, `read_image_bytes`) and preprocess it; an unreadable one keeps its `error`
    and zero pixels."""
    skipped = _skipped(skip[0])
    sources = _row_sources(batch)
    given = list(batch["heatmap_name"]) if "heatmap_name" in batch else [None] * len(sources)
    names = [name or _heatmap_name(path) for name, (path, _) in zip(given, sources)]  # a table's rows: None
    kept = [row for row, (path, _) in enumerate(sources) if path not in skipped]
    sources, names = [sources[row] for row in kept], [names[row] for row in kept]
    images, errors = [], []
    for path, encoded in sources:
        try:
            images.append(
                read_image(path, max_pixels) if encoded is None else read_image_bytes(encoded, max_pixels)
            )
            errors.append("")
        except ImageReadError as error:
            images.append(None)
            errors.append(str(error))
    readable = [image for image in images if image is not None]
    pixels = np.zeros((len(sources), *pixel_shape), dtype=np.float32)
    if readable:
        processed = iter(processor(readable, return_tensors="np").pixel_values)
        for row, image in enumerate(images):
            if image is not None:
                pixels[row] = next(processed)
    out = {
        "path": np.array([path for path, _ in sources], dtype=object),
        "heatmap_name": np.array(names, dtype=object),
        "error": np.array(errors, dtype=object),
        "pixel_values": pixels,
        "size": np.array([image.size if image else (0, 0) for image in images], dtype=np.int64),
    }
    if keep_image:  # the heatmap overlays draw on the image itself
        out["image"] = np.empty(len(images), dtype=object)
        for row, image in enumerate(images):
            out["image"][row] = np.asarray(image) if image else np.zeros((1, 1, 3), np.uint8)
    return out


class ScoringActor:
    """One scoring worker: the model, bank and calibration fetched once from the object store (the driver
    put them there once); each batch of preprocessed inputs -> their records, as JSON lines."""

    def __init__(self, shared: list, runtime: str, precision: str, device: str, heatmap_dir: str | None):
        import ray
        import torch

        model, bank, self.options = ray.get(shared[0])
        if runtime != "torch":  # the exported graph runs on the CPU
            device = "cpu"
        elif device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.model = model.to(device).eval()
        self.bank = bank
        self.device = device
        self.heatmap_dir = None if heatmap_dir is None else Path(heatmap_dir)
        self.score = batch_scorer(self.model, bank, runtime, precision)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch
        from PIL import Image

        good = [row for row, error in enumerate(batch["error"]) if not error]
        result = None
        if good:
            result = self.score(
                torch.from_numpy(np.ascontiguousarray(batch["pixel_values"][good])).to(self.device)
            )
        position = {row: index for index, row in enumerate(good)}
        lines = []
        for row, path in enumerate(batch["path"]):
            if row not in position:
                lines.append(json_line(_error_record(path, batch["error"][row])))
                continue
            heatmap, image = None, tuple(int(side) for side in batch["size"][row])
            if self.heatmap_dir is not None:
                heatmap = self.heatmap_dir / f"{batch['heatmap_name'][row]}.heatmap.png"
                image = Image.fromarray(np.asarray(batch["image"][row], dtype=np.uint8))
            record = image_record(
                path, image, result, position[row], self.bank.calibration, self.options, heatmap
            )
            lines.append(json_line(record))
        return {"path": batch["path"], "record": np.array(lines, dtype=object)}


def _error_record(path: str, error: str) -> dict:
    """The record of an input that could not be read: no score, the reason in `error`."""
    return {"path": str(path), "score": None, "branch_scores": {}, "heatmap": None, "error": error}


def score_dataset(
    dataset: ray.data.Dataset,
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    *,
    options: RecordOptions | None = None,
    resources: RayResources | None = None,
    batch_size: int = 8,
    runtime: str = "torch",
    precision: str = "float32",
    device: str = "auto",
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    heatmap_dir: str | os.PathLike | None = None,
    skip_paths: set[str] | None = None,
) -> ray.data.Dataset:
    """The lazy Ray Dataset of the records of `dataset`'s images (`input_dataset`'s columns): a `path` and
    its `record`, one JSON line (`json.loads` it). Inputs in `skip_paths` are left out. A tiled bank is
    refused: its images are scored whole, tile by tile, on the local engine."""
    import ray
    from ray.data import ActorPoolStrategy

    if bank.tiling is not None:
        raise ValueError("--engine ray scores untiled banks; a tiled bank scores on the local engine")
    from PIL import Image

    options, resources = options or RecordOptions(), resources or RayResources()
    bank = model.bank_or_default(bank)
    processor = model.image_processor()
    pixel_shape = processor(Image.new("RGB", (8, 8)), return_tensors="np").pixel_values.shape[1:]
    preprocessed = dataset.map_batches(
        _preprocess,
        batch_size=batch_size,
        fn_kwargs={
            "processor": processor,
            "pixel_shape": tuple(pixel_shape),
            "max_pixels": max_pixels,
            "keep_image": heatmap_dir is not None,
            "skip": [ray.put(frozenset(skip_paths or ()))],
        },
        batch_format="numpy",
    )
    if next(model.parameters()).device.type != "cpu":
        model = copy.deepcopy(model).cpu()
    shared = ray.put((model, bank, options))  # once, whatever the number of actors or batches
    return preprocessed.map_batches(
        ScoringActor,
        batch_size=batch_size,
        batch_format="numpy",
        fn_constructor_kwargs={
            "shared": [shared],
            "runtime": runtime,
            "precision": precision,
            "device": device,
            "heatmap_dir": None if heatmap_dir is None else str(heatmap_dir),
        },
        compute=ActorPoolStrategy(size=resources.num_workers),
        num_cpus=resources.num_cpus,
        num_gpus=resources.num_gpus,
    )  # an actor that dies is restarted and its batches retried: Ray Data's default (max_restarts=-1)


def read_records(output: str | os.PathLike) -> list[dict]:
    """The records of a results file (`.parquet`, or JSON lines), [] when there is none; a ValueError when
    the file is not one."""
    output = Path(output)
    if output.suffix != ".parquet":
        return previous_results(output)
    if not output.exists():
        return []
    import pyarrow.parquet

    try:
        table = pyarrow.parquet.read_table(output)
    except Exception as error:  # noqa: BLE001  (pyarrow raises ArrowInvalid, OSError, ...)
        raise ValueError(f"--output {output} is not a Parquet results file ({error})") from None
    if "path" not in table.column_names:
        raise ValueError(f"--output {output} has no `path` column: it is not a results file of hf-fsad score")
    return [{key: value for key, value in row.items() if value is not None} for row in table.to_pylist()]


def write_records(output: str | os.PathLike, records: Sequence[dict]) -> None:
    """Replace `output` atomically with `records`: Parquet (one column per field, a null where a record has
    none), or JSON lines when the name does not end in `.parquet`."""
    output = Path(output)
    with atomic_file(output) as temporary:
        if output.suffix != ".parquet":
            temporary.write_text("".join(json_line(record) for record in records))
            return
        import pyarrow
        import pyarrow.parquet

        rows = [json.loads(json_line(record)) for record in records]  # NaN -> null, as in JSON lines
        table = pyarrow.Table.from_struct_array(pyarrow.array(rows)) if rows else pyarrow.table({"path": []})
        pyarrow.parquet.write_table(table, temporary)


def score_to_file(
    inputs: ray.data.Dataset | Sequence[str | os.PathLike],
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    output: str | os.PathLike,
    *,
    resume: bool = False,
    keep_records: bool = False,
    **scoring: Any,
) -> RaySummary:
    """Score `inputs` (a Ray Dataset with `input_dataset`'s columns, or paths for it) on the running Ray
    cluster (a local one is started when none is) and write their records to `output` (`write_records`),
    atomically, when all are scored or the run is interrupted (KeyboardInterrupt: the records so far, then
    re-raised). `resume`: inputs already in `output` are kept and not scored again. The records also stream
    into `output`.ray.tmp, which a later `resume` reads too if the driver itself was killed. `scoring`:
    `score_dataset`'s options. `keep_records`: the summary holds this run's records too."""
    import ray

    output = Path(output)
    stream = output.with_name(output.name + ".ray.tmp")
    previous = _first_of_each(read_records(output) + previous_results(stream)) if resume else []
    done = {record["path"] for record in previous}
    if not ray.is_initialized():
        ray.init()
    dataset = inputs if isinstance(inputs, ray.data.Dataset) else input_dataset(inputs)
    records = score_dataset(dataset, model, bank, skip_paths=done, **scoring)
    summary = RaySummary(resumed=len(previous))
    new: list[dict] = []
    interrupted = False
    try:
        with open(stream, "w") as sink:
            sink.writelines(json_line(record) for record in previous)
            for path, line in _record_lines(records):
                if path in done:
                    summary.duplicates += 1
                    continue
                done.add(path)
                sink.write(line)
                sink.flush()
                new.append(json.loads(line))
    except KeyboardInterrupt:
        interrupted = True
    write_records(output, previous + new)
    stream.unlink(missing_ok=True)
    summary.scored = len(new)
    summary.errors = sum(1 for record in new if record.get("score") is None)
    summary.records = new if keep_records else []
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _record_lines(records: ray.data.Dataset) -> Iterator[tuple[str, str]]:
    for batch in records.iter_batches(batch_format="numpy", batch_size=None):
        yield from zip(map(str, batch["path"]), batch["record"])


def _first_of_each(records: list[dict]) -> list[dict]:
    seen: set[str] = set()
    kept = []
    for record in records:
        if record["path"] not in seen:
            seen.add(record["path"])
            kept.append(record)
    return kept


def ray_cell_map(num_cpus: float = 1.0, num_gpus: float = 0.0) -> Callable:
    """A `cell_map` for `hf_fsad.evaluation.run_benchmark`: each cell of a category runs as a Ray task
    reserving `num_cpus` CPUs and `num_gpus` GPUs (retried when its worker dies), the models, data and
    feature cache of the category put in the object store once; the outcomes come back to the driver, in
    order, which writes results.json. A feature cache on disk must be a folder every node can reach."""

    def cell_map(run_cell: Callable, cells: Sequence) -> Iterator:
        import ray

        if not cells:
            return
        shared = ray.put(run_cell)
        task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=CELL_RETRIES)(_call)
        for outcome in [task.remote(shared, cell) for cell in cells]:
            yield ray.get(outcome)

    return cell_map


def _call(function: Callable, argument: Any) -> Any:
    return function(argument)


def print_summary(summary: RaySummary, output: Path) -> None:
    """The run's one-line account on stderr, as the local engine gives it."""
    resumed = f", {summary.resumed} kept from the earlier run" if summary.resumed else ""
    errors = f" ({summary.errors} could not be read: their records say why)" if summary.errors else ""
    print(f"scored {summary.scored} inputs on Ray{errors}{resumed} -> {output}", file=sys.stderr)
