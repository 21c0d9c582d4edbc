"""WinCLIP / WinCLIP+ configuration."""

from __future__ import annotations

from dataclasses import field

from ...configuration_base import FsadConfig
from ...prompts import check_templates


class WinClipConfig(FsadConfig):
    """Config of `WinClipModel`: zero-shot WinCLIP, and WinCLIP+ when the bank holds normal references.

    Args:
        window_scales: window sides in patches (2 and 3 = 32 and 48 px at patch 16), stride 1.
        temperature: softmax temperature of the class score (0.07, CLIP's).
        normalize_prompt_embeddings: True (default, WinCLIP paper and InCTRL) L2-normalises every prompt
            embedding before averaging an ensemble and re-normalises the mean; False averages raw embeddings
            as anomalib does (for score parity with anomalib).
        prompt_templates: the photo templates of the prompt ensemble, each with one `{}` for the state; None
            (default) takes `hf_fsad.prompts.TEMPLATES` (22, both a/the variants). anomalib's list (21, one
            repeated) gives anomalib's scores.
        inherited: see `FsadConfig` (clip_config, image_size, image_mean, image_std, default_class_name).
            paper_preprocessing is "crop", as the InCTRL code that evaluated WinCLIP for the InCTRL and MetaCAN
            tables (resize the short side to 240, centre crop); anomalib squashes ("squash" for its parity).

    Maps are the patch-grid scores upsampled bilinearly to the input size, without smoothing (as WinCLIP).
    """

    model_type = "winclip"
    paper = 'Jeong et al., "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation", CVPR 2023'

    window_scales: list[int] = field(default_factory=lambda: [2, 3])
    temperature: float = 0.07
    normalize_prompt_embeddings: bool = True
    prompt_templates: list[str] | None = None
    paper_preprocessing: str = "crop"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        self.window_scales = [int(scale) for scale in self.window_scales]
        grid = self.image_size // self.clip_config.vision_config.patch_size
        for scale in self.window_scales:
            if not 1 <= scale <= grid:
                raise ValueError(f"window scale {scale} does not fit the {grid}x{grid} patch grid.")
        if self.prompt_templates is not None:
            self.prompt_templates = list(check_templates(self.prompt_templates))
        if self.temperature <= 0:
            raise ValueError(f"temperature must be positive, got {self.temperature}.")
