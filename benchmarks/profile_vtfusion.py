"""VTFusion fitting time (k = 4) and inference cost as multiples of one bare backbone forward, side by side.

    .venv/bin/python benchmarks/profile_vtfusion.py [--layers 12] [--fit-steps 3] [--out benchmarks/results]

Fitting: the toy size (small random backbone, 240 px) runs the full default fit (1000 updates); the
ViT-B-16-plus-240 size (random weights, 240 px, VTFusion's backbone) runs `--fit-steps` updates after the
prototypes, and the full fit is extrapolated as prototypes + 1000 x the mean update time (after the first). Inference:
medians after one warm-up call on the ViT-B-16-plus-240 size, batch 1.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from profile_metacan import markdown
from profile_winclip import write_report

from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import median_seconds
from hf_fsad.models.vtfusion.configuration_vtfusion import VtFusionConfig
from hf_fsad.models.vtfusion.modeling_vtfusion import VtFusionModel
from hf_fsad.models.vtfusion.training_vtfusion import VtFusionTrainingArguments
from hf_fsad.testing import byte_level_clip_tokenizer, small_clip_config, vit_b16_plus_240_config

DEFAULT_STEPS = VtFusionTrainingArguments().max_steps


def make_model(clip_config, **config) -> VtFusionModel:
    torch.manual_seed(0)
    model = VtFusionModel(VtFusionConfig(clip_config=clip_config, **config)).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    return model


def fit_row(label: str, model: VtFusionModel, normals: list, steps: int) -> tuple[str, float, float]:
    """(label, seconds of a full default fit (measured or extrapolated), seconds per update)."""
    started = time.perf_counter()
    model.fit(normals, class_name="fabric", steps=0)
    prototypes = time.perf_counter() - started
    result = model.fit(normals, class_name="fabric", steps=steps)
    per_step = result.seconds_per_step
    return label, prototypes + DEFAULT_STEPS * per_step, per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="vision blocks (12 = the real depth)")
    parser.add_argument("--fit-steps", type=int, default=3, help="updates timed at ViT-B-16-plus-240 size")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path, help="directory to write vtfusion_profile.{json,md}")
    args = parser.parse_args()
    if args.fit_steps < 2:
        parser.error("--fit-steps must be at least 2 (the first update is not timed)")
    normals = [
        image.convert("RGB")
        for image in load_benchmark(
            "toy", category="weave", num_train=4, num_test_good=1, num_test_anomalous=1
        )["train"]["image"]
    ]
    toy = make_model(small_clip_config(), feature_layers=[1, 2])
    layers = args.layers
    large = make_model(
        vit_b16_plus_240_config(layers), feature_layers=[layers // 4, layers // 2, 3 * layers // 4, layers]
    )
    fits = [
        fit_row(
            f"toy (small random backbone), k = 4, {DEFAULT_STEPS} updates measured",
            toy,
            normals,
            DEFAULT_STEPS,
        ),
        fit_row(
            f"ViT-B-16-plus-240 size, k = 4, {args.fit_steps} updates timed, {DEFAULT_STEPS} extrapolated",
            large,
            normals,
            args.fit_steps,
        ),
    ]

    query = large.image_processor()(normals[:1], return_tensors="pt").pixel_values
    bank = large.build_reference_bank()
    with torch.no_grad():
        bare = median_seconds(lambda: large.backbone.clip.vision_model(pixel_values=query), args.repeats)
        scored = median_seconds(lambda: large(query, reference_bank=bank), args.repeats)
        features = large.encode_images(query)
        heads = median_seconds(lambda: large.score_features(features, bank), args.repeats)
    result = {
        "backbone": f"ViT-B-16-plus-240 size, {layers} vision blocks, random weights",
        "torch_threads": torch.get_num_threads(),
        "rows": [
            ("bare backbone forward, 1 image", bare, 1.0),
            ("VTFusion, per image (batch 1)", scored, scored / bare),
            ("VTFusion heads alone (AIE, ATE, MPF; features given)", heads, heads / bare),
        ],
        "fits": fits,
    }
    text = markdown(result)
    text += "\n\n| fit (k = 4) | full fit, s | per update, s |\n|---|---|---|\n"
    text += "\n".join(f"| {label} | {total:.1f} | {per_step:.3f} |" for label, total, per_step in fits)
    write_report(args.out, "vtfusion_profile", result, text)


if __name__ == "__main__":
    main()
