"""WinCLIP / WinCLIP+ cost as multiples of one bare backbone forward, measured side by side in one run.

    .venv/bin/python benchmarks/profile_winclip.py [--layers 12] [--repeats 5] [--out benchmarks/results]

Random weights of ViT-B-16-plus-240 size (the WinCLIP paper's backbone; no pretrained weights can be fetched
offline). Timings are medians after one warm-up call; absolute seconds depend on the machine, the ratios are
the result. Text prompts use the byte-level test tokenizer (one token per character), so text-encoding cost
is an upper bound of what CLIP's BPE tokenizer (about 3x fewer tokens) gives.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from hf_fsad.evaluation import median_seconds
from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.prompts import winclip_prompts
from hf_fsad.testing import byte_level_clip_tokenizer, vit_b16_plus_240_config


def import_seconds(repeats: int) -> float:
    code = "import time; t = time.perf_counter(); import hf_fsad; print(time.perf_counter() - t)"
    runs = [float(subprocess.check_output([sys.executable, "-c", code], text=True)) for _ in range(repeats)]
    return statistics.median(runs)


@torch.no_grad()
def profile(layers: int, repeats: int, batch_size: int) -> dict:
    torch.manual_seed(0)
    model = WinClipModel(WinClipConfig(clip_config=vit_b16_plus_240_config(layers))).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    size = model.config.image_size
    generator = torch.Generator().manual_seed(0)
    references = torch.randn(2, 3, size, size, generator=generator)
    queries = torch.randn(batch_size, 3, size, size, generator=generator)
    clear_text_cache = model.backbone.clear_text_cache

    bare = median_seconds(lambda: model.backbone.clip.vision_model(pixel_values=queries[:1]), repeats)
    bare_batch = median_seconds(lambda: model.backbone.clip.vision_model(pixel_values=queries), repeats)
    text_setup = median_seconds(lambda: model.build_reference_bank(None, "bottle"), repeats, clear_text_cache)
    setup = median_seconds(
        lambda: model.build_reference_bank(references, "bottle"), repeats, clear_text_cache
    )
    zero_shot_bank = model.build_reference_bank(None, "bottle")
    few_shot_bank = model.build_reference_bank(references, "bottle")
    zero_shot = median_seconds(lambda: model(queries[:1], reference_bank=zero_shot_bank), repeats)
    few_shot = median_seconds(lambda: model(queries[:1], reference_bank=few_shot_bank), repeats)
    few_shot_batch = median_seconds(lambda: model(queries, reference_bank=few_shot_bank), repeats)

    prompts = [prompt for state in winclip_prompts("bottle") for prompt in state]
    tokens = model.tokenizer(prompts)["input_ids"]
    return {
        "backbone": f"ViT-B-16-plus-240 size, {layers} vision blocks, random weights",
        "torch_threads": torch.get_num_threads(),
        "bare_forward_s": bare,
        "rows": [
            ("bare backbone forward, 1 image", bare, 1.0),
            ("WinCLIP zero-shot, per image (batch 1)", zero_shot, zero_shot / bare),
            ("WinCLIP+ 2-shot, per image (batch 1)", few_shot, few_shot / bare),
            (
                (
                    f"WinCLIP+ 2-shot, per image (batch {batch_size}; bare at this batch = "
                    f"{bare_batch / batch_size / bare:.2f}x)"
                ),
                few_shot_batch / batch_size,
                few_shot_batch / batch_size / bare,
            ),
            (f"setup: prompt ensemble only ({len(prompts)} prompts)", text_setup, text_setup / bare),
            ("setup: prompt ensemble + 2 references", setup, setup / bare),
        ],
        "mean_prompt_tokens": sum(map(len, tokens)) / len(tokens),
        "import_hf_fsad_s": import_seconds(repeats),
    }


def markdown(result: dict) -> str:
    lines = [
        f"Backbone: {result['backbone']}; torch threads: {result['torch_threads']}.",
        "",
        "| what | seconds | x bare forward |",
        "|---|---|---|",
        *[f"| {name} | {seconds:.3f} | {ratio:.1f} |" for name, seconds, ratio in result["rows"]],
        "",
        f"Prompt length with the byte-level test tokenizer: {result['mean_prompt_tokens']:.1f} tokens on average.",
        f"`import hf_fsad`: {result['import_hf_fsad_s']:.3f} s.",
    ]
    return "\n".join(lines)


def write_report(out: Path | None, stem: str, result: dict, report: str) -> None:
    """Print `report`; with `out`, also write `out/<stem>.json` (the result) and `out/<stem>.md`."""
    print(report)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
        (out / f"{stem}.md").write_text(report + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="vision blocks (12 = the real depth)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--out", type=Path, help="directory to write winclip_profile.{json,md}")
    args = parser.parse_args()
    result = profile(args.layers, args.repeats, args.batch_size)
    write_report(args.out, "winclip_profile", result, markdown(result))


if __name__ == "__main__":
    main()
