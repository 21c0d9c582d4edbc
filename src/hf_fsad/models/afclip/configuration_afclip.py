"""AF-CLIP / AF-CLIP+ configuration."""

from __future__ import annotations

from dataclasses import field

from ...configuration_base import FsadConfig

ADAPTER_TYPES = ("attention", "lora", "none")
PROMPT_PLACEMENTS = ("after_start", "before_start")


class AfClipConfig(FsadConfig):
    """Config of `AfClipModel` ("AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP Adaptation",
    ACM MM 2025): zero-shot AF-CLIP, and AF-CLIP+ when the bank holds normal references.

    Args:
        feature_layers: 1-based vision blocks whose raw tokens are used; default: the ends of four equal
            groups of blocks, the paper's four hierarchical blocks ([6, 12, 18, 24] on ViT-L/14@336).
        aggregation_windows, aggregation_sigma: Eq. 5's windows r (1, 3, 5; stride 1, zero padding) and the
            Gaussian's std (4 patches). Layers x windows = the token sets (12 by default).
        adapter_type: "attention" (Eqs. 3-4: LayerNorm then multi-head self-attention, no residual, one
            module shared by all token sets), "lora" (the paper's Table 5.3 variant: LoRA on the vision tower
            through PEFT instead of the adapter) or "none" (neither: CLIP's features as they are, e.g. after
            `merge_lora()`).
        adapter_num_heads, adapter_head_dim: 8 heads of 64 (q/k/v without bias, output projection with bias).
        lora_rank, lora_alpha, lora_target_modules: LoRA on these attention projections of the last layer of
            each of the four blocks (the `feature_layers`); rank 64, alpha = rank (scale 1).
        num_context_tokens, context_init_std: Eq. 8's learnable word embeddings (12, initialised N(0, 0.01)),
            shared by both state prompts.
        context_placement: "before_start" (default: where the official code puts them, before the start
            token, and where its released prompts were trained) or "after_start" (right after the start token,
            a literal reading of the paper's "prefix" of the state words).
        state_prompts: the fixed (normal, anomalous) state suffixes.
        temperature: of Eq. 9's cosine logits (0.07).
        map_smoothing_sigma: Gaussian std in pixels of the upsampled maps (4; 0 disables), borders in scipy's
            default "reflect" mode as the official code's `gaussian_filter`.
        memory_weight: AF-CLIP+ fusion (Eq. 18): score = memory + memory_weight x zero-shot, for both the
            image score and the map (0.1).
        position_interpolation: "bilinear" by default here: the official code resizes the 24x24 position grid
            of ViT-L/14@336 to 37x37 bilinearly, and its released weights were trained on those tokens
            ("bicubic", transformers' resize, is the option).
        image_size: the model input's side, which `from_clip`, `image_processor()`, training and the
            position-embedding grid (resized with `position_interpolation`) all use. None (default): the
            tower's own (336 for ViT-L/14@336). The paper and the official code run 518 (37x37 patches): set
            `image_size=518` for the paper's setting, as training/configs/afclip*.yaml and
            `hf-fsad convert --afclip-official` do.
        inherited: see `FsadConfig`. paper_preprocessing is "squash": the official code resizes whole images
            (and masks) to 518x518.
    """

    model_type = "afclip"
    paper = '"AF-CLIP: Zero-Shot Anomaly Detection via Anomaly-Focused CLIP Adaptation"'

    feature_layers: list[int] | None = None
    aggregation_windows: list[int] = field(default_factory=lambda: [1, 3, 5])
    aggregation_sigma: float = 4.0
    adapter_type: str = "attention"
    adapter_num_heads: int = 8
    adapter_head_dim: int = 64
    lora_rank: int = 64
    lora_alpha: float = 64.0
    lora_target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "out_proj"])
    num_context_tokens: int = 12
    context_init_std: float = 0.01
    context_placement: str = "before_start"
    state_prompts: list[str] = field(default_factory=lambda: ["without defect.", "with defect."])
    temperature: float = 0.07
    map_smoothing_sigma: float = 4.0
    memory_weight: float = 0.1
    position_interpolation: str = "bilinear"
    paper_preprocessing: str = "squash"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.feature_layers is None:
            self.feature_layers = self.quarter_blocks()
        self.feature_layers = self.checked_feature_layers(self.feature_layers)
        self.aggregation_windows = [int(window) for window in self.aggregation_windows]
        for window in self.aggregation_windows:
            if window < 1 or window % 2 == 0:
                raise ValueError(f"aggregation windows must be odd and positive, got {window}.")
        if self.adapter_type not in ADAPTER_TYPES:
            raise ValueError(f"adapter_type must be one of {ADAPTER_TYPES}, got {self.adapter_type!r}.")
        if self.context_placement not in PROMPT_PLACEMENTS:
            raise ValueError(
                f"context_placement must be one of {PROMPT_PLACEMENTS}, got {self.context_placement!r}."
            )
        if len(self.state_prompts) != 2:
            raise ValueError("state_prompts must hold two texts: the normal and the anomalous state.")
        if self.temperature <= 0 or self.aggregation_sigma <= 0:
            raise ValueError("temperature and aggregation_sigma must be positive.")
