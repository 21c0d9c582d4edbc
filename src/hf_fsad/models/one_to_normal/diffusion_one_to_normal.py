"""One-to-Normal's diffusion side ("One-to-Normal: Anomaly Personalization for Few-shot Anomaly Detection",
arXiv:2502.01201, Sec. 3.3): img2img personalization of a query towards the normal images, with the
anomaly-free customised model (Stable Diffusion + a DreamBooth LoRA).

Needs the `diffusers` extra. The pipeline is loaded from a Stable Diffusion repository (Hub id or local
directory in the layout of `stable-diffusion-v1-5/stable-diffusion-v1-5`, the maintained copy of Stable
Diffusion v1.5 since the original repository left the Hub in 2024); the per-category LoRA lives next to the
fitted model in diffusers' `save_lora_weights` format (`pytorch_lora_weights.safetensors`), or a fully fine-tuned UNet in
`unet/`.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from .functional_one_to_normal import ssim

LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"
UNET_FOLDER = "unet"  # a fully fine-tuned UNet, saved beside the model


def require_diffusers() -> None:
    """Raise an ImportError that says how to install diffusers when it is missing."""
    try:
        import diffusers  # noqa: F401
    except ImportError:
        raise ImportError(
            "One-to-Normal needs diffusers: pip install 'hf-fsad[diffusers]' (then load the model again)."
        ) from None


def load_diffusion_pipeline(pipeline_class: type, diffusion_model: str | os.PathLike, **kwargs):
    """`pipeline_class.from_pretrained(diffusion_model, **kwargs)`: a diffusers pipeline from a Hub id or a
    local folder; a ValueError of one line naming `diffusion_model` when it cannot be loaded."""
    path = Path(diffusion_model)
    if path.exists() and not (path / "model_index.json").is_file():
        raise ValueError(
            f"diffusion model {path}: the local path has no model_index.json, so it is not a diffusers "
            "pipeline folder (one written by save_pretrained or downloaded from the Hub)."
        )
    if not path.exists() and (path.is_absolute() or len(path.parts) > 2):
        raise ValueError(f"diffusion model {path}: the local folder does not exist (and it is not a Hub id).")
    try:
        return pipeline_class.from_pretrained(diffusion_model, **kwargs)
    except Exception as error:  # noqa: BLE001  (network, authentication, missing repo or files: one line each)
        lines = str(error).strip().splitlines()
        raise ValueError(
            f"diffusion model {diffusion_model} could not be loaded ({type(error).__name__}: "
            f"{lines[0] if lines else ''}): give a Stable Diffusion Hub id (online or in the cache) or a local "
            "diffusers folder."
        ) from None


def load_img2img_pipeline(
    diffusion_model: str | os.PathLike, unet_directory: str | os.PathLike | None = None
):
    """A `StableDiffusionImg2ImgPipeline` from `diffusion_model` (its UNet replaced by the one saved in
    `unet_directory`, a full fine-tune, when given) with a DDIM scheduler of "trailing" timestep spacing (so
    strength s starts denoising at s x T exactly), without safety checker or progress bars; a one-line
    ValueError when `diffusion_model` cannot be loaded."""
    require_diffusers()
    from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline, UNet2DConditionModel

    components = {"unet": UNet2DConditionModel.from_pretrained(unet_directory)} if unet_directory else {}
    pipeline = load_diffusion_pipeline(
        StableDiffusionImg2ImgPipeline,
        diffusion_model,
        safety_checker=None,
        requires_safety_checker=False,
        **components,
    )
    pipeline.scheduler = DDIMScheduler.from_config(pipeline.scheduler.config, timestep_spacing="trailing")
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_seed(image: Image.Image, seed: int) -> int:
    """A seed from `seed` and the image's pixels: an image is personalized the same way in any batch."""
    digest = hashlib.sha256(np.asarray(image.convert("RGB")).tobytes()).digest()
    return (seed * 1_000_003 + int.from_bytes(digest[:6], "little")) % 2**63


def to_tensor(images: Sequence[Image.Image]) -> torch.Tensor:
    """PIL images of one size -> (B, 3, H, W) float64 in [0, 1]."""
    return (
        torch.from_numpy(np.stack([np.asarray(image.convert("RGB")) for image in images])).permute(0, 3, 1, 2)
        / 255
    )


def most_similar(query: Image.Image, candidates: Sequence[Image.Image]) -> int:
    """Eq. 2: the index of the candidate with the highest SSIM to the query (first on ties)."""
    query_tensor = to_tensor([query.convert("RGB").resize(candidates[0].size)])
    scores = ssim(query_tensor.expand(len(candidates), -1, -1, -1), to_tensor(candidates))
    return int(torch.argmax(scores))


class Personalizer:
    """One-to-normal personalization (Eqs. 2-3): each query is noised to `strength` x T and denoised by the
    anomaly-free customised model once per normal-state prompt (all prompts in one batch, the same noise for
    each); the candidate most similar to the query (SSIM) is kept.

    pipeline: a diffusers img2img pipeline (see `load_img2img_pipeline`). resolution: side the images are
    resized to for diffusion (a multiple of the VAE's scale factor).
    """

    def __init__(
        self,
        pipeline,
        strength: float = 0.3,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        resolution: int = 240,
        seed: int = 0,
    ):
        if not 0 < strength <= 1:
            raise ValueError(f"strength must be in (0, 1], got {strength}.")
        self.pipeline = pipeline
        self.strength, self.num_inference_steps = strength, num_inference_steps
        self.guidance_scale, self.resolution, self.seed = guidance_scale, resolution, seed

    def generate(
        self, image: Image.Image, prompts: Sequence[str], strength: float | None = None, seed_offset: int = 0
    ) -> list[Image.Image]:
        """One img2img candidate of `image` per prompt (the same noise for each), at the diffusion
        resolution; `strength` defaults to the personalization's, `seed_offset` draws other noise."""
        source = image.convert("RGB").resize((self.resolution, self.resolution), Image.Resampling.BICUBIC)
        seed = image_seed(source, self.seed + seed_offset)
        generators = [torch.Generator().manual_seed(seed) for _ in prompts]
        return self.pipeline(
            list(prompts),
            image=[source] * len(prompts),
            strength=self.strength if strength is None else strength,
            num_inference_steps=self.num_inference_steps,
            guidance_scale=self.guidance_scale,
            generator=generators,
            output_type="pil",
        ).images

    def personalize(self, images: Sequence[Image.Image], prompts: Sequence[str]) -> list[Image.Image]:
        """x_hat_q (Eq. 3) of each image: its most query-like candidate (Eq. 2), at the image's own size."""
        if not prompts:
            raise ValueError("Give at least one normal-state prompt.")
        personalized = []
        for image in images:
            candidates = self.generate(image, prompts)
            best = candidates[most_similar(image, candidates)]
            personalized.append(best.resize(image.size, Image.Resampling.BICUBIC))
        return personalized
