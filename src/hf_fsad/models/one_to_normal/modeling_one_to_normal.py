"""One-to-Normal: diffusion personalization and triplet contrastive inference ("One-to-Normal: Anomaly
Personalization for Few-shot Anomaly Detection", arXiv:2502.01201)."""

from __future__ import annotations

import copy
import hashlib
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

from ...bank import ReferenceBank
from ...calibration_inputs import GENERATED_IMAGE_INFO
from ...modeling_base import FsadPreTrainedModel
from ...modeling_outputs import AnomalyDetectionOutput
from ...scoring import class_scores
from .configuration_one_to_normal import OneToNormalConfig
from .diffusion_one_to_normal import LORA_WEIGHTS_NAME, UNET_FOLDER, Personalizer, load_img2img_pipeline
from .functional_one_to_normal import (
    level_mean_of_maxima,
    one_to_normal_score,
    personalized_difference,
    pool_difference,
)

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ...training.trainer import TrainingResult


class OneToNormalModel(FsadPreTrainedModel):
    """One-to-Normal: each query is personalized towards the normal images by a Stable Diffusion model
    customised on them (DreamBooth LoRA; img2img at strength 0.3, the most SSIM-similar of one candidate per
    normal-state prompt), then compared three ways with CLIP multi-level features: with its personalized
    image at the same positions (S_P, Eq. 4), with an anomaly-free pool of the normals and generated normals
    (S_N, Eq. 5), and with the normal/anomalous prompt ensemble (S_text, Eq. 6). A = S_P + alpha S_N +
    beta S_text (Eq. 7); the map is the S_P map + alpha x the S_N map, averaged over levels.

    The CLIP backbone and the diffusion model are frozen; `fit` trains the per-category LoRA, saved next to
    the model. `personalizer` is the diffusion side (loaded on first use; replaceable, e.g. by a test double).
    """

    config_class = OneToNormalConfig
    memory_prefixes = ("memory.",)
    # The benchmark runner fits a copy of the model on each cell's normal references.
    fits_per_category = True
    export_refusal = (
        "One-to-Normal turns each query into a normal image with a Stable Diffusion loop (many UNet and VAE "
        "passes per image, a scheduler stepping in Python) before scoring it: not one fixed graph."
    )

    def __init__(self, config: OneToNormalConfig):
        super().__init__(config)
        self.personalizer: Personalizer | None = None
        self.lora_weights: dict[str, torch.Tensor] | None = None  # the fitted UNet LoRA (diffusers format)
        self.lora_metadata: dict | None = None
        self.unet_finetuned = False  # a full fine-tune: the personalizer's UNet is the fitted one
        self.lora_source: Path | None = None  # what this model was loaded with, saved next to it
        self.unet_source: Path | None = None
        self.personalization_digest: str | None = None  # set by fitting, or hashed from the sources
        # The anomaly-free pool `fit` made, as RGB images at the model's input size (uint8, so `.to(dtype)`
        # leaves it as it is): a buffer, so `save_pretrained` writes it into the safetensors weights.
        size = config.image_size
        self.register_buffer(
            "pool_pixels", torch.zeros(config.num_pool_images, size, size, 3, dtype=torch.uint8)
        )
        self.post_init()

    @property
    def pool_images(self) -> list[Image.Image]:
        """The anomaly-free pool `fit` made (saved with the model), as RGB images at `config.image_size`."""
        return [Image.fromarray(array) for array in self.pool_pixels.cpu().numpy()]

    @property
    def fitted_on_normals(self) -> bool:
        """Fitted by `fit` (it records the class it was fitted on), or loaded with a fitted LoRA or UNet."""
        personalized = self.lora_weights is not None or self.unet_finetuned
        loaded = self.lora_source is not None or self.unet_source is not None
        return self.config.fitted_class_name is not None or personalized or loaded

    def set_pool(self, images: Sequence[Image.Image]) -> None:
        """Make `images` the anomaly-free pool, resized as `image_processor()` resizes them (so a bank of the
        pool equals a bank of the images given as references)."""
        pixel_values = self.image_processor()(list(images), return_tensors="pt").pixel_values
        arrays = [np.asarray(image) for image in self.to_images(pixel_values)]
        self.pool_pixels = torch.from_numpy(np.stack(arrays)).to(self.pool_pixels.device)
        self.config.num_pool_images = len(arrays)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        directory = Path(pretrained_model_name_or_path)
        if not directory.is_dir():
            from huggingface_hub import snapshot_download

            patterns = [LORA_WEIGHTS_NAME, f"{UNET_FOLDER}/*"]
            directory = Path(snapshot_download(str(pretrained_model_name_or_path), allow_patterns=patterns))
        lora, unet = directory / LORA_WEIGHTS_NAME, directory / UNET_FOLDER
        model.lora_source = lora if lora.is_file() else None
        model.unet_source = unet if unet.is_dir() else None
        return model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """The model, and the fitted personalization beside it: the LoRA as `pytorch_lora_weights.safetensors`
        (diffusers' format) or a fully fine-tuned UNet in `unet/`."""
        super().save_pretrained(save_directory, *args, **kwargs)
        directory = Path(save_directory)
        if self.lora_weights is not None:
            self.save_lora(directory)
        elif self.lora_source is not None and self.lora_source.parent.resolve() != directory.resolve():
            shutil.copyfile(self.lora_source, directory / LORA_WEIGHTS_NAME)
        if self.unet_finetuned:
            self.personalizer.pipeline.unet.save_pretrained(directory / UNET_FOLDER)
        elif self.unet_source is not None and self.unet_source.parent.resolve() != directory.resolve():
            shutil.copytree(self.unet_source, directory / UNET_FOLDER, dirs_exist_ok=True)

    def save_lora(self, directory: str | os.PathLike) -> None:
        """Write the fitted LoRA in diffusers' `save_lora_weights` format."""
        from diffusers import StableDiffusionImg2ImgPipeline

        StableDiffusionImg2ImgPipeline.save_lora_weights(
            directory,
            unet_lora_layers=self.lora_weights,
            weight_name=LORA_WEIGHTS_NAME,
            unet_lora_adapter_metadata=self.lora_metadata,
        )

    def get_personalizer(self) -> Personalizer:
        """The personalizer: `config.diffusion_model` with the fitted UNet or LoRA, loaded once."""
        if self.personalizer is None:
            config = self.config
            pipeline = load_img2img_pipeline(config.diffusion_model, unet_directory=self.unet_source)
            if self.lora_weights is not None:
                with tempfile.TemporaryDirectory() as folder:
                    self.save_lora(folder)
                    pipeline.load_lora_weights(folder, weight_name=LORA_WEIGHTS_NAME)
            elif self.lora_source is not None:
                pipeline.load_lora_weights(str(self.lora_source.parent), weight_name=self.lora_source.name)
            self.personalizer = Personalizer(
                pipeline,
                config.strength,
                config.num_inference_steps,
                config.guidance_scale,
                config.diffusion_resolution,
                config.seed,
            )
        return self.personalizer

    def prompts(self, template_list: Sequence[str], class_name: str | None = None) -> list[str]:
        """The templates filled with `class_name` (default: the fitted class, else the default class)."""
        name = class_name or self.config.fitted_class_name or self.config.default_class_name
        return [template.format(name) for template in template_list]

    def feature_spec(self) -> dict:
        """Personalization enters the features: the diffusion model, its LoRA, the img2img settings, and a
        personalizer set by hand (e.g. a test double) by its type."""
        config = self.config
        personalizer = None if self.personalizer is None else type(self.personalizer).__qualname__
        return {
            **super().feature_spec(),
            "feature_layers": config.feature_layers,
            "diffusion": [
                config.diffusion_model,
                config.strength,
                config.num_inference_steps,
                config.guidance_scale,
            ],
            "resolution_seed": [config.diffusion_resolution, config.seed],
            "prompts": self.prompts(config.normal_state_prompts),
            "personalization": self.personalization_key(),
            "personalizer": personalizer,
        }

    def personalization_key(self) -> str | None:
        """Fingerprint of the fitted personalization: set by fitting, else the SHA-256 of the files the model
        was loaded with (hashed once); None for the base diffusion model."""
        if self.personalization_digest is None and (self.lora_source or self.unet_source):
            digest = hashlib.sha256()
            files = [self.lora_source] if self.lora_source else []
            files += sorted(self.unet_source.rglob("*.safetensors")) if self.unet_source else []
            for path in files:
                with open(path, "rb") as handle:
                    for block in iter(lambda: handle.read(2**24), b""):
                        digest.update(block)
            self.personalization_digest = digest.hexdigest()
        return self.personalization_digest

    def to_images(self, pixel_values: torch.Tensor) -> list[Image.Image]:
        """Normalised pixel values (B, 3, S, S) back to RGB PIL images (the diffusion model's input)."""
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        pixels = (pixel_values.detach().float().cpu() * std + mean).clamp(0, 1)
        arrays = (pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
        return [Image.fromarray(array) for array in arrays]

    def clip_features(self, pixel_values: torch.Tensor) -> dict[str, torch.Tensor]:
        """Raw patch tokens (B, N, D) of each feature block as "<block>", and the global image embedding
        (B, P) as "global"."""
        layers = sorted(set(self.config.feature_layers))
        features = self.backbone.encode_image(pixel_values.to(self.device, self.dtype), layers)
        tokens = {str(layer): features.hidden_states[layer][:, 1:] for layer in layers}
        tokens["global"] = self.backbone.project(features.last_hidden_state[:, 0])
        return tokens

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """CLIP features of the queries ("query.<block>", "query.global") and of their personalized images
        ("personalized.<block>"): the diffusion runs here, so the benchmark runner caches its result."""
        pixel_values = self.check_pixels(pixel_values, name)
        prompts = self.prompts(self.config.normal_state_prompts)
        personalized = self.get_personalizer().personalize(self.to_images(pixel_values), prompts)
        personalized_pixels = self.image_processor()(personalized, return_tensors="pt").pixel_values
        query = self.clip_features(pixel_values)
        features = {f"query.{key}": value for key, value in query.items()}
        personalized_features = self.clip_features(personalized_pixels)
        features |= {
            f"personalized.{layer}": personalized_features[str(layer)] for layer in self.config.feature_layers
        }
        return features

    def fit(
        self,
        normal_images: Sequence[Image.Image],
        class_name: str | None = None,
        steps: int = 400,
        accelerator: Accelerator | None = None,
        **arguments,
    ) -> TrainingResult:
        """The anomaly-free customised model (Sec. 3.2): a DreamBooth LoRA on the UNet from the normal images
        (augmented; prior preservation with generated class images), then the anomaly-free pool (the normals
        plus `pool_size - k` generated ones, kept at the model's input size and saved with the model).
        `arguments` are further `OneToNormalTrainingArguments`."""
        from .training_one_to_normal import DreamBoothLoraTrainer, OneToNormalTrainingArguments

        if not normal_images:
            raise ValueError("One-to-Normal needs at least one normal image to fit on.")
        class_name = class_name or self.config.fitted_class_name
        if not class_name:
            raise ValueError(
                "One-to-Normal's prompts need the object's name: give class_name (e.g. 'bottle')."
            )
        args = OneToNormalTrainingArguments(max_steps=steps, **arguments)
        trainer = DreamBoothLoraTrainer(self, normal_images, class_name, args, accelerator=accelerator)
        result = trainer.train()
        self.config.fitted_class_name = class_name
        self.set_pool(
            self.augment_references_with_generated(normal_images, self.config.pool_size - len(normal_images))
        )
        return result

    def generate_normals(self, normal_images: Sequence[Image.Image], count: int) -> list[Image.Image]:
        """`count` anomaly-free samples: img2img variations (at `pool_strength`) of the normal images in turn,
        each with the next normal-state prompt; at the normals' own size. Seeded."""
        personalizer = self.get_personalizer()
        prompts = self.prompts(self.config.normal_state_prompts)
        generated = []
        for index in range(max(count, 0)):
            source = normal_images[index % len(normal_images)].convert("RGB")
            prompt = prompts[index % len(prompts)]
            (image,) = personalizer.generate(
                source, [prompt], strength=self.config.pool_strength, seed_offset=index
            )
            generated.append(image.resize(source.size, Image.Resampling.BICUBIC))
        return generated

    def augment_references_with_generated(
        self, normal_images: Sequence[Image.Image], count: int
    ) -> list[Image.Image]:
        """The normal images followed by `count` generated anomaly-free ones (paper Sec. 4.3): a larger
        reference set for any method's `build_reference_bank`. The generated ones carry
        `GENERATED_IMAGE_INFO` in their `info`, so the pipeline's bank counts them and refuses leave-one-out."""
        if not normal_images:
            raise ValueError("Give at least one normal image to generate from.")
        generated = self.generate_normals(normal_images, count)
        for image in generated:
            image.info[GENERATED_IMAGE_INFO] = True
        return [image.convert("RGB") for image in normal_images] + generated

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """The anomaly-free pool's patch memory per level and the prompt-ensemble embeddings. References
        given (pixels or `clip_features`-style features): the pool is them; none: the pool `fit` made."""
        if reference_pixel_values is None and reference_features is None:
            if self.config.num_pool_images == 0:
                raise ValueError(
                    "No anomaly-free pool: fit the model (`model.fit(normal_images, class_name=...)`) or give "
                    "reference images."
                )
            reference_pixel_values = self.image_processor()(
                self.pool_images, return_tensors="pt"
            ).pixel_values
        if reference_features is None:
            pixels = self.check_pixels(reference_pixel_values, "reference_pixel_values")
            reference_features = {f"query.{key}": value for key, value in self.clip_features(pixels).items()}
        class_name = class_name or self.config.fitted_class_name or self.config.default_class_name
        tensors = {"text_embeddings": self.backbone.state_embeddings(class_name)}
        for layer in self.config.feature_layers:
            tensors[f"memory.{layer}"] = reference_features[f"query.{layer}"].flatten(0, 1)
        k = reference_features[f"query.{self.config.feature_layers[0]}"].shape[0]
        return self.bank_from_tensors(class_name, k, tensors)

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """Eqs. 4-7: branch scores S_P, S_N, S_text; maps = the S_P map + alpha x the S_N map (level means)."""
        bank = self.bank_or_default(reference_bank)
        config = self.config
        layers = config.feature_layers
        query = [features[f"query.{layer}"] for layer in layers]
        personal = [
            personalized_difference(tokens, features[f"personalized.{layer}"])
            for tokens, layer in zip(query, layers)
        ]
        pool = [
            pool_difference(tokens, bank.tensors[f"memory.{layer}"]) for tokens, layer in zip(query, layers)
        ]
        branch_scores = {
            "personalized": level_mean_of_maxima(personal),
            "pool": level_mean_of_maxima(pool),
            "text": class_scores(
                features["query.global"], bank.tensors["text_embeddings"], config.text_temperature
            ),
        }
        image_scores = one_to_normal_score(
            branch_scores["personalized"],
            branch_scores["pool"],
            branch_scores["text"],
            config.alpha,
            config.beta,
        )
        patch_map = torch.stack(personal).mean(0) + config.alpha * torch.stack(pool).mean(0)
        return AnomalyDetectionOutput(
            image_scores=image_scores, anomaly_maps=self.to_pixel_maps(patch_map), branch_scores=branch_scores
        )


@dataclass
class GeneratedReferences:
    """One-to-Normal's reference augmentation (paper Sec. 4.3) for other methods in the benchmark runner
    (`run_benchmark(..., generated_references=...)`): per cell, a copy of `generator` is fitted on the cell's
    k normal references and generates `count` anomaly-free images, which join the references in the other
    method's bank. Run such methods under their own labels. The generator's own pool is not used
    (pool_size=1 skips generating it)."""

    generator: OneToNormalModel
    count: int
    fit_arguments: dict = field(default_factory=dict)

    def generate(self, normal_images: Sequence[Image.Image], class_name: str, seed: int) -> list[Image.Image]:
        """`count` images generated by a copy of the generator fitted on `normal_images` with `seed`."""
        generator = copy.deepcopy(self.generator)
        generator.fit(normal_images, class_name=class_name, **({"seed": seed} | self.fit_arguments))
        return generator.generate_normals(normal_images, self.count)
