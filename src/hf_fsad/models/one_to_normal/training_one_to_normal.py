"""DreamBooth with LoRA: One-to-Normal's anomaly-free customised model ("One-to-Normal: Anomaly Personalization
for Few-shot Anomaly Detection", arXiv:2502.01201, Sec. 3.2).

The Stable Diffusion UNet gets a PEFT LoRA on its attention projections and learns the k normal images
(augmented: flips, quarter turns, random crops) under the instance prompt "a photo of normal {class}", with
DreamBooth's prior-preservation loss on class images the base model generated from "a photo of {class}".
Loss: MSE between the UNet's prediction and its target (the noise, or the velocity for v-prediction
schedulers) at a random timestep: the paper's Eq. 1 writes the target as x_0, which for a noise-predicting
Stable Diffusion is the same objective up to a per-timestep weight; every draw (image, augmentation, noise, timestep) is seeded by (seed, step),
so a run is reproducible bit for bit.

    accelerate launch training/train_dreambooth_lora.py --normal good/ --class-name bottle --out one-to-normal-bottle
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...augmentation import random_crop
from ...training.trainer import FsadTrainer, FsadTrainingArguments, TrainingResult, parameter_digest
from .diffusion_one_to_normal import load_diffusion_pipeline, to_tensor

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ...modeling_base import FsadPreTrainedModel

LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


@dataclass
class OneToNormalTrainingArguments(FsadTrainingArguments):
    """DreamBooth-LoRA settings (diffusers' train_dreambooth_lora defaults where the paper gives none): Adam
    at 1e-4, 400 updates of one instance and one class image, LoRA rank 4 (alpha = rank), 100 class images
    generated with `class_image_steps` denoising steps, prior-preservation weight 1. full_finetune: train
    every UNet weight instead of a LoRA (the original DreamBooth; the UNet is then saved in `unet/` beside the
    model, ~3.4 GB for SD v1.5)."""

    max_steps: int = 400
    learning_rate: float = 1e-4
    lora_rank: int = 4
    num_class_images: int = 100
    class_image_steps: int = 50
    prior_preservation_weight: float = 1.0
    crop_scale_range: tuple[float, float] = (0.8, 1.0)
    full_finetune: bool = False

    def __post_init__(self):
        super().__post_init__()
        if self.lora_rank < 1 or self.num_class_images < 0:
            raise ValueError("lora_rank must be >= 1 and num_class_images >= 0.")


def augment(
    image: Image.Image, rng: np.random.Generator, crop_scale_range: tuple[float, float]
) -> Image.Image:
    """A random view of a normal image: a crop (resized back), a horizontal flip and a quarter turn."""
    view = random_crop(image, rng, crop_scale_range)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return view.rotate(90 * int(rng.integers(0, 4)))


class DreamBoothLoraTrainer(FsadTrainer):
    """Trains the LoRA (or, with `full_finetune`, every weight) of the diffusion UNet behind `model` (what
    `OneToNormalModel.fit` runs); afterwards the model holds the fitted weights and a personalizer that uses
    them."""

    def __init__(
        self,
        model: FsadPreTrainedModel,
        normal_images: Sequence[Image.Image],
        class_name: str,
        args: OneToNormalTrainingArguments,
        output_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ):
        from accelerate import PartialState
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        if not normal_images:
            raise ValueError("DreamBooth needs at least one normal image.")
        sizes = {image.size for image in normal_images}
        if len(sizes) > 1:
            raise ValueError(f"The normal images must have one size, got {sorted(sizes)}.")
        config = model.config
        self.pipeline = load_diffusion_pipeline(
            StableDiffusionPipeline,
            config.diffusion_model,
            safety_checker=None,
            requires_safety_checker=False,
        )
        self.pipeline.set_progress_bar_config(disable=True)
        self.pipeline.to(accelerator.device if accelerator is not None else PartialState().device)
        self.unet = self.pipeline.unet
        for part in (self.unet, self.pipeline.vae, self.pipeline.text_encoder):
            part.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipeline.scheduler.config)
        resolution = config.diffusion_resolution
        self.normals = [
            image.convert("RGB").resize((resolution, resolution), Image.BICUBIC) for image in normal_images
        ]
        self.class_latents = self._class_latents(config.class_prompt.format(class_name), args)
        self.lora_config = LoraConfig(
            r=args.lora_rank,
            lora_alpha=args.lora_rank,
            init_lora_weights="gaussian",
            target_modules=list(LORA_TARGET_MODULES),
        )
        if args.full_finetune:
            self.unet.requires_grad_(True)
        else:
            torch.manual_seed(args.seed)  # the LoRA's Gaussian initialisation
            self.unet.add_adapter(self.lora_config)
        super().__init__(
            model, args, output_dir, partial(torch.optim.Adam, lr=args.learning_rate), accelerator
        )
        with torch.no_grad():
            self.instance_embedding = self._text_embedding(config.instance_prompt.format(class_name))
            self.class_embedding = self._text_embedding(config.class_prompt.format(class_name))

    def trainable_module(self) -> torch.nn.Module:
        return self.unet

    def _text_embedding(self, prompt: str) -> torch.Tensor:
        tokenizer = self.pipeline.tokenizer
        ids = tokenizer(
            [prompt],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids.to(self.pipeline.text_encoder.device)
        return self.pipeline.text_encoder(ids)[0]

    @torch.no_grad()
    def _class_latents(self, prompt: str, args: OneToNormalTrainingArguments) -> list[torch.Tensor]:
        """Prior preservation: the base model's own images of the class (before the LoRA), as latents."""
        resolution = self.normals[0].size[0]
        latents = []
        for index in range(args.num_class_images):
            generator = torch.Generator().manual_seed(args.seed * 1_000_003 + index)
            image = self.pipeline(
                prompt,
                height=resolution,
                width=resolution,
                num_inference_steps=args.class_image_steps,
                generator=generator,
                output_type="pil",
            ).images[0]
            latents.append(self._encode([image], generator))
        return latents

    def _encode(self, images: list[Image.Image], generator: torch.Generator) -> torch.Tensor:
        vae = self.pipeline.vae
        pixels = (to_tensor(images).float() * 2 - 1).to(vae.device)
        return vae.encode(pixels).latent_dist.sample(generator) * vae.config.scaling_factor

    def _denoising_loss(
        self, latents: torch.Tensor, embedding: torch.Tensor, generator: torch.Generator
    ) -> torch.Tensor:
        scheduler = self.noise_scheduler
        noise = torch.randn(latents.shape, generator=generator).to(latents.device)
        timesteps = torch.randint(
            0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator
        )
        timesteps = timesteps.to(latents.device)
        noisy = scheduler.add_noise(latents, noise, timesteps)
        embedding = embedding.expand(latents.shape[0], -1, -1)
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=embedding).sample
        if scheduler.config.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, timesteps)
        else:
            target = noise
        return F.mse_loss(prediction.float(), target.float())

    def compute_loss(self, batch_index: int) -> torch.Tensor:
        args = self.args
        rng = np.random.default_rng([args.seed, batch_index])
        generator = torch.Generator().manual_seed(int(rng.integers(0, 2**63 - 1)))
        normal = self.normals[int(rng.integers(0, len(self.normals)))]
        with torch.no_grad():
            latents = self._encode([augment(normal, rng, tuple(args.crop_scale_range))], generator)
        loss = self._denoising_loss(latents, self.instance_embedding, generator)
        if self.class_latents and args.prior_preservation_weight > 0:
            class_latents = self.class_latents[int(rng.integers(0, len(self.class_latents)))]
            loss = loss + args.prior_preservation_weight * self._denoising_loss(
                class_latents, self.class_embedding, generator
            )
        return loss

    def train(self, resume: bool | str | os.PathLike = False) -> TrainingResult:
        """Train the LoRA, then give the model its weights and a personalizer built on the trained UNet."""
        from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline
        from diffusers.utils import convert_state_dict_to_diffusers
        from peft.utils import get_peft_model_state_dict

        from .diffusion_one_to_normal import Personalizer

        result = super().train(resume)
        model, config = self.model, self.model.config
        model.lora_source = model.unet_source = None
        model.unet_finetuned = self.args.full_finetune
        model.lora_weights = model.lora_metadata = None
        if not self.args.full_finetune:
            model.lora_weights = convert_state_dict_to_diffusers(get_peft_model_state_dict(self.unet))
            model.lora_metadata = self.lora_config.to_dict()
        model.personalization_digest = parameter_digest(self.unet)
        img2img = StableDiffusionImg2ImgPipeline(**self.pipeline.components)
        img2img.scheduler = DDIMScheduler.from_config(img2img.scheduler.config, timestep_spacing="trailing")
        img2img.set_progress_bar_config(disable=True)
        model.personalizer = Personalizer(
            img2img,
            config.strength,
            config.num_inference_steps,
            config.guidance_scale,
            config.diffusion_resolution,
            config.seed,
        )
        model.invalidate_feature_key()
        return result
