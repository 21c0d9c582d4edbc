"""MetaCAN cost as multiples of one bare backbone forward, and the cost of one meta-learning task, side by side.

    .venv/bin/python benchmarks/profile_metacan.py [--layers 12] [--repeats 5] [--out benchmarks/results]

Random weights of ViT-B-16-plus-240 size (MetaCAN's backbone; no pretrained weights offline). Timings are
medians after one warm-up call; the ratios are the result. The meta-learning rows time one task's
inner + outer computation (support 4+4, query 16+16 queries, k = 2) on cached features, i.e. without the
backbone (frozen: features are encoded once per image), with second- and first-order inner gradients.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from profile_winclip import write_report

from hf_fsad.evaluation import median_seconds
from hf_fsad.models.metacan.configuration_metacan import MetaCanConfig
from hf_fsad.models.metacan.modeling_metacan import MetaCanModel
from hf_fsad.models.metacan.training_metacan import MetaCanTrainingArguments, TaskBatch, meta_objective
from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config


def task_seconds(model: MetaCanModel, repeats: int, first_order: bool) -> float:
    """One task's meta-objective and its backward on random features of the real shapes."""
    generator = torch.Generator().manual_seed(1)
    grid, width = model.config.num_patches, model.config.clip_config.vision_config.hidden_size

    def levels(count: int) -> list[torch.Tensor]:
        return [torch.randn(count, grid, width, generator=generator) for _ in model.config.feature_layers]

    task = TaskBatch(
        levels(2), levels(8), torch.tensor([0] * 4 + [1] * 4), levels(32), torch.tensor([0] * 16 + [1] * 16)
    )
    args = MetaCanTrainingArguments(first_order=first_order)
    text = torch.randn(2, model.config.clip_config.projection_dim, generator=generator)
    params = dict(model.head.named_parameters())

    def step():
        loss, _ = meta_objective(model.head, params, [task], text, args)
        loss.backward()
        model.head.zero_grad()

    return median_seconds(step, repeats)


def profile(layers: int, repeats: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = MetaCanModel(
        MetaCanConfig(
            clip_config=vit_b16_plus_240_config(layers), feature_layers=[1, (layers + 1) // 2, layers]
        )
    )
    model = model.eval()
    model.tokenizer = byte_level_clip_tokenizer()
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(8, 3, size, size, generator=generator)
    queries = torch.randn(batch_size, 3, size, size, generator=generator)
    with torch.no_grad():
        bare = median_seconds(lambda: model.backbone.clip.vision_model(pixel_values=queries[:1]), repeats)
        bank2 = model.build_reference_bank(references[:2])
        bank8 = model.build_reference_bank(references)
        features = model.encode_images(queries[:1])
        per_image = median_seconds(lambda: model(queries[:1], reference_bank=bank2), repeats)
        scoring_only = median_seconds(lambda: model.score_features(features, bank2), repeats)
        per_image_k8 = median_seconds(lambda: model(queries[:1], reference_bank=bank8), repeats)
        batch = median_seconds(lambda: model(queries, reference_bank=bank2), repeats) / batch_size
    second_order = task_seconds(model, repeats, first_order=False)
    first_order = task_seconds(model, repeats, first_order=True)
    return {
        "backbone": f"ViT-B-16-plus-240 size, {layers} vision blocks, random weights",
        "torch_threads": torch.get_num_threads(),
        "rows": [
            ("bare backbone forward, 1 image", bare, 1.0),
            ("MetaCAN 2-shot, per image (batch 1)", per_image, per_image / bare),
            ("MetaCAN 2-shot, scoring alone (features given)", scoring_only, scoring_only / bare),
            ("MetaCAN 8-shot, per image (batch 1)", per_image_k8, per_image_k8 / bare),
            (f"MetaCAN 2-shot, per image (batch {batch_size})", batch, batch / bare),
            ("meta-learning, one task (4+4 / 16+16, k=2), second order", second_order, second_order / bare),
            ("meta-learning, one task, first order", first_order, first_order / bare),
        ],
    }


def markdown(result: dict) -> str:
    return "\n".join(
        [
            f"Backbone: {result['backbone']}; torch threads: {result['torch_threads']}.",
            "",
            "| what | seconds | x bare forward |",
            "|---|---|---|",
            *[f"| {name} | {seconds:.3f} | {ratio:.2f} |" for name, seconds, ratio in result["rows"]],
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="vision blocks (12 = the real depth)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="directory to write metacan_profile.{json,md}")
    args = parser.parse_args()
    result = profile(args.layers, args.repeats, args.batch_size)
    write_report(args.out, "metacan_profile", result, markdown(result))


if __name__ == "__main__":
    main()
