"""Anomalous-memory configuration."""

from __future__ import annotations

from dataclasses import field

from ..winclip.configuration_winclip import WinClipConfig

# Distributions `functional_anomalous_memory.sample_score_weights` draws candidate weights from.
WEIGHT_DISTRIBUTIONS = ("uniform", "normal", "student_t")


class AnomalousMemoryConfig(WinClipConfig):
    """Config of `AnomalousMemoryModel`: WinCLIP+ plus a memory of defects from anomalous references.

    Args:
        window_scales: window sides in patches; default [2, 3, 7] (32, 48 and 112 px at patch 16), which with
            the 16 px patch level gives the paper's four scales.
        anomalous_item_fraction: an item (patch or window) of an annotated anomalous reference joins the
            anomalous memory when at least this share of its pixels is defect; default 0.5. The paper's memory
            "stores visual encodings of the anomalous regions from anomalous samples" (Sec. 3), while "a single
            anomalous sample provides both normal and anomalous regions" (Sec. 1): a window that only touches
            the defect encodes mostly normal surface, so it takes a majority of defect pixels to be an
            encoding of the defect. Where no item of a reference reaches the fraction (a defect smaller than
            the item), the items with its largest share join (those holding most of the defect), so every
            defect is remembered at every scale, as the paper's per-scale tables need. Items free of defect
            join the normal memory; items partly defect but below the fraction join neither.
        num_weight_samples: Monte-Carlo weight vectors drawn in `validate_weights` (100, the paper's).
        weight_distribution: "uniform" (default; the paper finds normal and Student-t overfit), "normal" or
            "student_t"; each vector is scaled to unit L1 norm.
        signed_weights: True (default): normal and Student-t draws keep their sign, as Table 4 implies (their
            64.4 vs 82.0 AUROC on VisA is the cost of negative weights); False: their absolute values.
        num_validation_views: augmented views per validation sample (5 each from the normal and the
            anomalous sample gives the paper's ~10 images).
        weight_seed: seed of the weight draw and of the augmentations.
        inherited: see `WinClipConfig`.

    Scores (9 with the default scales): [text zero-shot, reference memory per level, anomalous memory per
    level], each level's score being the maximum over patches of its map. Image score = weights . scores;
    the weights default to the paper's baseline (three groups averaged) until `validate_weights` picks
    others. Anomaly maps use the same weights on the per-level maps (text: WinCLIP's zero-shot map); the
    paper evaluates image scores only.

    A memory left empty at one level (a large defect in the only, anomalous, reference: every 112 px window
    touches it, so no window is defect-free) has no score there: the score is absent from `branch_scores`,
    its weight is 0 and the others are renormalised (the baseline spreads each group's third over its
    available levels; validated weights are drawn as usual and rescaled to unit L1 norm without it). A
    normal memory empty at every level is an error (no normal surface to compare with).
    """

    model_type = "anomalous_memory"
    paper = 'Abdali et al., "Anomalous Samples for Few-Shot Anomaly Detection"'

    window_scales: list[int] = field(default_factory=lambda: [2, 3, 7])
    anomalous_item_fraction: float = 0.5
    num_weight_samples: int = 100
    weight_distribution: str = "uniform"
    signed_weights: bool = True
    num_validation_views: int = 5
    weight_seed: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.weight_distribution not in WEIGHT_DISTRIBUTIONS:
            raise ValueError(
                f"weight_distribution must be one of {WEIGHT_DISTRIBUTIONS}, got {self.weight_distribution!r}."
            )
        if not 0 < self.anomalous_item_fraction <= 1:
            raise ValueError(
                f"anomalous_item_fraction must be in (0, 1], got {self.anomalous_item_fraction}."
            )
        if self.num_weight_samples < 1 or self.num_validation_views < 1:
            raise ValueError("num_weight_samples and num_validation_views must be at least 1.")

    @property
    def num_levels(self) -> int:
        """The patch level plus one level per window scale."""
        return 1 + len(self.window_scales)
