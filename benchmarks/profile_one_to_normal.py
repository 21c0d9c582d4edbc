"""One-to-Normal per-query cost: diffusion (personalization) vs CLIP (triplet inference), side by side.

    .venv/bin/python benchmarks/profile_one_to_normal.py [--sd-unet] [--out benchmarks/results]

Toy size: the tiny random Stable Diffusion pipeline of the tests (32 px) and the small random CLIP, one
query: personalization (3 prompts x 15 of 50 DDIM steps, classifier-free guidance) against the CLIP part.
With --sd-unet, one call of a random-weight UNet of Stable Diffusion v1.5's size at 240 px (30 x 30
latents, batch 6 = 3 prompts x guidance) is timed, and the per-query diffusion cost at the paper's
settings is extrapolated as (UNet calls per query) x that time (the VAE and text encoder run once per query
and are left out: a lower bound).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from profile_winclip import write_report

from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import median_seconds
from hf_fsad.models.one_to_normal.configuration_one_to_normal import OneToNormalConfig
from hf_fsad.models.one_to_normal.modeling_one_to_normal import OneToNormalModel
from hf_fsad.testing import byte_level_clip_tokenizer, save_tiny_diffusion_pipeline, small_clip_config


def unet_calls(config: OneToNormalConfig) -> int:
    """UNet calls per query: the denoising steps at the strength (15 of 50 at 0.3); each call is one batch of
    every prompt, twice for classifier-free guidance."""
    return int(config.num_inference_steps * config.strength)


def sd15_unet_seconds(repeats: int) -> float:
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(  # Stable Diffusion v1.5's UNet architecture, random weights
        sample_size=64,
        cross_attention_dim=768,
        block_out_channels=(320, 640, 1280, 1280),
        attention_head_dim=8,
    ).eval()
    # one call per prompt: 3 prompts x guidance = batch 6
    latents, text = torch.randn(6, 4, 30, 30), torch.randn(6, 77, 768)
    with torch.no_grad():
        return median_seconds(lambda: unet(latents, 500, encoder_hidden_states=text), repeats)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--sd-unet", action="store_true", help="time one Stable Diffusion v1.5-size UNet call"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    image = load_benchmark("toy", category="grid", num_train=1, num_test_good=1, num_test_anomalous=0)["test"]
    image = image["image"][0].convert("RGB")
    with tempfile.TemporaryDirectory() as folder:
        torch.manual_seed(0)
        config = OneToNormalConfig(
            clip_config=small_clip_config(),
            diffusion_model=save_tiny_diffusion_pipeline(Path(folder) / "sd"),
            diffusion_resolution=32,
        )
        model = OneToNormalModel(config).eval()
        model.tokenizer = byte_level_clip_tokenizer()
        pixels = model.image_processor()([image], return_tensors="pt").pixel_values
        bank = model.build_reference_bank(pixels)
        personalizer = model.get_personalizer()
        prompts = model.prompts(config.normal_state_prompts)
        diffusion = median_seconds(lambda: personalizer.personalize([image], prompts), args.repeats)
        with torch.no_grad():
            clip = median_seconds(lambda: model.clip_features(pixels), args.repeats)
            features = model.encode_images(pixels)
            scoring = median_seconds(lambda: model.score_features(features, bank), args.repeats)
    calls = unet_calls(config)
    rows = [
        ("toy: personalization (diffusion), s", diffusion),
        ("toy: one CLIP pass (query or personalized image), s", clip),
        ("toy: triplet scoring from features, s", scoring),
        ("toy: diffusion share of a query", diffusion / (diffusion + 2 * clip + scoring)),
        ("UNet calls per query (15 steps, each batch 3 prompts x 2)", calls),
    ]
    if args.sd_unet:
        started = time.perf_counter()
        unet = sd15_unet_seconds(args.repeats)
        rows += [
            ("SD v1.5-size UNet, one call (batch 6, 30x30 latents), s", unet),
            ("extrapolated diffusion per query at 240 px on this CPU, s", calls * unet),
            ("(UNet timing wall time, s)", time.perf_counter() - started),
        ]
    result = {"torch_threads": torch.get_num_threads(), "rows": rows}
    text = "| what | value |\n|---|---|\n" + "\n".join(f"| {name} | {value:.3f} |" for name, value in rows)
    write_report(args.out, "one_to_normal_profile", result, text)


if __name__ == "__main__":
    main()
