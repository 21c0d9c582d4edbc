"""VTFusion fitting: one category, its k normal images, synthetic anomalies (Algorithm 1 of Jiang et al.,
"VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection").

    python training/fit_vtfusion.py --config training/configs/vtfusion.yaml [--set model.use_fusion=false]

runs the paper's protocol (fit per category and k normals, score the category's test split); `hf-fsad fit`
fits one model on a folder of normal images.

The prototypes (Eq. 1) are computed once from the normals before the first update and stay frozen. Every
update pairs each normal image with a fresh synthetic anomaly made from it (DAS, `hf_fsad.synthesis`, drawn
from a generator seeded by (seed, step)), so a run is reproducible bit for bit and resumes exactly. The
frozen backbone's features of the normals are encoded once; the anomalies' at each step.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ...augmentation import random_crop
from ...synthesis import DEFAULT_SIZE_RANGE, SYNTHESIS_KINDS, random_anomaly
from ...training.trainer import FsadTrainer, FsadTrainingArguments
from .functional_vtfusion import initial_prototypes, stack_levels
from .losses_vtfusion import vtfusion_loss

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ...modeling_base import FsadPreTrainedModel


@dataclass
class VtFusionTrainingArguments(FsadTrainingArguments):
    """VTFusion fitting settings: Adam with the paper's learning rates, 1e-3 for the AIE and 1e-4 for the ATE
    and MPF (Sec. IV-A). max_steps: the paper gives no iteration count; 1000 updates of k normal + k synthetic
    images (at 1e-4 the fusion and segmentation layers need that many; the toy recipe trains 200 updates with
    all rates at 1e-3). anomaly_kinds: the DAS types drawn from (one type for Table III's single-type ablations).
    anomaly_size_range: synthetic region half-sizes as fractions of the image side (1-40 %, see
    `hf_fsad.synthesis`). misplaced_rotation: probability that a misplaced patch is pasted rotated by 180
    degrees (0: the paper's plain cut-and-paste). crop_scale_range: each
    update takes random crops (this share of each side, resized back) of the normals and of the images the
    anomalies are made from, so the training normals are not exactly their own prototypes (the paper says
    nothing on augmentation; None turns it off). No checkpoints unless the trainer gets an output_dir."""

    max_steps: int = 1000
    image_encoder_learning_rate: float = 1e-3
    learning_rate: float = 1e-4
    anomaly_kinds: list[str] = field(default_factory=lambda: list(SYNTHESIS_KINDS))
    anomaly_size_range: list[float] = field(default_factory=lambda: list(DEFAULT_SIZE_RANGE))
    misplaced_rotation: float = 0.0
    crop_scale_range: list[float] | None = field(default_factory=lambda: [0.8, 1.0])

    def __post_init__(self):
        super().__post_init__()
        unknown = set(self.anomaly_kinds) - set(SYNTHESIS_KINDS)
        if unknown or not self.anomaly_kinds:
            raise ValueError(
                f"anomaly_kinds must be a non-empty subset of {SYNTHESIS_KINDS}, got {self.anomaly_kinds}."
            )


def anomalous_patches(masks: torch.Tensor, grid_size: tuple[int, int], fraction: float = 0.0) -> torch.Tensor:
    """(B, H, W) pixel masks -> (B, h*w) bool: patches of which more than `fraction` of the pixels are
    anomalous (0: any changed pixel). Adaptive average pooling: any H, W."""
    shares = F.adaptive_avg_pool2d(masks.double().unsqueeze(1), grid_size)
    return (shares > fraction).flatten(1)


class VtFusionTrainer(FsadTrainer):
    """Fits a `VtFusionModel` to the normal images of one category (what `VtFusionModel.fit` runs).

    Every process computes the whole (small) batch, so several processes give the same update as one.
    """

    gradient_reduction = "mean"

    def __init__(
        self,
        model: FsadPreTrainedModel,
        normal_images: Sequence[Image.Image],
        class_name: str | None,
        args: VtFusionTrainingArguments,
        output_dir: str | os.PathLike | None = None,
        accelerator: Accelerator | None = None,
    ):
        super().__init__(model, args, output_dir, torch.optim.Adam, accelerator)
        if len(normal_images) == 0:
            raise ValueError("VTFusion needs at least one normal image to fit on.")
        for index, image in enumerate(normal_images):
            if not isinstance(image, Image.Image):
                raise TypeError(f"normal_images[{index}] is a {type(image).__name__}, not a PIL image.")
        size = model.config.image_size
        # Synthesis works at the model's input size, so masks align with the maps pixel for pixel.
        self.normals = [image.convert("RGB").resize((size, size), Image.BICUBIC) for image in normal_images]
        self.class_name = class_name or model.config.fitted_class_name or model.config.default_class_name
        device = self.accelerator.device
        with torch.no_grad():
            self.state_embeddings = model.backbone.state_embeddings(self.class_name).to(device)
            normal_features = {name: t.to(device) for name, t in self._encode(self.normals).items()}
            levels = model.level_features(normal_features)
            model.prototypes.copy_(initial_prototypes(stack_levels(levels)))
        model.config.fitted_class_name = self.class_name
        model.config.num_fitted_normals = len(self.normals)

    def parameter_groups(self) -> list[dict]:
        """The AIE at `image_encoder_learning_rate`, the ATE and MPF at `learning_rate`."""
        image_encoder = [p for name, p in self.parameters.items() if name.startswith("image_encoder.")]
        others = [p for name, p in self.parameters.items() if not name.startswith("image_encoder.")]
        groups = [{"params": image_encoder, "lr": self.args.image_encoder_learning_rate}]
        return groups + ([{"params": others, "lr": self.args.learning_rate}] if others else [])

    def _encode(self, images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pixel_values = self.model.image_processor()(images, return_tensors="pt").pixel_values
        return self.model.encode_images(pixel_values)

    def training_batch(self, batch_index: int) -> tuple[list[Image.Image], list[Image.Image], torch.Tensor]:
        """Per normal image, a random crop of it and a synthetic anomaly made from another crop, seeded by
        (seed, batch_index): (normal views, anomalous images, their (k, S, S) masks)."""
        rng = np.random.default_rng([self.args.seed, batch_index])
        kinds, size_range = tuple(self.args.anomaly_kinds), tuple(self.args.anomaly_size_range)
        crops = self.args.crop_scale_range
        views, anomalies, masks = [], [], []
        for normal in self.normals:
            view = random_crop(normal, rng, tuple(crops)) if crops else normal
            source = random_crop(normal, rng, tuple(crops)) if crops else normal
            image, mask, _ = random_anomaly(
                source, rng, kinds, size_range, misplaced_rotation=self.args.misplaced_rotation
            )
            views.append(view)
            anomalies.append(image)
            masks.append(torch.from_numpy(mask))
        return views, anomalies, torch.stack(masks)

    def compute_loss(self, batch_index: int) -> torch.Tensor:
        model, device = self.model, self.accelerator.device
        views, anomalies, anomaly_masks = self.training_batch(batch_index)
        features = {name: tensor.to(device) for name, tensor in self._encode(views + anomalies).items()}
        prediction = model.predict(features, self.state_embeddings, model.prototypes)
        count = len(self.normals)
        anomaly_masks = anomaly_masks.to(device)
        masks = torch.cat([torch.zeros_like(anomaly_masks), anomaly_masks])
        config = model.config
        losses = vtfusion_loss(
            prediction.vision_map[:count],
            prediction.vision_map[count:],
            anomalous_patches(anomaly_masks, model.grid_size(), config.anomalous_patch_fraction),
            prediction.anomaly_maps,
            masks,
            config.radius,
            config.margin,
            config.segmentation_weight,
            use_separation=config.use_feature_adaptor,
        )
        return losses["total"]
