"""Config-file training runs: `accelerate launch training/train_<method>.py --config training/configs/<method>.yaml`.

A config (YAML) names its method and has four sections and an output directory:

```yaml
method: metacan  # the method trained (a registry name); training/train_<method>.py checks it is its own
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
training:     # the method's training arguments (MetaCanTrainingArguments, AfClipTrainingArguments)
  max_steps: 200
evaluation:   # the benchmark run after training (--evaluate): cross-dataset protocol
  datasets: [visa:data/visa, elpv]   # or {name, root, categories, options} entries
  k: [2, 4, 8]
  seeds: [0, 1, 2]
```

`--set section.key=value` overrides any entry (values parsed as YAML), e.g. the ablations of MetaCAN's
Table 4: `--set model.use_discriminator=false`, `--set training.meta_learning=false`. The methods with a
`recipe` in `hf_fsad.registry.METHODS` train this way.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from pathlib import Path

import yaml

SECTIONS = ("model", "data", "training", "evaluation")


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> dict:
    """Read a YAML run config and apply `section.key=value` overrides."""
    config = yaml.safe_load(Path(path).read_text()) or {}
    unknown = set(config) - {*SECTIONS, "method", "output_dir"}
    if unknown:
        raise ValueError(
            f"{path}: unknown sections {sorted(unknown)}; expected {SECTIONS}, method and output_dir."
        )
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


def recipe_methods() -> list[str]:
    """The methods trained by a YAML recipe (`train`, training/train_<method>.py)."""
    from ..registry import METHODS

    return sorted(name for name, spec in METHODS.items() if spec.recipe)


def fitted_methods() -> list[str]:
    """The methods fitted per category (`fit_main`, training/fit_<method>.py)."""
    from ..registry import METHODS

    return sorted(name for name, spec in METHODS.items() if spec.model.fits_per_category)


def config_method(config: dict, method: str | None, choices: Sequence[str]) -> str:
    """The method `config` runs: `method` (an entry point's own) or the config's `method` entry. A ValueError
    names the `choices` when neither says or the method is not one of them, and refuses a config of another
    method."""
    declared = config.get("method")
    if method and declared and declared != method:
        raise ValueError(f"The config is for {declared!r}, but this command runs {method!r}.")
    method = method or declared
    if not method:
        raise ValueError(
            f"The config does not say its method: add `method: <name>`, one of {', '.join(choices)}."
        )
    if method not in choices:
        raise ValueError(f"This command does not run {method!r}; it runs {', '.join(choices)}.")
    return method


def recipe(method: str) -> tuple[type, type, str]:
    """The trainer class, training-arguments class and description of `method`'s YAML training recipe."""
    from ..registry import method_spec

    spec = method_spec(method)
    if spec.recipe is None:
        raise ValueError(f"No training recipe for {method!r}; available: {', '.join(recipe_methods())}.")
    return spec.trainer, spec.training_arguments, spec.recipe


def build_model(model_section: dict, seed: int, method: str):
    """A fresh `method` model around `model_section["clip"]`, its own layers initialised from `seed` (equal
    on every process); the other entries are config fields."""
    import torch

    from ..registry import method_spec

    settings = dict(model_section)
    clip = settings.pop("clip", None)
    if not clip:
        raise ValueError("The config's model section needs `clip`: a Hub id or a local CLIPModel directory.")
    torch.manual_seed(seed)
    return method_spec(method).model.from_clip(clip, **settings)


def train(config: dict, method: str | None = None, resume: bool = False, evaluate: bool = False) -> dict:
    """Train the config's method (`method` when given: it must match the config's `method` entry) as `config`
    says; save the model (with a model card) to `config["output_dir"]`.

    Returns the training summary (also written to `output_dir/training_summary.json`).
    """
    from ..hub import save_trained_model
    from .trainer import training_summary

    method = config_method(config, method, recipe_methods())
    trainer_class, arguments_class, description = recipe(method)
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
        losses = [entry["loss"] for entry in result.history]
        text = (
            f"Trained by {description} on `{data['dataset']}` for {result.steps} steps; "
            f"loss {losses[0]:.4f} -> {losses[-1]:.4f}. Arguments: see training_summary.json."
        )
        save_trained_model(
            model,
            output_dir,
            config["model"]["clip"],
            [data["dataset"]],
            text,
            summary,
            "training_summary.json",
        )
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


def main(argv: Sequence[str] | None = None, method: str | None = None) -> int:
    """The `training/train_<method>.py` command line: trains `method` (None: the config's method)."""
    from accelerate import PartialState

    parser = argparse.ArgumentParser(
        description=f"Train {method or 'a method'} from a config (run with accelerate launch)."
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
    # A process group left to the interpreter's exit can abort a rank in gloo's destructor.
    PartialState().destroy_process_group()
    result = summary["result"]
    print(
        json.dumps({"steps": result["steps"], "final": result["history"][-1] if result["history"] else None})
    )
    return 0


def fit_main(argv: Sequence[str] | None = None, method: str | None = None) -> int:
    """`training/fit_vtfusion.py`, for methods fitted per category (`method`; None: the config's method): a
    config's model section (`clip` + config fields), its training section (`fit` arguments: steps,
    anomaly_kinds, learning rates) and its evaluation section (datasets, k, seeds)."""
    from ..registry import method_spec

    parser = argparse.ArgumentParser(
        description=f"Fit {method or 'a method'} per category and k, and score each test split."
    )
    parser.add_argument(
        "--config", required=True, help="YAML run config (see training/configs/vtfusion.yaml)"
    )
    parser.add_argument("--output-dir", help="override output_dir")
    parser.add_argument(
        "--set", nargs="*", default=[], metavar="SECTION.KEY=VALUE", help="override config entries"
    )
    arguments = parser.parse_args(argv)
    overrides = list(arguments.set) + ([f"output_dir={arguments.output_dir}"] if arguments.output_dir else [])
    config = load_config(arguments.config, overrides)
    method = config_method(config, method, fitted_methods())
    fit_arguments = dict(config.get("training") or {})
    known = {item.name for item in fields(method_spec(method).training_arguments)} - {"max_steps"} | {"steps"}
    unknown = set(fit_arguments) - known
    if unknown:
        raise ValueError(f"Unknown fit settings {sorted(unknown)}; known: {sorted(known)}.")
    model = build_model(config.get("model") or {}, 0, method)
    out_dir = Path(config.get("output_dir") or f"runs/{method}")
    print(evaluate_model(model, config.get("evaluation") or {}, out_dir, fit_arguments))
    return 0


def dreambooth_main(argv: Sequence[str] | None = None) -> int:
    """`training/train_dreambooth_lora.py`: fit One-to-Normal (LoRA + anomaly-free pool) on a folder of normal
    images and save it (with the LoRA beside the weights)."""
    from ..hub import save_trained_model
    from ..io import expand_inputs, readable_images
    from ..registry import method_spec

    spec = method_spec("one_to_normal")
    arguments_class = spec.training_arguments
    parser = argparse.ArgumentParser(
        description="Fit One-to-Normal's anomaly-free customised model (DreamBooth: a LoRA, or --full-finetune)."
    )
    parser.add_argument("--normal", nargs="+", required=True, help="normal images or directories")
    parser.add_argument("--class-name", required=True, help="object name of the prompts, e.g. bottle")
    parser.add_argument("--out", required=True, help="directory for the fitted model")
    parser.add_argument("--clip", default="openai/clip-vit-large-patch14", help="CLIP Hub id or directory")
    parser.add_argument(
        "--diffusion-model",
        default=spec.config.diffusion_model,
        help="Stable Diffusion to personalise: a Hub id or a diffusers folder (default %(default)s)",
    )
    parser.add_argument("--steps", type=int, default=arguments_class.max_steps)
    parser.add_argument("--num-class-images", type=int, default=arguments_class.num_class_images)
    parser.add_argument("--learning-rate", type=float, default=arguments_class.learning_rate)
    parser.add_argument(
        "--full-finetune",
        action="store_true",
        help="train every UNet weight, as the paper's DreamBooth, instead of a LoRA (try --learning-rate 5e-6)",
    )
    parser.add_argument("--resolution", type=int, default=240, help="CLIP input side (the paper's 240)")
    parser.add_argument(
        "--diffusion-resolution",
        type=int,
        help="Stable Diffusion's input side (default: --resolution; the paper does not state it)",
    )
    parser.add_argument(
        "--text-temperature",
        type=float,
        default=spec.config.text_temperature,
        help="of Eq. 6's softmax (default %(default)s: CLIP's logit scale; 1: Eq. 6 as printed, no scale)",
    )
    parser.add_argument("--pool-size", type=int, default=30, help="anomaly-free pool: normals + generated")
    parser.add_argument("--seed", type=int, default=0)
    arguments = parser.parse_args(argv)
    normals = [
        image for _, image in readable_images(expand_inputs(arguments.normal, "normal image"), "normal image")
    ]
    if not normals:
        parser.error("none of the --normal images could be read")
    model = method_spec("one_to_normal").model.from_clip(
        arguments.clip,
        image_size=arguments.resolution,
        diffusion_model=arguments.diffusion_model,
        diffusion_resolution=arguments.diffusion_resolution or arguments.resolution,
        text_temperature=arguments.text_temperature,
        pool_size=arguments.pool_size,
    )
    fit_arguments = {
        "steps": arguments.steps,
        "seed": arguments.seed,
        "num_class_images": arguments.num_class_images,
        "learning_rate": arguments.learning_rate,
        "full_finetune": arguments.full_finetune,
    }
    result = model.fit(normals, class_name=arguments.class_name, **fit_arguments)
    text = f"Fitted on {len(normals)} normal images of `{model.config.fitted_class_name}` for {result.steps} steps."
    summary = {"arguments": fit_arguments, "result": asdict(result)}
    save_trained_model(model, arguments.out, arguments.clip, None, text, summary, "fit_summary.json")
    print(f"fitted One-to-Normal on {len(normals)} normal images -> {arguments.out}")
    return 0
