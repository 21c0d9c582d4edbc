"""Benchmarks on the Hub: a DatasetDict per category as parquet + README configs, read back with `datasets`.

`write_hub_layout` writes exactly what `push_benchmark` uploads (so the format is testable offline):

    README.md                         # front matter: configs (one per category) and `hf_fsad_benchmark`
    <category>/train-00000-of-00001.parquet
    <category>/test-00000-of-00001.parquet

Images and masks are embedded in the parquet files, so the repo is self-contained.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from datasets import Dataset, DatasetDict, concatenate_datasets, get_dataset_config_names, load_dataset
from datasets.table import embed_table_storage
from huggingface_hub.repocard import metadata_load, metadata_save

from .common import FEATURES

HUB_PREFIX = "hf://datasets/"
BENCHMARK_KEY = "hf_fsad_benchmark"


def _embedded(dataset: Dataset) -> Dataset:
    """`dataset` with image files read into the table (paths alone would not travel with the repo)."""
    return (
        dataset.with_format("arrow")
        .map(embed_table_storage, batched=True, keep_in_memory=True)
        .with_format(None)
    )


def write_hub_layout(
    dataset_dict: DatasetDict, folder: str | os.PathLike, config_name: str, benchmark: str | None = None
) -> Path:
    """Write `dataset_dict` as config `config_name` of a Hub dataset repo laid out in `folder`.

    Other configs already described by `folder/README.md` are kept.
    """
    folder = Path(folder)
    readme = folder / "README.md"
    metadata = (metadata_load(readme) if readme.is_file() else None) or {}
    if benchmark is not None and metadata.get(BENCHMARK_KEY, benchmark) != benchmark:
        raise ValueError(f"{folder} holds benchmark {metadata[BENCHMARK_KEY]!r}, not {benchmark!r}.")
    for split, dataset in dataset_dict.items():
        if dataset.features != FEATURES:
            raise ValueError(f"Split {split!r} does not have the benchmark features: {dataset.features}.")

    (folder / config_name).mkdir(parents=True, exist_ok=True)
    for split, dataset in dataset_dict.items():
        _embedded(dataset).to_parquet(str(folder / config_name / f"{split}-00000-of-00001.parquet"))
    if benchmark is not None:
        metadata[BENCHMARK_KEY] = benchmark
    configs = [config for config in metadata.get("configs", []) if config.get("config_name") != config_name]
    data_files = [{"split": split, "path": f"{config_name}/{split}-*"} for split in dataset_dict]
    configs.append({"config_name": config_name, "data_files": data_files})
    metadata["configs"] = sorted(configs, key=lambda config: config["config_name"])
    if not readme.is_file():
        readme.write_text(
            f"# {benchmark or 'Anomaly detection benchmark'}\n\nWritten by hf_fsad (`push_benchmark`).\n"
        )
    metadata_save(readme, metadata)
    return folder


def push_benchmark(
    dataset_dict: DatasetDict,
    repo_id: str,
    config_name: str,
    benchmark: str | None = None,
    private: bool | None = None,
    token: str | None = None,
) -> str:
    """Upload `dataset_dict` as config `config_name` of the Hub dataset `repo_id`; returns the repo URL.

    Load it back with `load_benchmark(benchmark, root="hf://datasets/<repo_id>", category=config_name)`.
    """
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError

    api = HfApi(token=token)
    url = api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    with tempfile.TemporaryDirectory() as folder:
        try:
            hf_hub_download(repo_id, "README.md", repo_type="dataset", local_dir=folder, token=token)
        except EntryNotFoundError:
            pass
        write_hub_layout(dataset_dict, folder, config_name, benchmark)
        api.upload_folder(
            folder_path=folder, repo_id=repo_id, repo_type="dataset", commit_message=f"Add {config_name}"
        )
    return str(url)


def is_hub_layout(root: str | os.PathLike) -> bool:
    """Whether `root` is a local folder written by `write_hub_layout`."""
    readme = Path(root) / "README.md"
    return readme.is_file() and BENCHMARK_KEY in (metadata_load(readme) or {})


def load_hub_benchmark(name: str, root: str | os.PathLike, category: str | None = None) -> DatasetDict:
    """Read a benchmark pushed with `push_benchmark` (Hub id `hf://datasets/...` or a local layout)."""
    path = str(root).removeprefix(HUB_PREFIX)
    configs = get_dataset_config_names(path)
    if category is not None and category not in configs:
        raise ValueError(f"{root} has no category {category!r} (found: {', '.join(configs)}).")
    loaded = [load_dataset(path, name=config) for config in ([category] if category else configs)]
    splits = {}
    for split in loaded[0]:
        parts = [dataset_dict[split] for dataset_dict in loaded]
        for part in parts:
            if part.features != FEATURES:
                raise ValueError(
                    f"{root} split {split!r} does not have the benchmark features: {part.features}."
                )
        splits[split] = concatenate_datasets(parts)
        splits[split].info.dataset_name = name
    return DatasetDict(splits)
