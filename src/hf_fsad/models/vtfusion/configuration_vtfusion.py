"""VTFusion configuration."""

from __future__ import annotations

from ...configuration_base import FsadConfig
from .functional_vtfusion import DISTANCES


class VtFusionConfig(FsadConfig):
    """Config of `VtFusionModel`, a detector fitted per category on k normal images (Jiang et al.,
    "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection").

    Args:
        feature_layers: 1-based vision blocks whose patch tokens form the levels; default: the ends of four
            equal groups of blocks ([3, 6, 9, 12] on ViT-B-16-plus-240), as VAND's linear layers use (fewer on
            backbones of under four blocks).
        use_feature_adaptor: AIE (Sec. III-C): a trainable 3x3 conv per level after the linear layer, trained
            with the NFC and AFS losses. False is the "w/o AIE" ablation (Table II): linear layers only and
            no contrastive losses.
        use_text_adapter: ATE: a trainable MLP on the text features. False: CLIP's text features as they are.
        use_fusion: MPF (Sec. III-D): fusion block + segmentation network. False: M_f = upsampled M_v + M_t
            (the concatenation-free sum the paper compares against).
        radius, margin: r and alpha of Eqs. 3-4 (1e-5 and 0.1).
        distance: D of Eqs. 2-5. "squared_euclidean" (default, ours): the squared distance between the
            stacked features, each level L2-normalised, so D lies in [0, 4 L] and D between a synthetic
            defect and its nearest prototype is mostly far above Eq. 4's margin (r + alpha)^2 = 0.01: L_AFS
            is then nearly always 0 (docs/faithfulness.md, "Training recipes and settings", has the
            measurement). "mean_squared": that distance divided by the stacked width c x L (the mean squared
            difference per channel), a scale at which Eq. 4's hinge acts on most defect locations (at 4
            levels of 640 it is under the margin everywhere). The paper states neither D's form nor whether
            the features are normalised, so neither is "the paper's".
        segmentation_weight: lambda of Eq. 10 (1).
        text_logit_scale: scale of Eq. 6's cosines before the softmax (100, CLIP's and VAND's).
        fusion_channels: channels of the self-attention embeddings and the residual block of Eq. 7.
        segmentation_channels, segmentation_levels: width and pyramid depth of the FPN-like network of Eq. 9.
        text_adapter_hidden_size: hidden width of the ATE MLP (default: the projection width).
        fitted_class_name, num_fitted_normals: set by `fit` (the object word of the prompts, and k); a model
            with num_fitted_normals = 0 has no prototypes yet.

    Choices where the paper says nothing (no public code):
    - D is the squared Euclidean distance (Eqs. 3-4 compare it with squared radii) between features whose
      every level is L2-normalised, the same features Eq. 6 compares with the text.
    - The linear layer of each level is CLIP's visual projection (after CLIP's post-layernorm) plus a
      trainable correction initialised at zero, which trains exactly like a linear layer initialised from
      the projection; the adaptor conv starts as the identity (Dirac) and the ATE is a residual MLP whose
      output layer starts at zero. So an unfitted model scores with CLIP's own features, and fitting refines.
    - Prototypes (Eq. 1) are computed once from the k normals at the start of fitting and stay frozen (the
      paper's "frozen anchors"); AFS pushes only the synthetic defects' locations; L_SEG covers the normal
      and the anomalous images.
    - A patch is a defect location for AFS when more than `anomalous_patch_fraction` of its pixels changed;
      default 0, any changed pixel: the synthetic masks are exact, so a changed pixel is a real change of the
      patch, and a 1-4 px crack covers at most a quarter of a 16 px patch (a 25 % rule let cracks almost
      never train AFS).
    - SAM is spatial self-attention (SAGAN style: 1x1 conv queries/keys/values over the locations, softmax
      attention); G is conv-BN-ReLU-conv-BN with a 1x1 skip, then a 1x1 conv to the one-channel M_vt. The
      segmentation network ends with a sigmoid, so M_f and the image score max(M_f) lie in [0, 1].
    - The bank's prototypes are one per location whatever k, so `max_memory_items` does not apply.
    """

    model_type = "vtfusion"
    paper = 'Jiang, Cao, Cheng, Zhang and Shen, "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection"'

    feature_layers: list[int] | None = None
    use_feature_adaptor: bool = True
    use_text_adapter: bool = True
    use_fusion: bool = True
    radius: float = 1e-5
    margin: float = 0.1
    distance: str = "squared_euclidean"
    segmentation_weight: float = 1.0
    text_logit_scale: float = 100.0
    anomalous_patch_fraction: float = 0.0
    fusion_channels: int = 16
    segmentation_channels: int = 32
    segmentation_levels: int = 3
    text_adapter_hidden_size: int | None = None
    fitted_class_name: str | None = None
    num_fitted_normals: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.feature_layers is None:
            self.feature_layers = sorted(set(self.quarter_blocks()))
        self.feature_layers = self.checked_feature_layers(self.feature_layers)
        if len(set(self.feature_layers)) != len(self.feature_layers):
            raise ValueError(f"feature_layers must be distinct, got {self.feature_layers}.")
        if self.text_adapter_hidden_size is None:
            self.text_adapter_hidden_size = self.clip_config.projection_dim
        if self.radius < 0 or self.margin < 0 or self.segmentation_weight < 0:
            raise ValueError("radius, margin and segmentation_weight must be non-negative.")
        if self.distance not in DISTANCES:
            raise ValueError(f"distance must be one of {DISTANCES}, got {self.distance!r}.")
        if not 0 <= self.anomalous_patch_fraction < 1:
            raise ValueError(
                f"anomalous_patch_fraction must be in [0, 1), got {self.anomalous_patch_fraction}."
            )
        if min(self.fusion_channels, self.segmentation_channels, self.segmentation_levels) < 1:
            raise ValueError("fusion_channels, segmentation_channels and segmentation_levels must be >= 1.")
