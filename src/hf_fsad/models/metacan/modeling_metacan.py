"""MetaCAN: category-to-anomaly network trained with AD meta-learning (Lv et al., CIKM 2025)."""

from __future__ import annotations

import torch
from torch import nn

from ...bank import ReferenceBank
from ...modeling_base import FsadPreTrainedModel
from ...modeling_outputs import AnomalyDetectionOutput
from ...scoring import class_scores
from .configuration_metacan import MetaCanConfig
from .functional_metacan import image_image_score, metacan_fusion, topk_reference_anomaly


def detector_layers(config: MetaCanConfig) -> nn.Sequential:
    """Eq. 7's map from the image-text map (P values) to a logit (the sigmoid is applied by the head).

    "official": Linear -> ReLU -> BatchNorm per hidden width, then Linear to 1, all with bias. "paper": the
    plain matrices W3, W4 (no bias, nothing between them).
    """
    official = config.detector_type == "official"
    layers: list[nn.Module] = []
    width = config.num_patches
    for hidden in config.detector_widths:
        layers.append(nn.Linear(width, hidden, bias=official))
        if official:
            layers += [nn.ReLU(), nn.BatchNorm1d(hidden)]
        width = hidden
    layers.append(nn.Linear(width, 1, bias=official))
    return nn.Sequential(*layers)


class CategoryToAnomalyHead(nn.Module):
    """Everything of MetaCAN after the frozen CLIP: the image-image discriminator (Eqs. 1-4, no parameters),
    the feature differentiator and image-text detector (Eqs. 5-7, the trained parameters) and Eq. 8.

    A module of its own so the meta-learner can run it with `torch.func.functional_call` on adapted
    parameters.
    """

    def __init__(self, config: MetaCanConfig, vision_width: int, embedding_size: int):
        super().__init__()
        self.config = config
        bias = config.differentiator_bias
        layers = [
            nn.Linear(vision_width, config.differentiator_hidden_size, bias=bias),
            nn.ReLU(),
            nn.Linear(config.differentiator_hidden_size, embedding_size, bias=bias),
        ]
        if config.differentiator_output_relu:
            layers.append(nn.ReLU())
        self.differentiator = nn.Sequential(*layers)
        self.detector = detector_layers(config)

    def forward(
        self,
        query_levels: list[torch.Tensor],
        reference_levels: list[torch.Tensor],
        text_embeddings: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """Scores of B queries against k references.

        query_levels: per pyramid level (B, N, D) raw patch tokens; reference_levels: per level (k, N, D);
        text_embeddings: (2, P) normal and anomalous prompt embeddings. Returns "score" (B,) (Eq. 8) and
        the branches that ran: "image_image" (B,) with its "level_maps" (L, B, N), and "image_text" (B,)
        with its "image_text_map" (B, N).
        """
        config = self.config
        outputs: dict[str, torch.Tensor] = {}
        num_references = reference_levels[0].shape[0]
        if config.use_discriminator:
            level_maps = [
                topk_reference_anomaly(query, reference.flatten(0, 1), num_references)
                for query, reference in zip(query_levels, reference_levels)
            ]
            outputs["level_maps"] = torch.stack(level_maps)
            outputs["image_image"] = image_image_score(level_maps)
        if config.use_detector:
            difference = query_levels[-1] - reference_levels[-1].mean(dim=0)  # Eq. 5's argument
            differential = self.differentiator(difference)
            image_text_map = class_scores(differential, text_embeddings, 1 / config.text_logit_scale)  # Eq. 6
            outputs["image_text_map"] = image_text_map
            outputs["image_text"] = torch.sigmoid(self.detector(image_text_map)).squeeze(-1)  # Eq. 7
        outputs["score"] = metacan_fusion(
            outputs.get("image_image"), outputs.get("image_text"), config.num_levels
        )
        return outputs


class MetaCanModel(FsadPreTrainedModel):
    """MetaCAN scores a query against k normal references of any category without retraining: an
    image-image discriminator compares a CLIP feature pyramid (blocks 1, 7, 12) with the references' patches,
    and an image-text detector aligns the query-minus-references difference with object-agnostic
    normal/anomalous prompts. The differentiator and detector are trained on an auxiliary dataset by AD
    meta-learning (`hf_fsad.models.metacan.training_metacan`).

    An image-level method: `image_scores` are the output. `anomaly_maps` exposes the image-text map (Eq. 6,
    one probability per patch) upsampled to the input size, as the paper's Fig. 3 shows it; it is None when
    the detector is ablated.
    """

    config_class = MetaCanConfig
    needs_training = True
    trained_parts_name = "differentiator and detector"
    how_to_get_weights = (
        "train them (accelerate launch training/train_metacan.py --config training/configs/metacan.yaml; "
        "docs/training.md) and score the saved model"
    )

    def __init__(self, config: MetaCanConfig):
        super().__init__(config)
        clip_config = config.clip_config
        self.head = CategoryToAnomalyHead(
            config, clip_config.vision_config.hidden_size, clip_config.projection_dim
        )
        self.post_init()

    def feature_spec(self) -> dict:
        return {**super().feature_spec(), "feature_layers": sorted(set(self.config.feature_layers))}

    def text_embeddings(self) -> torch.Tensor:
        """(2, P) object-agnostic ensemble embeddings (normal, anomalous) of `config.prompt_object`."""
        return self.backbone.state_embeddings(self.config.prompt_object)

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """Raw tokens (B, 1+N, D), CLS first, after each pyramid block, as "tokens.<block>"."""
        return self.backbone.block_tokens(self.check_pixels(pixel_values, name), self.config.feature_layers)

    def levels(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """The pyramid's patch tokens (without CLS) in `config.feature_layers` order, from `encode_images`
        features or bank tensors."""
        return [features[f"tokens.{layer}"][:, 1:] for layer in self.config.feature_layers]

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """Bank of k >= 1 normal references (their pyramid tokens) and the prompt embeddings.

        `reference_features` (from `encode_images`) may stand in for the images. The prompts are
        object-agnostic; `class_name` only labels the bank.
        """
        reference_features = self.features_of(
            reference_pixel_values, reference_features, "reference_pixel_values"
        )
        if reference_features is None:
            raise ValueError(
                "MetaCAN compares each image with normal references: give at least one (k >= 1) "
                "reference image to build_reference_bank."
            )
        tensors = {"text_embeddings": self.text_embeddings()}
        for layer in sorted(set(self.config.feature_layers)):
            tensors[f"tokens.{layer}"] = reference_features[f"tokens.{layer}"]
        k = tensors[f"tokens.{self.config.feature_layers[0]}"].shape[0]
        return self.bank_from_tensors(class_name or self.config.default_class_name, k, tensors)

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """Scores (and the image-text map) from `encode_images` features and a bank of k normal references."""
        bank = self.required_bank(
            reference_bank,
            "of k >= 1 normal images: `model.build_reference_bank(processor(images).pixel_values)`.",
        )
        outputs = self.head(self.levels(features), self.levels(bank.tensors), bank.tensors["text_embeddings"])
        branch_scores = {name: outputs[name] for name in ("image_image", "image_text") if name in outputs}
        for layer, level_map in zip(self.config.feature_layers, outputs.get("level_maps", [])):
            branch_scores[f"image_image.block{layer}"] = level_map.amax(dim=-1)
        maps = outputs.get("image_text_map")
        return AnomalyDetectionOutput(
            image_scores=outputs["score"],
            anomaly_maps=self.to_pixel_maps(maps) if maps is not None else None,
            branch_scores=branch_scores,
        )
