"""Anomalous memory: WinCLIP+ that also learns from defective samples (Abdali et al.,
"Anomalous Samples for Few-Shot Anomaly Detection")."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image

from ...augmentation import augment_views
from ...bank import ReferenceBank
from ...modeling_outputs import AnomalyDetectionOutput
from ...scoring import harmonic_aggregation, level_image_scores, reference_association
from ..winclip.modeling_winclip import WinClipModel
from .configuration_anomalous_memory import AnomalousMemoryConfig
from .functional_anomalous_memory import (
    anomalous_association,
    anomalous_items,
    baseline_score_weights,
    patch_defect_shares,
    sample_score_weights,
    select_score_weights,
    unit_l1_weights,
    window_defect_shares,
)


class AnomalousMemoryModel(WinClipModel):
    """Nine scores per image — text zero-shot, distance to the normal memory and similarity to the anomalous
    memory at four scales (16 px patches, 32/48/112 px windows) — combined with a weight vector stored in
    the bank (the paper's baseline, or the best of a Monte-Carlo draw on augmented samples).

    The anomalous memory holds the items (patches, windows) of anomalous references that are mostly defect
    (`config.anomalous_item_fraction`); their defect-free items join the normal memory, so one annotated
    defective image gives both memories.
    An anomalous reference given without a mask puts all its items in the anomalous memory (a trade-off:
    its normal parts then look like defects, so normal references are needed beside it).
    """

    config_class = AnomalousMemoryConfig
    memory_prefixes = ("reference.", "anomalous.")
    needs_anomalous_references = True
    validates_weights = True
    validated_tensors = ("score_weights", "validation_auroc")

    def level_names(self) -> list[str]:
        return ["patch", *(f"window{scale}" for scale in self.config.window_scales)]

    def score_names(self) -> list[str]:
        levels = self.level_names()
        return ["text", *(f"reference.{name}" for name in levels), *(f"anomalous.{name}" for name in levels)]

    def _level_items(self, features: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Per level (B, items, dim): patch tokens, then the window embeddings of each scale."""
        return [
            features["patch_tokens"],
            *(features[f"window_embeddings.{s}"] for s in self.config.window_scales),
        ]

    def _item_defect_shares(self, masks: torch.Tensor, count: int) -> list[torch.Tensor]:
        """Per level (A, items) float64: the share of each item of each anomalous reference that is defect."""
        size = self.config.image_size
        if masks.ndim != 3 or tuple(masks.shape) != (count, size, size):
            raise ValueError(
                f"anomalous_masks must have shape ({count}, {size}, {size}) (one mask per anomalous reference, at "
                f"config.image_size), got {tuple(masks.shape)}."
            )
        empty = [index for index, mask in enumerate(masks) if not mask.any()]
        if empty:
            raise ValueError(
                f"The masks of anomalous references {empty} mark no anomalous pixel; pass anomalous_masks=None "
                "for references without pixel labels."
            )
        patches = patch_defect_shares(masks.to(self.device) != 0, self.backbone.patch_size)
        windows = self.window_mask_list(self.device)
        return [patches, *(window_defect_shares(patches, window_masks) for window_masks in windows)]

    def available_score_flags(self, bank_tensors: dict[str, torch.Tensor]) -> list[bool]:
        """Per `score_names()`: False where the bank's memory at that level is empty. Read from shapes alone,
        so an exported graph (`hf_fsad.export`) can use it."""
        return [True, *(bank_tensors[name].shape[0] > 0 for name in self.score_names()[1:])]

    def available_scores(self, bank_tensors: dict[str, torch.Tensor]) -> torch.Tensor:
        """(1 + 2L,) bool tensor of `available_score_flags`."""
        return torch.tensor(self.available_score_flags(bank_tensors))

    @torch.no_grad()
    def build_reference_bank(
        self,
        reference_pixel_values: torch.Tensor | None = None,
        class_name: str | None = None,
        reference_features: dict[str, torch.Tensor] | None = None,
        anomalous_pixel_values: torch.Tensor | None = None,
        anomalous_masks: torch.Tensor | None = None,
        anomalous_features: dict[str, torch.Tensor] | None = None,
    ) -> ReferenceBank:
        """Bank with the normal memory (normal references + the defect-free items of anomalous ones), the
        anomalous memory (the items that are mostly defect, see the config) and the baseline score weights
        (over the levels whose memories are not empty).

        anomalous_masks: (A, S, S) with S = config.image_size, non-zero = defect; None = no pixel labels.
        Features from `encode_images` may stand in for either set of images.
        """
        normal = self.features_of(reference_pixel_values, reference_features, "reference_pixel_values")
        anomalous = self.features_of(anomalous_pixel_values, anomalous_features, "anomalous_pixel_values")
        if anomalous is None:
            raise ValueError(
                "The anomalous memory needs at least one anomalous reference (anomalous_pixel_values); "
                "with normal references only, use WinClipModel."
            )
        count = anomalous["patch_tokens"].shape[0]
        shares = None if anomalous_masks is None else self._item_defect_shares(anomalous_masks, count)
        class_name = class_name or self.config.default_class_name
        tensors = {"text_embeddings": self.text_embeddings(class_name)}
        normal_items = self._level_items(normal) if normal is not None else [None] * self.config.num_levels
        for level, (name, items, normal_level) in enumerate(
            zip(self.level_names(), self._level_items(anomalous), normal_items)
        ):
            if shares is None:
                in_anomalous = torch.ones(items.shape[:2], dtype=torch.bool, device=items.device)
                defect_free = ~in_anomalous
            else:
                level_shares = shares[level].to(items.device)
                in_anomalous = anomalous_items(level_shares, self.config.anomalous_item_fraction)
                defect_free = level_shares == 0
            parts = [items[defect_free]] + ([normal_level.flatten(0, 1)] if normal_level is not None else [])
            tensors[f"reference.{name}"] = torch.cat(parts)
            tensors[f"anomalous.{name}"] = items[in_anomalous]
        if all(tensors[f"reference.{name}"].shape[0] == 0 for name in self.level_names()):
            raise ValueError(
                "The normal memory is empty at every level: give normal references, or anomalous masks that "
                "leave defect-free patches."
            )
        tensors["score_weights"] = baseline_score_weights(
            self.config.num_levels, self.available_scores(tensors)
        )
        k = normal["patch_tokens"].shape[0] if normal is not None else 0
        tensors["num_anomalous"] = torch.tensor(count)
        return self.bank_from_tensors(class_name, k, tensors)

    def _scores_and_maps(
        self, features: dict[str, torch.Tensor], bank: ReferenceBank
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Every score (B, S) and patch map (S, B, P) in `score_names()` order, and which are available (S,):
        a level whose memory is empty gets zeros there (weighted 0)."""
        text = bank.tensors["text_embeddings"]
        windows = self.window_mask_list(text.device)
        zero_shot, text_map = self.zero_shot_branch(features, text, windows)
        available = self.available_scores(bank.tensors)
        maps = [text_map]
        for memory, association in (
            ("reference", reference_association),
            ("anomalous", anomalous_association),
        ):
            for level, (name, items) in enumerate(zip(self.level_names(), self._level_items(features))):
                stored = bank.tensors[f"{memory}.{name}"]
                if stored.shape[0] == 0:
                    maps.append(torch.zeros_like(text_map))
                    continue
                scores = association(items, stored)
                maps.append(scores if level == 0 else harmonic_aggregation(scores, windows[level - 1]))
        scores = torch.cat([zero_shot[:, None], level_image_scores(maps[1:])], dim=-1)
        return scores, torch.stack(maps), available

    @torch.no_grad()
    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        bank = self.required_bank(
            reference_bank,
            "with an anomalous reference: model.build_reference_bank(anomalous_pixel_values=..., anomalous_masks=...).",
        )
        scores, maps, _ = self._scores_and_maps(features, bank)
        available = self.available_score_flags(bank.tensors)
        weights = bank.tensors["score_weights"].to(scores)
        names = self.score_names()
        return AnomalyDetectionOutput(
            image_scores=scores @ weights,
            anomaly_maps=self.to_pixel_maps(torch.einsum("s,sbp->bp", weights, maps)),
            branch_scores={name: scores[:, index] for index, name in enumerate(names) if available[index]},
        )

    def score_vectors(self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank) -> torch.Tensor:
        """Every score (B, 1 + 2L) of `encode_images` features in `score_names()` order, before weighting: the
        vectors `validate_weights` weighs (a level whose memory is empty scores 0)."""
        scores, _, _ = self._scores_and_maps(features, self.checked_bank(reference_bank))
        return scores

    def chosen_weights(
        self,
        reference_bank: ReferenceBank,
        validation_scores: torch.Tensor | Sequence[torch.Tensor],
        validation_labels: Sequence[int],
        tile_rule: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """`score_weights` and its `validation_auroc`: the Monte-Carlo weight vector that ranks the validation
        images best. Draws `config.num_weight_samples` vectors from `config.weight_distribution` (seed
        `config.weight_seed`; signed unless `config.signed_weights` is False), zeroes the weights of scores
        whose memory in `reference_bank` is empty, rescales each to unit L1 norm, and keeps the first with the
        best validation AUROC. validation_scores: (V, S) `score_vectors` of the images, or per image its tiles'
        (T_v, S), an image's weighted score then the `tile_rule` ("max" or "mean") over its tiles'."""
        labels = torch.as_tensor(list(validation_labels))
        if labels.numel() != len(validation_scores):
            raise ValueError(f"{labels.numel()} validation labels for {len(validation_scores)} images.")
        generator = torch.Generator().manual_seed(self.config.weight_seed)
        candidates = sample_score_weights(
            self.config.num_weight_samples,
            len(self.score_names()),
            self.config.weight_distribution,
            generator,
            signed=self.config.signed_weights,
        )
        available = self.available_scores(reference_bank.tensors)
        if not available.all():
            candidates = unit_l1_weights(candidates, available)
        if tile_rule is None:
            weights, auroc = select_score_weights(validation_scores.cpu(), labels, candidates)
        else:
            tiles = [scores.cpu() for scores in validation_scores]
            weights, auroc = select_score_weights(tiles, labels, candidates, tile_rule)
        return {"score_weights": weights, "validation_auroc": torch.tensor(auroc, dtype=torch.float64)}

    @torch.no_grad()
    def validate_weights(
        self,
        reference_bank: ReferenceBank,
        validation_pixel_values: torch.Tensor,
        validation_labels: Sequence[int],
    ) -> ReferenceBank:
        """The bank with the Monte-Carlo weight vector that ranks the validation images best (`chosen_weights`
        of their `score_vectors`); the bank then also holds `validation_auroc`."""
        bank = self.checked_bank(reference_bank)
        features = self.encode_images(validation_pixel_values, "validation_pixel_values")
        chosen = self.chosen_weights(bank, self.score_vectors(features, bank), validation_labels)
        return ReferenceBank(
            bank.model_type, bank.config_hash, bank.class_name, bank.k, bank.tensors | chosen
        )

    def validation_views(
        self, normal_images: Sequence[Image.Image], anomalous_images: Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[int]]:
        """Augmented views (`config.num_validation_views` per image, seeded, at the image's size) of normal and
        anomalous samples with their labels: the paper's validation set."""
        views, labels = [], []
        for label, images in ((0, normal_images), (1, anomalous_images)):
            for index, image in enumerate(images):
                seed = self.config.weight_seed * 1000 + 2 * index + label
                augmented = augment_views(image, self.config.num_validation_views, seed)
                views += augmented
                labels += [label] * len(augmented)
        if not views or len(set(labels)) < 2:
            raise ValueError("Weight validation needs at least one normal and one anomalous image.")
        return views, labels
