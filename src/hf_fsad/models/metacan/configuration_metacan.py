"""MetaCAN configuration."""

from __future__ import annotations

from dataclasses import field

from ...configuration_base import FsadConfig

DETECTOR_TYPES = ("official", "paper")


class MetaCanConfig(FsadConfig):
    """Config of `MetaCanModel` (Lv et al., "MetaCAN: Improving Generalizability of Few-shot Anomaly
    Detection with Meta-learning", CIKM 2025): a frozen CLIP, an image-image anomaly discriminator on a
    feature pyramid and a trained image-text anomaly detector.

    Architecture: where the paper and the official code (anony-mous-rep/MetaCAN) differ, the defaults below are
    the official code's, which made the paper's tables. Training is not: `MetaCanTrainingArguments` defaults
    to the paper's Algorithm 1 (`recipe="paper"`: all tasks' losses, one Adam, BatchNorm statistics
    tracked); `recipe="official"` trains as the official code did.

    Args:
        feature_layers: 1-based vision blocks of the feature pyramid (low, middle, high); [1, 7, 12] for
            ViT-B-16-plus-240. The last one feeds the feature differentiator (Eq. 5).
        differentiator_hidden_size: width of W1 in Eq. 5 (1024); W2 maps to the joint embedding size.
        differentiator_bias: bias in W1/W2 (False: the paper writes plain matrices, the official code has
            no bias either).
        differentiator_output_relu: a ReLU after W2 (True, default: the official code, W1 -> ReLU -> W2 ->
            ReLU). False gives W1 -> ReLU -> W2, the paper's "multi-layer perceptron" of Eq. 5 with nothing
            after W2; the output ReLU keeps D in the positive orthant before Eq. 6's cosine with the text.
        text_logit_scale: the factor on the cosines in Eq. 6's softmax. 100 (default) is CLIP's logit scale,
            as the official code uses; the paper's Eq. 6 read literally is 1.
        detector_type: the detector of Eq. 7 on the image-text map m_IT (P values, one per patch), then a
            sigmoid. "official" (default): Linear(P, 2P) -> ReLU -> BatchNorm -> Linear(2P, P) -> ReLU ->
            BatchNorm -> Linear(P, 1), every Linear with a bias (the official code). "paper": Eq. 7 as written,
            two matrices without bias, activation or normalisation: W3 (P -> 2P), W4 (2P -> 1); the paper
            does not give W3's width, 2P is the official first layer's.
        detector_hidden_sizes: the hidden widths instead of the defaults above ([2P, P] official, [2P]
            paper; "paper" takes exactly one). Each official hidden layer is Linear -> ReLU -> BatchNorm.
        prompt_object: the class word of the object-agnostic prompt ensemble (Table 5: always "object"; the
            class name given to `build_reference_bank` only labels the bank).
        use_discriminator, use_detector: Table 4's ablations. Without the detector (Eqs. 5-7) the score is
            s_II / L; without the discriminator (Eqs. 1-4) it is s_IT; with both, Eq. 8: (s_II + s_IT)/(L + 1),
            the paper's divisor 4 for L = 3 levels.
        inherited: see `FsadConfig`. `max_memory_items` does not apply: Eqs. 1-2 average each patch's k nearest
            of all k*N reference patches, so the bank keeps them all (exact search, chunked).
            `paper_preprocessing` is "crop": the official code resizes the short side to 240 and centre-crops.

    BatchNorm ("official"): in training mode it normalises with the batch's statistics, in eval mode with its
    running statistics (PyTorch's BatchNorm1d, momentum 0.1). AD meta-learning (`recipe="paper"`) updates the
    running statistics only in the forwards of the outer objective (the query sets), never in the inner step,
    and saves them with the weights; models from `from_pretrained`/`from_clip` are in eval mode, so a query's
    score does not depend on its batch. The official code instead normalises with batch statistics in
    training and never updates the running statistics, so its evaluation uses mean 0, variance 1
    (`recipe="official"` does the same).
    """

    model_type = "metacan"
    paper = 'Lv et al., "MetaCAN: Improving Generalizability of Few-shot Anomaly Detection with Meta-learning", CIKM 2025'

    feature_layers: list[int] = field(default_factory=lambda: [1, 7, 12])
    differentiator_hidden_size: int = 1024
    differentiator_bias: bool = False
    differentiator_output_relu: bool = True
    text_logit_scale: float = 100.0
    detector_type: str = "official"
    detector_hidden_sizes: list[int] | None = None
    prompt_object: str = "object"
    use_discriminator: bool = True
    use_detector: bool = True
    paper_preprocessing: str = "crop"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.feature_layers = self.checked_feature_layers(self.feature_layers)
        if not self.feature_layers:
            raise ValueError("feature_layers must name at least one vision block.")
        if not (self.use_discriminator or self.use_detector):
            raise ValueError("use_discriminator and use_detector cannot both be False: nothing would score.")
        if self.text_logit_scale <= 0:
            raise ValueError(f"text_logit_scale must be positive, got {self.text_logit_scale}.")
        if self.detector_type not in DETECTOR_TYPES:
            raise ValueError(f"detector_type must be one of {DETECTOR_TYPES}, got {self.detector_type!r}.")
        if self.detector_hidden_sizes is not None:
            self.detector_hidden_sizes = [int(width) for width in self.detector_hidden_sizes]
        widths = self.detector_widths
        if self.detector_type == "paper" and len(widths) != 1:
            raise ValueError(
                f"The paper's detector (Eq. 7) is two matrices: give one hidden width, got {widths}."
            )
        if self.differentiator_hidden_size < 1 or any(width < 1 for width in widths):
            raise ValueError("Layer widths must be positive.")

    @property
    def num_levels(self) -> int:
        return len(self.feature_layers)

    @property
    def num_patches(self) -> int:
        """Length of the image-text map (the detector's input): the patch grid of a `image_size` input."""
        return (self.image_size // self.clip_config.vision_config.patch_size) ** 2

    @property
    def detector_widths(self) -> list[int]:
        """The detector's hidden widths: `detector_hidden_sizes`, or the default of `detector_type`."""
        if self.detector_hidden_sizes is not None:
            return self.detector_hidden_sizes
        patches = self.num_patches
        return [2 * patches, patches] if self.detector_type == "official" else [2 * patches]
