"""Trained methods on toy textures, untrained vs trained and the papers' ablations, on a random backbone.

    .venv/bin/python benchmarks/trained_toy.py metacan --out benchmarks/metacan_toy
    .venv/bin/python benchmarks/trained_toy.py afclip --out benchmarks/afclip_toy
    .venv/bin/python benchmarks/trained_toy.py vtfusion --out benchmarks/vtfusion_toy

Offline stand-ins for the papers' cross-dataset protocols (training/configs/<method>.yaml need MVTec AD),
trained and evaluated as training/configs/<method>_toy.yaml says. On random weights the tables show what
training adds on top of the same frozen features, not the methods' accuracy.
- metacan: untrained; AD meta-learning; plain joint training (w/o AD meta-learning); w/o discriminator
  (trained); w/o detector (nothing to train) — Table 4.
- afclip: untrained; attention adapter; LoRA on the vision tower instead (Table 5.3).
- vtfusion (fitted per category and k inside the runner): unfitted (prototypes only); VTFusion; the module
  ablations of Table II; one DAS anomaly type at a time (Table III).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hf_fsad.evaluation import DatasetSpec, run_benchmark
from hf_fsad.registry import method_spec
from hf_fsad.synthesis import ANOMALY_TYPES
from hf_fsad.testing import save_random_clip, small_clip_config, tiny_clip_config
from hf_fsad.training.recipes import build_model, load_config, recipe, train

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"
# method -> (backbone, trained variants as config overrides, untrained variants as model-config changes)
VARIANTS = {
    "metacan": (
        tiny_clip_config,
        {
            "meta-learning": [],
            "w/o AD meta-learning": ["training.meta_learning=false"],
            "w/o discriminator": ["model.use_discriminator=false"],
        },
        {"untrained": {}, "w/o detector": {"use_detector": False}},
    ),
    "afclip": (
        small_clip_config,
        {"adapter": [], "LoRA": ["model.adapter_type=lora"]},
        {"untrained": {}},
    ),
}


# label -> (model config changes, fit argument changes)
VTFUSION_VARIANTS = {
    "unfitted": ({}, {"steps": 0}),
    "VTFusion": ({}, {}),
    "w/o MPF": ({"use_fusion": False}, {}),
    "ATE only (w/o AIE, MPF)": ({"use_feature_adaptor": False, "use_fusion": False}, {}),
    "w/o ATE": ({"use_text_adapter": False}, {}),
    **{f"DAS {kind} only": ({}, {"anomaly_kinds": [kind]}) for kind in ANOMALY_TYPES},
}


def vtfusion(out: Path) -> None:
    """Every variant through the runner's per-cell fitting, into one results table."""
    with tempfile.TemporaryDirectory() as folder:
        clip = save_random_clip(small_clip_config(), Path(folder) / "clip")
        config = load_config(CONFIGS / "vtfusion_toy.yaml", [f"model.clip={clip}"])
        evaluation = config["evaluation"]
        for label, (changes, fit_changes) in VTFUSION_VARIANTS.items():
            run_benchmark(
                {label: build_model(config["model"] | changes, 0, config["method"])},
                [DatasetSpec.from_entry(entry) for entry in evaluation["datasets"]],
                ks=evaluation["k"],
                seeds=evaluation["seeds"],
                out_dir=out,
                title=evaluation["title"],
                fit_arguments=config["training"] | fit_changes,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("method", choices=sorted([*VARIANTS, "vtfusion"]))
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    if args.method == "vtfusion":
        vtfusion(args.out)
        return
    backbone, trained, untrained = VARIANTS[args.method]
    config_file = CONFIGS / f"{args.method}_toy.yaml"
    _, arguments_class, _ = recipe(args.method)
    with tempfile.TemporaryDirectory() as folder:
        clip = save_random_clip(backbone(), Path(folder) / "clip")
        base = load_config(config_file, [f"model.clip={clip}"])
        seed = arguments_class(**base["training"]).seed
        models = {
            label: build_model(base["model"] | changes, seed, args.method)
            for label, changes in untrained.items()
        }
        training = {}
        for label, overrides in trained.items():
            output = Path(folder) / label.replace("/", "").replace(" ", "-")
            config = load_config(config_file, [f"model.clip={clip}", f"output_dir={output}", *overrides])
            result = train(config, args.method)["result"]
            training[label] = {
                "loss_first": result["history"][0]["loss"],
                "loss_last": result["history"][-1]["loss"],
                "seconds_per_step": result["seconds_per_step"],
            }
            models[label] = method_spec(args.method).model.from_pretrained(output)
        evaluation = base["evaluation"]
        run_benchmark(
            models,
            [DatasetSpec.from_entry(entry) for entry in evaluation["datasets"]],
            ks=evaluation["k"],
            seeds=evaluation["seeds"],
            out_dir=args.out,
            title=evaluation["title"],
        )
    (args.out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    print(json.dumps(training, indent=1))


if __name__ == "__main__":
    main()
