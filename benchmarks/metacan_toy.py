"""MetaCAN and Table 4's ablations on toy textures: meta-learn on stripes + weave, test on the held-out grid.

    .venv/bin/python benchmarks/metacan_toy.py --out benchmarks/metacan_toy

Offline stand-in for the paper's cross-category protocol (training/configs/metacan.yaml needs MVTec AD),
on a random tiny backbone, so the table shows what training adds on top of the same frozen features, not
the method's accuracy. Rows: untrained; trained by AD meta-learning; trained by plain joint training (w/o AD
meta-learning); without the discriminator (trained); without the detector (nothing to train).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from hf_fsad.benchmark import DatasetSpec, run_benchmark
from hf_fsad.models.metacan.modeling_metacan import MetaCanModel
from hf_fsad.testing import save_random_clip, tiny_clip_config
from hf_fsad.training.meta_learning import MetaLearningArguments
from hf_fsad.training.recipes import build_model, load_config, train

CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "metacan_toy.yaml"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        clip = save_random_clip(tiny_clip_config(), Path(folder) / "clip")
        base = load_config(CONFIG, [f"model.clip={clip}"])
        seed = MetaLearningArguments(**base["training"]).seed
        models, training = {"untrained": build_model(base["model"], seed)}, {}
        variants = {
            "meta-learning": [],
            "w/o AD meta-learning": ["training.meta_learning=false"],
            "w/o discriminator": ["model.use_discriminator=false"],
        }
        for label, overrides in variants.items():
            output = Path(folder) / label.replace("/", "").replace(" ", "-")
            config = load_config(CONFIG, [f"model.clip={clip}", f"output_dir={output}", *overrides])
            summary = train(config)
            training[label] = {
                "meta_loss_first": summary["result"]["history"][0]["loss"],
                "meta_loss_last": summary["result"]["history"][-1]["loss"],
                "seconds_per_step": summary["result"]["seconds_per_step"],
            }
            models[label] = MetaCanModel.from_pretrained(output)
        models["w/o detector"] = build_model(base["model"] | {"use_detector": False}, seed)
        evaluation = base["evaluation"]
        run_benchmark(
            models,
            [DatasetSpec.parse(text) for text in evaluation["datasets"]],
            ks=evaluation["k"],
            seeds=evaluation["seeds"],
            out_dir=args.out,
            title=f"{evaluation['title']}; Table 4 ablations",
        )
    (args.out / "training.json").write_text(json.dumps(training, indent=1) + "\n")
    print(json.dumps(training, indent=1))


if __name__ == "__main__":
    main()
