"""VTFusion: prototypes, adaptive image/text encoders and multimodal prediction fusion (Jiang et al.,
"VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection")."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from ...bank import ReferenceBank
from ...modeling_base import FsadPreTrainedModel
from ...modeling_outputs import AnomalyDetectionOutput
from ...scoring import l2_normalize, upsample_maps
from .configuration_vtfusion import VtFusionConfig
from .functional_vtfusion import nearest_prototype_distance, stack_levels, text_guided_map

if TYPE_CHECKING:
    from accelerate import Accelerator

    from ...training.trainer import TrainingResult


def conv_bn_relu(in_channels: int, out_channels: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(),
    )


class AdaptiveImageEncoder(nn.Module):
    """AIE: per level, a linear layer into the joint space (CLIP's frozen projection + a trainable correction,
    see the config) and the feature adaptor, a 3x3 conv on the level's feature map (None: linear only)."""

    def __init__(self, width: int, projection_dim: int, num_levels: int, use_adaptor: bool):
        super().__init__()
        self.linear_corrections = nn.ModuleList(nn.Linear(width, projection_dim) for _ in range(num_levels))
        self.adaptors = (
            nn.ModuleList(nn.Conv2d(projection_dim, projection_dim, 3, padding=1) for _ in range(num_levels))
            if use_adaptor
            else None
        )

    def forward(
        self, normed_tokens: list[torch.Tensor], projection: nn.Linear, grid_size: tuple[int, int]
    ) -> list[torch.Tensor]:
        """Post-layernormed patch tokens [(B, N, D)] -> L2-normalised level features F_l^v [(B, N, P)]."""
        features = []
        for level, tokens in enumerate(normed_tokens):
            linear = projection(tokens) + self.linear_corrections[level](tokens)
            if self.adaptors is not None:
                batch, _, channels = linear.shape
                grid = linear.transpose(1, 2).reshape(batch, channels, *grid_size)
                linear = self.adaptors[level](grid).flatten(2).transpose(1, 2)
            features.append(l2_normalize(linear))
        return features


class TextAdapter(nn.Module):
    """ATE: a residual MLP on the text features, t + W2 relu(W1 t); W2 starts at zero."""

    def __init__(self, dim: int, hidden_size: int):
        super().__init__()
        self.hidden = nn.Linear(dim, hidden_size)
        self.output = nn.Linear(hidden_size, dim)

    def forward(self, text_embeddings: torch.Tensor) -> torch.Tensor:
        return text_embeddings + self.output(torch.relu(self.hidden(text_embeddings)))


class SpatialSelfAttention(nn.Module):
    """SAM of Eq. 7 on a one-channel prediction map: 1x1 convs embed it and give queries, keys and values;
    softmax(q k^T / sqrt(C)) over all locations weights the values. (B, 1, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.embed = nn.Conv2d(1, channels, 1)
        self.query = nn.Conv2d(channels, channels, 1)
        self.key = nn.Conv2d(channels, channels, 1)
        self.value = nn.Conv2d(channels, channels, 1)

    def forward(self, prediction: torch.Tensor) -> torch.Tensor:
        embedded = self.embed(prediction)
        batch, channels, height, width = embedded.shape

        def tokens(projection: nn.Conv2d) -> torch.Tensor:
            # (B, 1, hw, C): one attention head, in the 4-D layout torch.onnx exports
            return projection(embedded).flatten(2).transpose(1, 2)[:, None]

        attended = F.scaled_dot_product_attention(tokens(self.query), tokens(self.key), tokens(self.value))
        return attended[:, 0].transpose(1, 2).reshape(batch, channels, height, width)


class ResidualBlock(nn.Module):
    """G of Eq. 7: conv-BN-ReLU-conv-BN plus a 1x1 projection of the input, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.body = nn.Sequential(
            conv_bn_relu(in_channels, out_channels),
            nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
        )
        self.skip = nn.Conv2d(in_channels, out_channels, 1, bias=False)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.body(inputs) + self.skip(inputs))


class FusionBlock(nn.Module):
    """Eq. 7: M_vt = G(SAM(M_v) (+) SAM(M_t)), one attention per modality, channel concatenation, the
    residual block, and a 1x1 conv to the one-channel fused prediction. (B, 1, h, w) x 2 -> (B, 1, h, w)."""

    def __init__(self, channels: int):
        super().__init__()
        self.vision_attention = SpatialSelfAttention(channels)
        self.text_attention = SpatialSelfAttention(channels)
        self.residual = ResidualBlock(2 * channels, channels)
        self.output = nn.Conv2d(channels, 1, 1)

    def forward(self, vision_map: torch.Tensor, text_map: torch.Tensor) -> torch.Tensor:
        attended = torch.cat([self.vision_attention(vision_map), self.text_attention(text_map)], dim=1)
        return self.output(self.residual(attended))


