"""Random CLIP backbones of known architectures, for tests, benchmarks and the offline demo.

No pretrained weights can be fetched on an offline machine; these build the same architectures with random
weights and a byte-level tokenizer (one token per byte, CLIP's special-token ids), so every code path runs.
Scores from random weights show the pipeline working, not a method's accuracy.
"""

from __future__ import annotations

import os

from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

from .backbones.convert import BOS_TOKEN, EOS_TOKEN, bytes_to_unicode

CLIP_VOCAB_SIZE = 49408


def byte_level_clip_tokenizer(context_length: int = 77) -> CLIPTokenizer:
    """A CLIPTokenizer without merges: every byte is a token; start/end keep CLIP's ids 49406/49407."""
    alphabet = list(bytes_to_unicode().values())
    vocab = {token: index for index, token in enumerate(alphabet + [c + "</w>" for c in alphabet])}
    vocab |= {BOS_TOKEN: CLIP_VOCAB_SIZE - 2, EOS_TOKEN: CLIP_VOCAB_SIZE - 1}
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=context_length)


def clip_config(
    vision_width: int,
    vision_layers: int,
    text_width: int,
    text_layers: int,
    projection_dim: int,
    image_size: int = 240,
    patch_size: int = 16,
    hidden_act: str = "gelu",
) -> CLIPConfig:
    """A CLIPConfig with 64-wide attention heads (32 for tiny widths) and 4x MLPs, as CLIP's towers."""

    def heads(width: int) -> int:
        return max(width // 64, 2) if width >= 128 else 2

    return CLIPConfig(
        vision_config={
            "hidden_size": vision_width,
            "intermediate_size": 4 * vision_width,
            "num_hidden_layers": vision_layers,
            "num_attention_heads": heads(vision_width),
            "image_size": image_size,
            "patch_size": patch_size,
            "hidden_act": hidden_act,
        },
        text_config={
            "hidden_size": text_width,
            "intermediate_size": 4 * text_width,
            "num_hidden_layers": text_layers,
            "num_attention_heads": heads(text_width),
            "vocab_size": CLIP_VOCAB_SIZE,
            "hidden_act": hidden_act,
            "bos_token_id": CLIP_VOCAB_SIZE - 2,
            "eos_token_id": CLIP_VOCAB_SIZE - 1,
            "pad_token_id": CLIP_VOCAB_SIZE - 1,
        },
        projection_dim=projection_dim,
    )


def tiny_clip_config(image_size: int = 240, patch_size: int = 16) -> CLIPConfig:
    """Two-block, 32-wide CLIP: fast enough for unit tests."""
    return clip_config(32, 2, 32, 2, 16, image_size=image_size, patch_size=patch_size)


def small_clip_config(image_size: int = 240, patch_size: int = 16) -> CLIPConfig:
    """Two-block, 64-wide CLIP: random features rich enough for trained methods to learn from on toy data."""
    return clip_config(64, 2, 32, 2, 32, image_size=image_size, patch_size=patch_size)


def vit_b16_plus_240_config(layers: int = 12) -> CLIPConfig:
    """OpenCLIP ViT-B-16-plus-240 (WinCLIP, InCTRL, MetaCAN, VTFusion): width 896, 240 px, embed 640."""
    return clip_config(896, layers, 640, 12, 640, image_size=240)


def vit_l14_336_config(layers: int = 24) -> CLIPConfig:
    """OpenAI ViT-L/14@336 (AF-CLIP, One-to-Normal): width 1024, 336 px, patch 14, embed 768, quick GELU."""
    return clip_config(1024, layers, 768, 12, 768, image_size=336, patch_size=14, hidden_act="quick_gelu")


def vit_b16_config() -> CLIPConfig:
    """`openai/clip-vit-base-patch16`: width 768, 224 px, embed 512, quick GELU."""
    return clip_config(768, 12, 512, 12, 512, image_size=224, hidden_act="quick_gelu")


def save_random_clip(config: CLIPConfig, directory: str | os.PathLike, seed: int = 0) -> str:
    """Save a randomly initialised CLIPModel and the byte-level tokenizer, loadable with `from_clip`."""
    import torch

    torch.manual_seed(seed)
    CLIPModel(config).save_pretrained(directory)
    byte_level_clip_tokenizer().save_pretrained(directory)
    return str(directory)


def save_tiny_diffusion_pipeline(directory: str | os.PathLike, seed: int = 0) -> str:
    """Save a Stable-Diffusion-layout pipeline (UNet, VAE, CLIP text encoder, byte-level tokenizer, DDIM
    scheduler) with random weights and diffusers' test sizes (32-wide UNet and VAE, 32-wide text encoder):
    loadable with `StableDiffusionImg2ImgPipeline.from_pretrained` in seconds, as `stable-diffusion-v1-5/stable-diffusion-v1-5`
    is where the Hub can be reached."""
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=32,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
    )
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
    )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=32,
            intermediate_size=37,
            num_attention_heads=4,
            num_hidden_layers=2,
            vocab_size=CLIP_VOCAB_SIZE,
            bos_token_id=CLIP_VOCAB_SIZE - 2,
            eos_token_id=CLIP_VOCAB_SIZE - 1,
            pad_token_id=CLIP_VOCAB_SIZE - 1,
        )
    )
    scheduler = DDIMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=False,
    )
    pipeline = StableDiffusionPipeline(
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=byte_level_clip_tokenizer(),
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(directory)
    return str(directory)
