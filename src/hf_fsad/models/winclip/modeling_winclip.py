"""WinCLIP (zero-shot) and WinCLIP+ (few-shot), Jeong et al., CVPR 2023."""

from __future__ import annotations

import torch

from ...bank import ReferenceBank
from ...modeling_base import FsadPreTrainedModel
from ...modeling_outputs import AnomalyDetectionOutput
from ...prompts import TEMPLATES
from ...scoring import class_scores, window_masks
from .configuration_winclip import WinClipConfig
from .functional_winclip import fuse_zero_few_shot, winclip_few_shot_map, winclip_zero_shot_map


class WinClipModel(FsadPreTrainedModel):
    """WinCLIP scores every patch by text (window class scores, harmonic-aggregated over scales) and,
    with k normal references, by distance to the nearest reference patch/window (WinCLIP+).

    The bank holds the class's (normal, anomalous) text embeddings and, for WinCLIP+, the references'
    patch tokens (last block, post-layernorm, unprojected) and window embeddings per scale.
    """

    config_class = WinClipConfig
    memory_prefixes = ("patch_tokens", "window_embeddings.")

    def __init__(self, config: WinClipConfig):
        super().__init__(config)
        self.post_init()

    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """(2, P) ensemble embeddings of the normal and anomalous states of `class_name`."""
        templates = self.config.prompt_templates or TEMPLATES
        return self.backbone.state_embeddings(class_name, self.config.normalize_prompt_embeddings, templates)

    def feature_spec(self) -> dict:
        return {**super().feature_spec(), "window_scales": self.config.window_scales}

    @torch.no_grad()
    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """Per-image features for scoring and for banks: image embeddings (B, P), patch tokens (B, N, D;
        last block, post-layernorm, unprojected) and window embeddings (B, W_s, P) per scale.

        What `feature_key()` identifies; the benchmark runner caches these per image. `name` is the
        argument that errors about the pixels name.
        """
        features = self.backbone.encode_image(self.check_pixels(pixel_values, name))
        last = features.last_hidden_state
        windows = self.backbone.encode_windows(
            features.embeddings, features.grid_size, self.config.window_scales
        )
        return {
            "image_embeddings": self.backbone.project(last[:, 0]),
            "patch_tokens": self.backbone.post_norm(last[:, 1:]),
            **{
                f"window_embeddings.{scale}": window
                for scale, window in zip(self.config.window_scales, windows)
            },
        }

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """Bank for one class: text embeddings, plus the references' features when images are given.

        No images gives a zero-shot bank (WinCLIP); k images give WinCLIP+ k-shot. `reference_features`
        (from `encode_images`) may stand in for the images.
        """
        class_name = class_name or self.config.default_class_name
        tensors = {"text_embeddings": self.text_embeddings(class_name)}
        reference_features = self.features_of(
            reference_pixel_values, reference_features, "reference_pixel_values"
        )
        k = 0
        if reference_features is not None:
            k = reference_features["patch_tokens"].shape[0]
            for name in [
                "patch_tokens",
                *(f"window_embeddings.{scale}" for scale in self.config.window_scales),
            ]:
                tensors[name] = reference_features[name].flatten(0, 1)
        return self.bank_from_tensors(class_name, k, tensors)

    def window_mask_list(self, device: torch.device | None = None) -> list[torch.Tensor]:
        """`window_masks` (W_s, P) of each configured scale on the patch grid."""
        return [window_masks(self.grid_size(), scale).to(device) for scale in self.config.window_scales]

    def zero_shot_branch(
        self, features: dict[str, torch.Tensor], text: torch.Tensor, masks: list[torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """WinCLIP's text branch: image-level class scores (B,) and the zero-shot patch map (B, P)."""
        temperature = self.config.temperature
        image_scores = class_scores(features["image_embeddings"], text, temperature)
        window_scores = [
            class_scores(features[f"window_embeddings.{scale}"], text, temperature)
            for scale in self.config.window_scales
        ]
        return image_scores, winclip_zero_shot_map(image_scores, window_scores, masks)

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """Scores and maps (at `config.image_size`) from `encode_images` features."""
        bank = self.bank_or_default(reference_bank)
        text = bank.tensors["text_embeddings"]
        scales = self.config.window_scales
        masks = self.window_mask_list(text.device)
        zero_shot_scores, patch_map = self.zero_shot_branch(features, text, masks)
        image_scores = zero_shot_scores
        branch_scores = {"zero_shot": zero_shot_scores}

        if bank.k > 0:
            few_shot_map = winclip_few_shot_map(
                features["patch_tokens"],
                bank.tensors["patch_tokens"],
                [features[f"window_embeddings.{scale}"] for scale in scales],
                [bank.tensors[f"window_embeddings.{scale}"] for scale in scales],
                masks,
            )
            branch_scores["few_shot"] = few_shot_map.amax(dim=-1)
            patch_map, image_scores = fuse_zero_few_shot(patch_map, zero_shot_scores, few_shot_map)

        return AnomalyDetectionOutput(
            image_scores=image_scores, anomaly_maps=self.to_pixel_maps(patch_map), branch_scores=branch_scores
        )
