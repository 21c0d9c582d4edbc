"""Anomalous-memory configuration."""

from __future__ import annotations

from dataclasses import field

from ...scoring import WEIGHT_DISTRIBUTIONS
from ..winclip.configuration_winclip import WinClipConfig


class AnomalousMemoryConfig(WinClipConfig):
    """Config of `AnomalousMemoryModel`: WinCLIP+ plus a memory of defects from anomalous references.

    Args:
        window_scales: window sides in patches; default [2, 3, 7] (32, 48 and 112 px at patch 16), which with
            the 16 px patch level gives the paper's four scales.
        num_weight_samples: Monte-Carlo weight vectors drawn in `validate_weights` (100, the paper's).
        weight_distribution: "uniform" (default; the paper finds normal and Student-t overfit), "normal" or
            "student_t" (absolute values, each vector normalised to sum 1).
        num_validation_views: augmented views per validation sample (5 each from the normal and the
            anomalous sample gives the paper's ~10 images).
        weight_seed: seed of the weight draw and of the augmentations.
        inherited: see `WinClipConfig`.

    Scores (9 with the default scales): [text zero-shot, reference memory per level, anomalous memory per
    level], each level's score being the maximum over patches of its map. Image score = weights . scores;
    the weights default to the paper's baseline (three groups averaged) until `validate_weights` picks
    others. Anomaly maps use the same weights on the per-level maps (text: WinCLIP's zero-shot map); the
    paper evaluates image scores only.
    """

    model_type = "anomalous_memory"
    paper = 'Abdali et al., "Anomalous Samples for Few-Shot Anomaly Detection"'

    window_scales: list[int] = field(default_factory=lambda: [2, 3, 7])
    num_weight_samples: int = 100
    weight_distribution: str = "uniform"
    num_validation_views: int = 5
    weight_seed: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.weight_distribution not in WEIGHT_DISTRIBUTIONS:
            raise ValueError(
                f"weight_distribution must be one of {WEIGHT_DISTRIBUTIONS}, got {self.weight_distribution!r}."
            )
        if self.num_weight_samples < 1 or self.num_validation_views < 1:
            raise ValueError("num_weight_samples and num_validation_views must be at least 1.")

    @property
    def num_levels(self) -> int:
        """The patch level plus one level per window scale."""
        return 1 + len(self.window_scales)
