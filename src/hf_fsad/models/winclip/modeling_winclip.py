"""WinCLIP (zero-shot) and WinCLIP+ (few-shot), Jeong et al., CVPR 2023."""

from __future__ import annotations

import torch

from ...modeling_base import AnomalyDetectionOutput, FsadPreTrainedModel, ReferenceBank, validate_pixel_values
from ...prompts import winclip_prompts
from ...scoring import (
    class_scores,
    ensemble_text_embedding,
    fuse_zero_few_shot,
    upsample_maps,
    winclip_few_shot_map,
    winclip_zero_shot_map,
    window_masks,
)
from .configuration_winclip import WinClipConfig


class WinClipModel(FsadPreTrainedModel):
    """WinCLIP scores every patch by text (window class scores, harmonic-aggregated over scales) and,
    with k normal references, by distance to the nearest reference patch/window (WinCLIP+).

    The bank holds the class's (normal, anomalous) text embeddings and, for WinCLIP+, the references'
    patch tokens (last block, post-layernorm, unprojected) and window embeddings per scale.
    """

    config_class = WinClipConfig

    def __init__(self, config: WinClipConfig):
        super().__init__(config)
        self.post_init()

    def text_embeddings(self, class_name: str) -> torch.Tensor:
        """(2, P) ensemble embeddings of the normal and anomalous states of `class_name`."""
        normalize = self.config.normalize_prompt_embeddings
        return torch.stack(
            [ensemble_text_embedding(self.backbone.encode_text(prompts), normalize)
             for prompts in winclip_prompts(class_name)]
        )

    def _encode(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Image embeddings (B, P), patch tokens (B, N, D) and window embeddings per scale (B, W_s, P)."""
        features = self.backbone.encode_image(pixel_values)
        last = features.last_hidden_state
        image_embeddings = self.backbone.project(last[:, 0])
        patch_tokens = self.backbone.post_norm(last[:, 1:])
        windows = self.backbone.encode_windows(features.embeddings, features.grid_size, self.config.window_scales)
        return image_embeddings, patch_tokens, windows

    @torch.no_grad()
    def build_reference_bank(
        self, reference_pixel_values: torch.Tensor | None = None, class_name: str | None = None
    ) -> ReferenceBank:
        """Bank for one class: text embeddings, plus the references' features when images are given.

        No images gives a zero-shot bank (WinCLIP); k images give WinCLIP+ k-shot.
        """
        class_name = class_name or self.config.default_class_name
        tensors = {"text_embeddings": self.text_embeddings(class_name)}
        k = 0
        if reference_pixel_values is not None:
            if isinstance(reference_pixel_values, torch.Tensor) and reference_pixel_values.shape[0] == 0:
                raise ValueError("The reference set is empty: give at least one normal image, or None for zero-shot.")
            validate_pixel_values(reference_pixel_values, self.backbone.patch_size, "reference_pixel_values")
            reference_pixel_values = reference_pixel_values.to(self.device, self.dtype)
            _, patch_tokens, windows = self._encode(reference_pixel_values)
            k = reference_pixel_values.shape[0]
            tensors["patch_tokens"] = patch_tokens.flatten(0, 1)
            for scale, window in zip(self.config.window_scales, windows):
                tensors[f"window_embeddings.{scale}"] = window.flatten(0, 1)
        return self.make_bank(class_name, k, tensors)

    def forward(
        self, pixel_values: torch.Tensor, reference_bank: ReferenceBank | None = None, return_dict: bool = True
    ) -> AnomalyDetectionOutput | tuple:
        """Score a batch. Without a bank, zero-shot with `config.default_class_name`."""
        validate_pixel_values(pixel_values, self.backbone.patch_size)
        bank = self.check_bank(reference_bank) if reference_bank is not None else self.build_reference_bank()
        pixel_values = pixel_values.to(self.device, self.dtype)
        text = bank.tensors["text_embeddings"]

        image_embeddings, patch_tokens, windows = self._encode(pixel_values)
        grid = (pixel_values.shape[-2] // self.backbone.patch_size, pixel_values.shape[-1] // self.backbone.patch_size)
        masks = [window_masks(grid, scale).to(pixel_values.device) for scale in self.config.window_scales]

        zero_shot_scores = class_scores(image_embeddings, text, self.config.temperature)
        window_scores = [class_scores(window, text, self.config.temperature) for window in windows]
        patch_map = winclip_zero_shot_map(zero_shot_scores, window_scores, masks)
        image_scores = zero_shot_scores
        branch_scores = {"zero_shot": zero_shot_scores}

        if bank.k > 0:
            few_shot_map = winclip_few_shot_map(
                patch_tokens,
                bank.tensors["patch_tokens"],
                windows,
                [bank.tensors[f"window_embeddings.{scale}"] for scale in self.config.window_scales],
                masks,
            )
            branch_scores["few_shot"] = few_shot_map.amax(dim=-1)
            patch_map, image_scores = fuse_zero_few_shot(patch_map, zero_shot_scores, few_shot_map)

        anomaly_maps = upsample_maps(patch_map.reshape(-1, *grid), tuple(pixel_values.shape[-2:]))
        output = AnomalyDetectionOutput(image_scores=image_scores, anomaly_maps=anomaly_maps, branch_scores=branch_scores)
        return output if return_dict else output.to_tuple()
