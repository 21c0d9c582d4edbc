"""The Hugging Face Hub: model cards (with benchmark results as `model-index`), and the exact folders that
`hf-fsad push` / `hf-fsad push-bank` / `hf-fsad push-space` upload.

Uploads go through `huggingface_hub` with its usual credentials (`hf auth login` or `HF_TOKEN`); tokens are
never read or printed here. Every push first builds its folder (`stage_*`), so `--dry-run DIR` shows exactly
what would be uploaded.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import statistics
from collections import defaultdict
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

_USAGE = """```python
import hf_fsad  # registers the hf_fsad methods with AutoModel
from transformers import AutoModel

model = AutoModel.from_pretrained("{repo}")
processor = model.image_processor()
bank = model.build_reference_bank({bank_inputs})
scores = model(processor(images, return_tensors="pt").pixel_values, reference_bank=bank).image_scores
```"""
# Result metrics reported in model cards (x100, as in the benchmark tables).
CARD_METRICS = ("image_auroc", "pixel_auroc", "pixel_aupro")


def usage_snippet(model, repo: str) -> str:
    """Python that loads `repo` and scores `images` (PIL) with the references `normal_images`."""
    # a saved VTFusion holds its normal images' prototypes; every other method takes references
    holds_references = model.saves_its_references
    bank_inputs = "" if holds_references else 'processor(normal_images, return_tensors="pt").pixel_values'
    return _USAGE.format(repo=repo, bank_inputs=bank_inputs)


def eval_results(results: dict, method: str) -> list[EvalResult]:
    """`model-index` entries from a benchmark `results.json`: per dataset, shots and metric, the mean x100 over
    the method's cells (categories and seeds)."""
    values = defaultdict(list)
    for cell in results.get("cells", []):
        if cell["method"] != method or "error" in cell:  # failed cells have no metrics
            continue
        for metric in CARD_METRICS:
            value = cell["metrics"].get(metric)
            if value is not None:
                values[(cell["dataset"], cell["k"], cell.get("anomalous", 0), metric)].append(value)
    if not values:
        raise ValueError(f"results.json has no cells of method {method!r}.")
    entries = []
    for (dataset, k, anomalous, metric), numbers in sorted(values.items()):
        shots = f"{k}-shot" + (f" + {anomalous} anomalous" if anomalous else "")
        entries.append(
            EvalResult(
                task_type="image-anomaly-detection",
                task_name="Few-shot image anomaly detection",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_config=shots,
                metric_type=metric,
                metric_name=f"{metric} ({shots})",
                metric_value=round(100 * statistics.fmean(numbers), 2),
            )
        )
    return entries


def is_hub_id(name: str | None) -> bool:
    """Whether `name` is a Hub repo id (`owner/name` or `name`) rather than a local path."""
    if not name or Path(name).exists():
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def model_card(
    model,
    base_model: str | None = None,
    datasets: list[str] | None = None,
    training: str | None = None,
    results: dict | None = None,
    method: str | None = None,
    repo: str = "path/or/hub-id",
) -> ModelCard:
    """A model card for `model`: front matter (library, tags, base model, datasets, and `model-index`
    results of `method`'s cells in a benchmark `results` dict), description, paper, usage, training.

    The Hub accepts only repo ids as `base_model`: a local path is named in the training section instead."""
    model_type = model.config.model_type
    if base_model is not None and not is_hub_id(base_model):
        training = "\n\n".join(filter(None, [f"Base model: the local checkpoint `{base_model}`.", training]))
        base_model = None
    name = Path(repo).name
    data = ModelCardData(
        library_name="hf_fsad",
        tags=["anomaly-detection", "few-shot", "clip", f"hf_fsad-{model_type}"],
        base_model=base_model,
        datasets=datasets or None,
        model_name=name if results else None,
        eval_results=eval_results(results, method or model_type) if results else None,
    )
    sections = [f"# {type(model).__name__}", inspect.cleandoc(type(model).__doc__ or "")]
    if model.config.paper:
        sections += ["## Paper", model.config.paper]
    sections += ["## Usage", usage_snippet(model, repo)]
    if training:
        sections += ["## Training", training]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n\n".join(sections) + "\n")


def write_model_card(directory: str | os.PathLike, card: ModelCard) -> Path:
    """Save `card` as `directory/README.md`."""
    path = Path(directory) / "README.md"
    card.save(path)
    return path


def save_trained_model(
    model,
    directory: str | os.PathLike,
    base_model: str | None,
    datasets: list[str] | None,
    training: str,
    summary: dict,
    summary_name: str,
) -> Path:
    """The one way a trained or fitted model is saved: `save_pretrained`, a model card whose Training section
    is `training`, and the run's arguments and record as `summary_name` (JSON), all in `directory`."""
    directory = Path(directory)
    model.save_pretrained(directory)
    write_model_card(directory, model_card(model, base_model, datasets, training))
    (directory / summary_name).write_text(json.dumps(summary, indent=1) + "\n")
    return directory