class SegmentationNetwork(nn.Module):
    """phi of Eq. 9, FPN-like: a bottom-up path of stride-2 conv stages, a top-down path adding upsampled
    coarser levels to 1x1 lateral projections, and multi-scale aggregation: every smoothed pyramid level
    upsampled to the finest, concatenated, and a 1x1 conv + sigmoid. (B, C_in, h, w) -> (B, 1, h, w)."""

    def __init__(self, in_channels: int, channels: int, num_levels: int):
        super().__init__()
        self.stages = nn.ModuleList(
            conv_bn_relu(in_channels if level == 0 else channels, channels, stride=1 if level == 0 else 2)
            for level in range(num_levels)
        )
        self.laterals = nn.ModuleList(nn.Conv2d(channels, channels, 1) for _ in range(num_levels))
        self.smoothing = nn.ModuleList(conv_bn_relu(channels, channels) for _ in range(num_levels))
        self.head = nn.Conv2d(channels * num_levels, 1, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        bottom_up, hidden = [], inputs
        for stage in self.stages:
            hidden = stage(hidden)
            bottom_up.append(hidden)
        top_down = [self.laterals[-1](bottom_up[-1])]
        for level in range(len(bottom_up) - 2, -1, -1):
            coarser = F.interpolate(top_down[0], size=bottom_up[level].shape[-2:], mode="nearest")
            top_down.insert(0, self.laterals[level](bottom_up[level]) + coarser)
        size = top_down[0].shape[-2:]
        aggregated = [
            F.interpolate(smooth(level), size=size, mode="bilinear", align_corners=False)
            for smooth, level in zip(self.smoothing, top_down)
        ]
        return torch.sigmoid(self.head(torch.cat(aggregated, dim=1)))


@dataclass
class VtFusionPrediction:
    """Every intermediate of one VTFusion pass (for scoring and for the losses).

    vision_map: (B, N) M_v (Eq. 5); text_map: (B, N) M_t (Eq. 6); fused_map: (B, 1, h, w) M_vt (Eq. 7) or
    None without MPF; anomaly_maps: (B, S, S) M_f (Eq. 9).
    """

    vision_map: torch.Tensor
    text_map: torch.Tensor
    fused_map: torch.Tensor | None
    anomaly_maps: torch.Tensor


class VtFusionModel(FsadPreTrainedModel):
    """VTFusion, fitted per category on k normal images with synthetic anomalies (`fit`).

    Vision flow: frozen CLIP patch tokens of several blocks -> AIE (linear + conv adaptor) -> stacked
    features, compared with N frozen prototypes (Eq. 1: the k normals' features averaged per location) ->
    M_v = squared distance to the nearest prototype (Eqs. 2, 5). Text flow: the WinCLIP ensemble of
    normal/damaged prompts -> ATE (MLP) -> M_t = sum over levels of the anomalous softmax (Eq. 6). MPF fuses
    them (Eq. 7) and an FPN-like network turns M_v, M_t, M_vt into the map M_f (Eq. 9); image score = max M_f.

    Trained parameters: AIE, ATE and MPF; the backbone is frozen. The prototypes are a buffer set by `fit`.
    """

    config_class = VtFusionConfig
    # The benchmark runner fits a copy of the model on each cell's normal references.
    fits_per_category = True
    # The fitted prototypes are saved with the model: its bank needs no references.
    saves_its_references = True

    def __init__(self, config: VtFusionConfig):
        super().__init__(config)
        clip_config = config.clip_config
        projection_dim = clip_config.projection_dim
        num_levels = len(config.feature_layers)
        self.image_encoder = AdaptiveImageEncoder(
            clip_config.vision_config.hidden_size, projection_dim, num_levels, config.use_feature_adaptor
        )
        self.text_adapter = (
            TextAdapter(projection_dim, config.text_adapter_hidden_size) if config.use_text_adapter else None
        )
        self.fusion = FusionBlock(config.fusion_channels) if config.use_fusion else None
        self.segmentation = (
            SegmentationNetwork(3, config.segmentation_channels, config.segmentation_levels)
            if config.use_fusion
            else None
        )
        height, width = self.grid_size()
        self.register_buffer("prototypes", torch.zeros(height * width, projection_dim * num_levels))
        self.post_init()

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if module is not self:
            return
        for correction in self.image_encoder.linear_corrections:
            nn.init.zeros_(correction.weight)
            nn.init.zeros_(correction.bias)
        for adaptor in self.image_encoder.adaptors or []:
            nn.init.dirac_(adaptor.weight)
            nn.init.zeros_(adaptor.bias)
        if self.text_adapter is not None:
            nn.init.zeros_(self.text_adapter.output.weight)
            nn.init.zeros_(self.text_adapter.output.bias)

    @property
    def is_fitted(self) -> bool:
        return self.config.num_fitted_normals > 0

    def feature_spec(self) -> dict:
        return {**super().feature_spec(), "feature_layers": sorted(set(self.config.feature_layers))}

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """Raw tokens (B, 1+N, D), CLS first, after each feature block, as "tokens.<block>" (frozen: cached
        by the benchmark runner and computed once per image when fitting)."""
        return self.backbone.block_tokens(self.check_pixels(pixel_values, name), self.config.feature_layers)

    def level_features(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """AIE: the L2-normalised features F_l^v (B, N, P) of each level, in `feature_layers` order."""
        normed = [
            self.backbone.post_norm(features[f"tokens.{layer}"][:, 1:])
            for layer in self.config.feature_layers
        ]
        return self.image_encoder(normed, self.backbone.clip.visual_projection, self.grid_size())

    def text_features(self, state_embeddings: torch.Tensor) -> torch.Tensor:
        """ATE: (2, P) normal/anomalous prompt-ensemble embeddings -> the text features F^t (L2-normalised)."""
        if self.text_adapter is not None:
            state_embeddings = self.text_adapter(state_embeddings)
        return l2_normalize(state_embeddings)

    def predict(
        self, features: dict[str, torch.Tensor], state_embeddings: torch.Tensor, prototypes: torch.Tensor
    ) -> VtFusionPrediction:
        """One differentiable pass from `encode_images` features, the (2, P) state embeddings and the
        prototypes (N, P x L) to every prediction (Eqs. 5-9)."""
        levels = self.level_features(features)
        vision_map = nearest_prototype_distance(stack_levels(levels), prototypes, self.config.distance)
        text_map = text_guided_map(
            levels, self.text_features(state_embeddings), 1 / self.config.text_logit_scale
        )
        height, width = self.grid_size()
        size = (self.config.image_size, self.config.image_size)
        fused = None
        if self.fusion is not None:
            vision_grid = vision_map.reshape(-1, 1, height, width)
            text_grid = text_map.reshape(-1, 1, height, width)
            fused = self.fusion(vision_grid, text_grid)
            coarse = self.segmentation(torch.cat([vision_grid, text_grid, fused], dim=1)).squeeze(1)
        else:
            coarse = (vision_map + text_map).reshape(-1, height, width)
        return VtFusionPrediction(vision_map, text_map, fused, upsample_maps(coarse, size))

    def fit(
        self,
        normal_images: Sequence,
        class_name: str | None = None,
        steps: int = 1000,
        accelerator: Accelerator | None = None,
        **arguments,
    ) -> TrainingResult:
        """Fit this model to one category: prototypes from the k `normal_images` (PIL images), then `steps`
        updates of AIE, ATE and MPF on those normals and synthetic anomalies made from them each step.
        `arguments` are further `VtFusionTrainingArguments` (seed, anomaly_kinds, learning rates, ...).
        Returns the training record; the model is left fitted, in eval mode."""
        from .training_vtfusion import VtFusionTrainer, VtFusionTrainingArguments

        args = VtFusionTrainingArguments(max_steps=steps, **arguments)
        trainer = VtFusionTrainer(self, normal_images, class_name, args, accelerator=accelerator)
        return trainer.train()

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """The fitted prototypes and the prompt-ensemble embeddings of `class_name` (default: the class the
        model was fitted on). VTFusion's normal references are the images it was fitted on: references given
        here are an error (fit on them instead)."""
        if reference_pixel_values is not None or reference_features is not None:
            raise ValueError(
                "VTFusion is fitted on its normal images: call `model.fit(normal_images, class_name=...)` (or "
                "`hf-fsad fit --method vtfusion`), then build the bank without references."
            )
        if not self.is_fitted:
            raise ValueError(
                "This VTFusion model is not fitted: call `model.fit(normal_images, class_name=...)` first."
            )
        class_name = class_name or self.config.fitted_class_name or self.config.default_class_name
        tensors = {
            "prototypes": self.prototypes.clone(),
            "state_embeddings": self.backbone.state_embeddings(class_name),
        }
        return self.bank_from_tensors(class_name, self.config.num_fitted_normals, tensors)

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """M_f as the maps and max(M_f) as the image scores; branch scores are each map's maximum (M_v, M_t
        and, with MPF, M_vt)."""
        bank = self.bank_or_default(reference_bank)
        prediction = self.predict(features, bank.tensors["state_embeddings"], bank.tensors["prototypes"])
        branch_scores = {
            "vision": prediction.vision_map.amax(dim=-1),
            "text": prediction.text_map.amax(dim=-1),
        }
        if prediction.fused_map is not None:
            branch_scores["fused"] = prediction.fused_map.flatten(1).amax(dim=-1)
        return AnomalyDetectionOutput(
            image_scores=prediction.anomaly_maps.flatten(1).amax(dim=-1),
            anomaly_maps=prediction.anomaly_maps,
            branch_scores=branch_scores,
        )
