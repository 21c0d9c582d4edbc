"""AF-CLIP training ("AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP Adaptation", ACM MM
2025, Sec. 4.3): prompts and adapter (or LoRA) on an auxiliary dataset with image labels and pixel masks, loss
of Eq. 15.

With the attention adapter the frozen backbone's features are encoded once per image and cached; with LoRA
the vision tower itself is trained, so every batch runs it. Batches are seeded permutations of the dataset
per epoch; with several processes each takes its share of every batch and the gradients are averaged.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from ...features import FeatureCache
from ...training.trainer import FsadTrainer, FsadTrainingArguments
from ...visualization import mask_array
from .losses_afclip import afclip_loss

if TYPE_CHECKING:
    from accelerate import Accelerator

    from .modeling_afclip import AfClipModel


@dataclass
class AfClipTrainingArguments(FsadTrainingArguments):
    """AF-CLIP training settings; defaults follow the reference code: Adam, learning rate 1e-4, betas
    (0.5, 0.999), batch 8, 2 epochs over MVTec AD's test split (1,725 images: 432 steps).

    focal_gamma: gamma of the focal losses (Eqs. 11, 13; the reference code's 4; the paper gives none).
    segmentation_weight, alignment_weight: lambda1 and lambda2 of Eq. 15 (1 and 1).
    mask_threshold: a patch is anomalous when its bilinearly downsampled mask exceeds this (the reference
        code's 0.5; lower keeps thin defects that cover less than half a patch).
    alignment_pairs: how Eq. 14 pools its patch pairs (`patch_alignment_loss`): "batch" (the official code:
        all pairs of the batch, self pairs included, one hinge per token set; with several processes each
        pools its share of the batch) or "image" (one hinge per image, self pairs left out).
    """

    max_steps: int = 432
    batch_size: int = 8
    learning_rate: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.5, 0.999])
    focal_gamma: float = 4.0
    segmentation_weight: float = 1.0
    alignment_weight: float = 1.0
    mask_threshold: float = 0.5
    alignment_pairs: str = "batch"


class AfClipTrainer(FsadTrainer):
    """Trains an `AfClipModel`'s prompt context and adapter (or LoRA weights).

    ```python
    trainer = AfClipTrainer(model, load_benchmark("mvtec_ad", root)["test"], AfClipTrainingArguments(), "runs/afclip")
    trainer.train()
    ```
    The dataset needs `image`, `label`, `mask` (None for normal images) and `path`.
    """

    gradient_reduction = "mean"

    def __init__(
        self,
        model: AfClipModel,
        dataset: Dataset,
        args: AfClipTrainingArguments,
        output_dir: str | os.PathLike,
        accelerator: Accelerator | None = None,
    ):
        optimizer_factory = partial(torch.optim.Adam, lr=args.learning_rate, betas=tuple(args.betas))
        super().__init__(model, args, output_dir, optimizer_factory, accelerator)
        if args.batch_size < self.accelerator.num_processes:
            raise ValueError(
                f"batch_size {args.batch_size} is smaller than the {self.accelerator.num_processes} processes."
            )
        if dataset.num_rows == 0:
            raise ValueError("The auxiliary dataset is empty.")
        self.dataset = dataset
        self.labels = dataset["label"]
        self.cache = None if model.config.adapter_type == "lora" else FeatureCache(args.feature_cache_dir)

    def batch_rows(self, batch_index: int) -> list[int]:
        """This process's rows of batch `batch_index`: each epoch a permutation seeded by (seed, epoch), cut
        into `batch_size` batches, every process taking every `num_processes`-th row."""
        count, size = self.dataset.num_rows, self.args.batch_size
        epoch, position = divmod(batch_index, math.ceil(count / size))
        order = np.random.default_rng([self.args.seed, epoch]).permutation(count)
        rows = order[position * size : (position + 1) * size]
        return [int(row) for row in rows[self.accelerator.process_index :: self.accelerator.num_processes]]

    def patch_masks(self, rows: list[int]) -> torch.Tensor:
        """(B, N) bool: the masks downsampled bilinearly to the patch grid and binarised at `mask_threshold`."""
        size = self.model.config.image_size
        crop = self.model.config.paper_preprocessing == "crop"  # the geometry of the cached features
        masks = np.stack([mask_array(mask, size, crop) for mask in self.dataset.select(rows)["mask"]])
        masks = torch.from_numpy(masks).float().unsqueeze(1)
        grid = F.interpolate(masks, size=self.model.grid_size(), mode="bilinear", align_corners=False)
        return (grid > self.args.mask_threshold).flatten(1).to(self.accelerator.device)

    def _features(self, rows: list[int]) -> dict[str, torch.Tensor]:
        device = self.accelerator.device
        if self.cache is not None:
            features = self.cache.features(
                self.model, self.dataset, rows, self.args.encode_batch_size, "encoding"
            )
            return {name: tensor.to(device) for name, tensor in features.items()}
        images = [image.convert("RGB") for image in self.dataset.select(rows)["image"]]
        pixel_values = self.model.paper_image_processor()(images, return_tensors="pt").pixel_values
        return self.model.vision_features(pixel_values.to(device))

    def compute_loss(self, batch_index: int) -> torch.Tensor:
        rows = self.batch_rows(batch_index)
        probabilities, projected = self.model.token_probabilities(
            self.model.token_sets(self._features(rows)), self.model.text_embeddings()
        )
        labels = torch.tensor([self.labels[row] for row in rows], device=self.accelerator.device)
        args = self.args
        losses = afclip_loss(
            probabilities,
            labels,
            self.patch_masks(rows),
            projected,
            args.focal_gamma,
            args.segmentation_weight,
            args.alignment_weight,
            args.alignment_pairs,
        )
        return losses["total"]