def _fresh_folder(folder: str | os.PathLike) -> Path:
    folder = Path(folder)
    if folder.exists() and any(folder.iterdir()):
        raise ValueError(f"{folder} is not empty: give a new or empty folder to stage the upload in.")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def stage_model(
    model_dir: str | os.PathLike,
    folder: str | os.PathLike,
    repo_id: str,
    results_file: str | os.PathLike | None = None,
    method: str | None = None,
) -> Path:
    """The folder `hf-fsad push` uploads: the saved model's files, and a README model card (the model's own,
    or a new one; with `model-index` results when a benchmark `results.json` is given)."""
    from transformers import AutoModel

    import hf_fsad  # noqa: F401  (registers the methods)

    model_dir = Path(model_dir)
    if not (model_dir / "config.json").is_file():
        raise ValueError(
            f"{model_dir} is not a saved hf_fsad model (no config.json): save it with save_pretrained."
        )
    folder = _fresh_folder(folder)
    for item in model_dir.iterdir():
        if item.name.startswith(".") or item.name == "README.md":
            continue
        (shutil.copytree if item.is_dir() else shutil.copy2)(item, folder / item.name)
    model = AutoModel.from_pretrained(model_dir)
    results = json.loads(Path(results_file).read_text()) if results_file else None
    existing = model_dir / "README.md"
    base_model, datasets, training = None, None, None
    if existing.is_file():  # keep what the training run wrote: base model, datasets, training summary
        card = ModelCard.load(existing)
        base_model, datasets = card.data.base_model, card.data.datasets
        training = card.text.partition("## Training")[2].strip() or None
    card = model_card(model, base_model, datasets, training, results=results, method=method, repo=repo_id)
    write_model_card(folder, card)
    return folder


def stage_bank(bank_file: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """The folder `hf-fsad push-bank` uploads: the reference bank and a README saying what it fits."""
    from .bank import ReferenceBank

    bank = ReferenceBank.load(bank_file)
    folder = _fresh_folder(folder)
    shutil.copy2(bank_file, folder / Path(bank_file).name)
    front = ModelCardData(
        library_name="hf_fsad", tags=["anomaly-detection", "reference-bank", f"hf_fsad-{bank.model_type}"]
    )
    text = (
        f"---\n{front.to_yaml()}\n---\n\n# Reference bank: {bank.class_name}\n\n"
        f"A `{bank.model_type}` reference bank of {bank.k} reference images for `{bank.class_name}` (model config "
        f"hash `{bank.config_hash}`: it fits only that model). Use it with\n`hf-fsad score --model MODEL "
        f"--bank {Path(bank_file).name} ...` or `ReferenceBank.load(path)`.\n"
    )
    (folder / "README.md").write_text(text)
    return folder


def stage_space(folder: str | os.PathLike, source: str | os.PathLike | None = None) -> Path:
    """The folder `hf-fsad push-space` uploads: the Space (app.py, README.md with its front matter,
    requirements.txt) from the repository's `spaces/`, and the hf_fsad package in `package/` (pyproject,
    README, src), which requirements.txt installs (`./package[space]`): the package is not on PyPI."""
    root = Path(source) if source else Path(__file__).resolve().parents[2]
    space = root / "spaces"
    needed = [space / "app.py", space / "README.md", space / "requirements.txt", root / "pyproject.toml"]
    missing = [str(path) for path in needed if not path.is_file()]
    if missing:
        raise ValueError(
            f"Cannot stage the Space: missing {missing} (run from a checkout of the hf_fsad repository)."
        )
    folder = _fresh_folder(folder)
    for path in needed[:3]:
        shutil.copy2(path, folder / path.name)
    package = folder / "package"
    package.mkdir()
    shutil.copy2(root / "pyproject.toml", package / "pyproject.toml")
    shutil.copy2(root / "README.md", package / "README.md")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(root / "src", package / "src", ignore=ignore)
    return folder


def upload(folder: str | os.PathLike, repo_id: str, repo_type: str = "model", private: bool = False) -> str:
    """Create `repo_id` if needed and upload `folder`; returns the commit URL. Credentials: huggingface_hub's."""
    from huggingface_hub import HfApi

    api = HfApi()
    space_sdk = {"space_sdk": "gradio"} if repo_type == "space" else {}
    api.create_repo(repo_id, repo_type=repo_type, private=private, exist_ok=True, **space_sdk)
    return str(api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type=repo_type))
