"""AF-CLIP cost as multiples of one bare backbone forward, and toy training step time and memory.

    .venv/bin/python benchmarks/profile_afclip.py [--layers 24] [--repeats 2] [--out benchmarks/results]

Inference: random weights of ViT-L/14@336 size run at 518 px (37x37 patches), as the paper; medians after one
warm-up call, side by side in one run. Training: the toy recipe (training/configs/afclip_toy.yaml) on the
small random backbone, seconds per step (features cached after the first) and the growth of the process's
peak resident memory while training.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
from pathlib import Path

import torch
from profile_metacan import markdown
from profile_winclip import write_report

from hf_fsad.evaluation import median_seconds
from hf_fsad.models.afclip.configuration_afclip import AfClipConfig
from hf_fsad.models.afclip.modeling_afclip import AfClipModel
from hf_fsad.testing import byte_level_clip_tokenizer, save_random_clip, small_clip_config, vit_l14_336_config
from hf_fsad.training.recipes import load_config, train

TOY_CONFIG = Path(__file__).resolve().parents[1] / "training" / "configs" / "afclip_toy.yaml"


def peak_memory_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def training_rows(steps: int) -> list[tuple[str, float, float]]:
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        clip = save_random_clip(small_clip_config(), Path(folder) / "clip")
        for adapter in ("attention", "lora"):
            before = peak_memory_mb()
            config = load_config(
                TOY_CONFIG,
                [f"model.clip={clip}", f"model.adapter_type={adapter}", f"output_dir={folder}/{adapter}",
                 f"training.max_steps={steps}"],
            )  # fmt: skip
            seconds = train(config, "afclip")["result"]["seconds_per_step"]
            rows.append(
                (
                    f"toy training step ({adapter}), s; peak memory growth MB",
                    seconds,
                    peak_memory_mb() - before,
                )
            )
    return rows


@torch.no_grad()
def inference_rows(layers: int, repeats: int, size: int) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    model = AfClipModel(AfClipConfig(clip_config=vit_l14_336_config(layers), image_size=size,
                                     feature_layers=[layers // 4, layers // 2, 3 * layers // 4, layers])).eval()  # fmt: skip
    model.tokenizer = byte_level_clip_tokenizer()
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(2, 3, size, size, generator=generator)
    query = torch.randn(1, 3, size, size, generator=generator)
    bare = median_seconds(
        lambda: model.backbone.clip.vision_model(pixel_values=query, interpolate_pos_encoding=True), repeats
    )
    zero_shot_bank = model.build_reference_bank()
    few_shot_bank = model.build_reference_bank(references)
    zero_shot = median_seconds(lambda: model(query, reference_bank=zero_shot_bank), repeats)
    few_shot = median_seconds(lambda: model(query, reference_bank=few_shot_bank), repeats)
    features = model.encode_images(query)
    heads = median_seconds(lambda: model.score_features(features, zero_shot_bank), repeats)
    return [
        ("bare backbone forward, 1 image", bare, 1.0),
        ("AF-CLIP zero-shot, per image (batch 1)", zero_shot, zero_shot / bare),
        ("AF-CLIP+ 2-shot, per image (batch 1)", few_shot, few_shot / bare),
        ("AF-CLIP zero-shot scoring alone (features given)", heads, heads / bare),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=24, help="vision blocks (24 = the real depth)")
    parser.add_argument("--image-size", type=int, default=518)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--training-steps", type=int, default=30)
    parser.add_argument("--out", type=Path, help="directory to write afclip_profile.{json,md}")
    args = parser.parse_args()
    training = training_rows(args.training_steps)  # first: the ViT-L run would set the peak memory
    result = {
        "backbone": f"ViT-L/14@336 size at {args.image_size} px, {args.layers} vision blocks, random weights",
        "torch_threads": torch.get_num_threads(),
        "rows": inference_rows(args.layers, args.repeats, args.image_size),
    }
    text = markdown(result)
    text += "\n\n| toy training | seconds per step | peak memory growth (MB) |\n|---|---|---|\n"
    text += "\n".join(
        f"| {name.split(',')[0]} | {seconds:.3f} | {memory:.0f} |" for name, seconds, memory in training
    )
    result["training"] = training
    write_report(args.out, "afclip_profile", result, text)


if __name__ == "__main__":
    main()
