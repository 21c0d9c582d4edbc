"""MetaCAN configuration."""

from __future__ import annotations

from dataclasses import field

from ...configuration_base import FsadConfig


class MetaCanConfig(FsadConfig):
    """Config of `MetaCanModel` (papers/metacan.txt): a frozen CLIP, an image-image anomaly discriminator on a
    feature pyramid and a trained image-text anomaly detector.

    Args:
        feature_layers: 1-based vision blocks of the feature pyramid (low, middle, high); [1, 7, 12] for
            ViT-B-16-plus-240. The last one feeds the feature differentiator (Eq. 5).
        differentiator_hidden_size: width of W1 in Eq. 5 (1024); W2 maps to the joint embedding size.
        differentiator_bias: bias in W1/W2 (False: the paper writes plain matrices, the reference code has
            no bias either).
        differentiator_output_relu: a ReLU after W2 as in the reference code (False, default: Eq. 5 has none,
            and a ReLU would confine D to the positive orthant before the cosine with the text).
        text_logit_scale: the factor on the cosines in Eq. 6's softmax. 100 (default) is CLIP's logit scale,
            as the reference code uses; the paper's Eq. 6 read literally is 1.
        detector_hidden_sizes: hidden widths of the detector MLP of Eq. 7 on the patch-count-sized map.
            [450] (default) is the paper's two matrices W3 (P -> 450) and W4 (450 -> 1); the reference code's
            deeper variant is [450, 225]. Each hidden layer is Linear -> ReLU -> LayerNorm.
        prompt_object: the class word of the object-agnostic prompt ensemble (Table 5: always "object"; the
            class name given to `build_reference_bank` only labels the bank).
        use_discriminator, use_detector: Table 4's ablations. Without the detector (Eqs. 5-7) the score is
            s_II / L; without the discriminator (Eqs. 1-4) it is s_IT; with both, Eq. 8: (s_II + s_IT)/(L + 1),
            the paper's divisor 4 for L = 3 levels.
        inherited: see `FsadConfig`. `max_memory_items` does not apply: Eqs. 1-2 average each patch's k nearest
            of all k*N reference patches, so the bank keeps them all (exact search, chunked).

    Normalisation: the reference code's BatchNorm uses batch statistics in meta-training and never-updated
    running statistics at test time; LayerNorm here makes training and inference compute the same function.
    """

    model_type = "metacan"
    paper = 'Lv et al., "MetaCAN: Improving Generalizability of Few-shot Anomaly Detection with Meta-learning", CIKM 2025'

    feature_layers: list[int] = field(default_factory=lambda: [1, 7, 12])
    differentiator_hidden_size: int = 1024
    differentiator_bias: bool = False
    differentiator_output_relu: bool = False
    text_logit_scale: float = 100.0
    detector_hidden_sizes: list[int] = field(default_factory=lambda: [450])
    prompt_object: str = "object"
    use_discriminator: bool = True
    use_detector: bool = True

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.feature_layers = self.checked_feature_layers(self.feature_layers)
        self.detector_hidden_sizes = [int(width) for width in self.detector_hidden_sizes]
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one vision block.")
        if not (self.use_discriminator or self.use_detector):
            raise ValueError("use_discriminator and use_detector cannot both be False: nothing would score.")
        if self.text_logit_scale <= 0:
            raise ValueError(f"text_logit_scale must be positive, got {self.text_logit_scale}.")
        if self.differentiator_hidden_size < 1 or any(width < 1 for width in self.detector_hidden_sizes):
            raise ValueError("Layer widths must be positive.")

    @property
    def num_levels(self) -> int:
        return len(self.feature_layers)

    @property
    def num_patches(self) -> int:
        """Length of the image-text map (the detector's input): the patch grid of a `image_size` input."""
        return (self.image_size // self.clip_config.vision_config.patch_size) ** 2
