"""Config-file training runs: `accelerate launch training/train_<method>.py --config training/configs/<method>.yaml`.

A config (YAML) has four sections and an output directory:

```yaml
output_dir: runs/metacan-mvtec
model:        # `clip` (a Hub id or local CLIPModel directory) + the method's config fields
  clip: ./clip-vit-b-16-plus-240
data:         # the auxiliary dataset, through `load_benchmark`
  dataset: mvtec_ad
  root: data/mvtec_ad
  categories: null          # null: all; or a list
  splits: [train, test]     # concatenated: every category needs anomalous images
  synthetic_anomalies: 0    # N > 0: add N synthetic anomalies (DAS, exact masks) per normal image, so a
                            # normal-only split works too; synthetic_kinds: [crack, noise] restricts them
training:     # the method's training arguments (MetaLearningArguments, AfClipTrainingArguments)
  max_steps: 200
evaluation:   # the benchmark run after training (--evaluate): cross-dataset protocol
  datasets: [visa:data/visa, elpv]   # or {name, root, categories, options} entries
  k: [2, 4, 8]
  seeds: [0, 1, 2]
```

`--set section.key=value` overrides any entry (values parsed as YAML), e.g. the ablations of MetaCAN's
Table 4: `--set model.use_discriminator=false`, `--set training.meta_learning=false`. `RECIPES` lists the
methods that train.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import json
import os
from collections.abc import Sequence
from dataclasses import fields
from pathlib import Path

import yaml

SECTIONS = ("model", "data", "training", "evaluation")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML run config and apply `section.key=value` overrides."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(config) - {*SECTIONS, "output_dir"}
    if unknown:
        raise ValueError(f"{path}: unknown sections {sorted(unknown)}; expected {SECTIONS} and output_dir.")
    return apply_overrides(config, overrides)


def apply_overrides(config: dict, overrides: Sequence[str]) -> dict:
    config = copy.deepcopy(config)
    for override in overrides:
        key, equals, value = override.partition("=")
        if not equals or not key:
            raise ValueError(f"Override {override!r} is not of the form section.key=value.")
        *parents, leaf = key.split(".")
        target = config
        for parent in parents:
            target = target.setdefault(parent, {})
        target[leaf] = yaml.safe_load(value)
    return config


def _auxiliary_dataset(data: dict):
    from datasets import concatenate_datasets

    from ..data import load_benchmark
    from ..data.synthetic import with_synthetic_anomalies
    from ..synthesis import SYNTHESIS_KINDS

    own_keys = ("dataset", "root", "categories", "splits", "synthetic_anomalies", "synthetic_kinds")
    options = {key: value for key, value in data.items() if key not in own_keys}
    categories = data.get("categories") or [None]
    splits = data.get("splits", ["train", "test"])
    parts = []
    for category in categories:
        loaded = load_benchmark(data["dataset"], data.get("root"), category, **options)
        missing = set(splits) - set(loaded)
        if missing:
            raise ValueError(f"{data['dataset']} has no split(s) {sorted(missing)}; it has {sorted(loaded)}.")
        parts += [loaded[split] for split in splits]
    dataset = concatenate_datasets(parts)
    if data.get("synthetic_anomalies"):
        kinds = data.get("synthetic_kinds") or SYNTHESIS_KINDS
        dataset = with_synthetic_anomalies(dataset, int(data["synthetic_anomalies"]), kinds)
    return dataset


# method -> (trainer module, trainer class, arguments class, how its training is described)
RECIPES: dict[str, tuple[str, str, str, str]] = {
    "metacan": ("hf_fsad.training.meta_learning", "MetaLearner", "MetaLearningArguments", "AD meta-learning"),
    "afclip": (
        "hf_fsad.training.afclip",
        "AfClipTrainer",
        "AfClipTrainingArguments",
        "prompt and adapter training",
    ),
}


def _recipe(method: str):
    if method not in RECIPES:
        raise ValueError(f"No training recipe for {method!r}; available: {', '.join(sorted(RECIPES))}.")
    module, trainer, arguments, description = RECIPES[method]
    loaded = importlib.import_module(module)
    return getattr(loaded, trainer), getattr(loaded, arguments), description


def build_model(model_section: dict, seed: int, method: str = "metacan"):
    """A fresh `method` model around `model_section["clip"]`, its own layers initialised from `seed` (equal
    on every process); the other entries are config fields."""
    import torch

    from ..registry import model_class

    settings = dict(model_section)
    clip = settings.pop("clip", None)
    if not clip:
        raise ValueError("The config's model section needs `clip`: a Hub id or a local CLIPModel directory.")
    torch.manual_seed(seed)
    return model_class(method).from_clip(clip, **settings)


def train(config: dict, method: str = "metacan", resume: bool = False, evaluate: bool = False) -> dict:
    """Train `method` as `config` says; save the model (with a model card) to `config["output_dir"]`.

    Returns the training summary (also written to `output_dir/training_summary.json`).
    """
    from ..hub import model_card, write_model_card
    from .trainer import training_summary

    trainer_class, arguments_class, description = _recipe(method)
    known = {field.name for field in fields(arguments_class)}
    unknown = set(config.get("training", {})) - known
    if unknown:
        raise ValueError(f"Unknown training settings {sorted(unknown)}; known: {sorted(known)}.")
    args = arguments_class(**config.get("training", {}))
    output_dir = Path(config.get("output_dir") or f"runs/{method}")
    data = config.get("data") or {}
    if "dataset" not in data:
        raise ValueError("The config's data section needs `dataset` (a load_benchmark name).")
    model = build_model(config.get("model") or {}, args.seed, method)
    trainer = trainer_class(model, _auxiliary_dataset(data), args, output_dir)
    accelerator = trainer.accelerator
    result = trainer.train(resume=resume)
    summary = training_summary(args, result) | {"auxiliary_dataset": data}
    if accelerator.is_main_process:
        model.config.trained_on = data["dataset"]
        model.save_pretrained(output_dir)
        losses = [entry["loss"] for entry in result.history]
        text = (
            f"Trained by {description} on `{data['dataset']}` for {result.steps} steps; "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}. Arguments: see training_summary.json."
        )
        write_model_card(output_dir, model_card(model, config["model"]["clip"], [data["dataset"]], text))
        (output_dir / "training_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        if evaluate:
            summary["evaluation"] = evaluate_model(
                model, config.get("evaluation") or {}, output_dir / "evaluation"
            )
    accelerator.wait_for_everyone()
    return summary


def evaluate_model(model, evaluation: dict, out_dir: Path, fit_arguments: dict | None = None) -> str:
    """Run the benchmark protocol of the config's evaluation section on the trained model (methods fitted
    per category are fitted on each cell's references with `fit_arguments`)."""
    from ..evaluation import DatasetSpec, run_benchmark

    if not evaluation.get("datasets"):
        raise ValueError("The evaluation needs evaluation.datasets in the config.")
    run_benchmark(
        {model.config.model_type: model.eval()},
        [DatasetSpec.from_entry(entry) for entry in evaluation["datasets"]],
        ks=evaluation.get("k", [2, 4, 8]),
        seeds=evaluation.get("seeds", [0, 1, 2]),
        out_dir=out_dir,
        title=evaluation.get("title"),
        fit_arguments=fit_arguments,
    )
    return str(out_dir / "results.md")


def main(argv: Sequence[str] | None = None, method: str = "metacan") -> int:
    """The `training/train_<method>.py` command line."""
    parser = argparse.ArgumentParser(
        description=f"Train {method} from a config (run with accelerate launch)."
    )
    parser.add_argument("--config", required=True, help="YAML run config (see hf_fsad.training.recipes)")
    parser.add_argument("--max-steps", type=int, help="override training.max_steps (smoke runs)")
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument(
        "--resume", action="store_true", help="continue from the last checkpoint in output_dir"
    )
    parser.add_argument(
        "--evaluate", action="store_true", help="run the config's evaluation protocol afterwards"
    )
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override config entries"
    )
    arguments = parser.parse_args(argv)
    overrides = list(arguments.set)
    if arguments.max_steps is not None:
        overrides.append(f"training.max_steps={arguments.max_steps}")
    if arguments.output_dir:
        overrides.append(f"output_dir={arguments.output_dir}")
    config = load_config(arguments.config, overrides)
    summary = train(config, method, resume=arguments.resume, evaluate=arguments.evaluate)
    result = summary["result"]
    print(
        json.dumps({"steps": result["steps"], "final": result["history"][-1] if result["history"] else None})
    )
    return 0
