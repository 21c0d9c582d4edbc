"""One-to-Normal configuration."""

from __future__ import annotations

from dataclasses import field

from ...configuration_base import FsadConfig

NORMAL_STATE_PROMPTS = (
    "a photo of normal {} without flaw",
    "a photo of normal {} without defect",
    "a photo of normal {} without damage",
)

# What the paper states where hf_fsad's defaults differ: config fields, and `fit` / training arguments.
PAPER_SETTINGS = {
    "config": {"image_size": 240, "text_temperature": 1.0},  # Sec. 4.1's 240 x 240; Eq. 6 with no scale
    "training": {"full_finetune": True},  # "fine-tuned using Dreambooth": the UNet's weights, no LoRA
}
# Settings the paper leaves open, with what hf_fsad uses for them.
UNDETERMINED_SETTINGS = {
    "diffusion_resolution": "Stable Diffusion's input side: not stated; ours 240 (SD v1.5 trained at 512)",
    "learning_rate": "DreamBooth's learning rate: not stated; ours 1e-4 (LoRA; DreamBooth on SD: ~5e-6)",
    "max_steps": "DreamBooth's updates: not stated; ours 400",
    "num_class_images": "prior-preservation class images: not stated; ours 100",
    "text_encoder": "whether DreamBooth also tunes the text encoder: not stated; ours frozen",
    "feature_layers": "the n levels of Eqs. 4-5: not stated; ours the four quarter-depth blocks",
    "pool_strength": "how the generated pool images are made: not stated; ours img2img at 0.5",
    "num_inference_steps": "denoising steps and guidance of personalization: not stated; ours 50, 7.5",
}


class OneToNormalConfig(FsadConfig):
    """Config of `OneToNormalModel` ("One-to-Normal: Anomaly Personalization for Few-shot Anomaly Detection",
    arXiv:2502.01201).

    Args:
        image_size: the CLIP input side, 240 (the paper's inference resolution, Sec. 4.1) whatever the
            tower's own size: ViT-L/14 (224 or 336 px) then sees a 17 x 17 grid of 14-pixel patches (240 // 14;
            the last 2 pixel rows and columns fall outside the grid), with interpolated position embeddings.
            None takes the tower's size.
        feature_layers: 1-based vision blocks whose raw patch tokens are compared (Eqs. 4-5); default: the
            ends of four equal groups of blocks (the paper's n levels are not given; chosen as AF-CLIP's).
        diffusion_model: the Stable Diffusion repository (Hub id or local directory) the anomaly-free
            customised model starts from (Stable Diffusion v1.5 in the paper).
        strength: share of the diffusion the query is noised to before denoising (t = 0.3 T, Sec. 4.1).
        num_inference_steps, guidance_scale: of the DDIM img2img schedule ("trailing" spacing, so strength
            0.3 of 50 steps denoises 15 steps from t = 0.3 T) and classifier-free guidance.
        diffusion_resolution: side of the images the diffusion model sees (a multiple of the VAE's factor 8):
            240 (ours, the paper's inference resolution). The paper does not say at which size Stable
            Diffusion runs: its "inference resolution is 240 x 240" (Sec. 4.1) sits beside the WinCLIP
            settings and is likely CLIP's input; SD v1.5's own size is 512.
        normal_state_prompts: the normal-state prompts of Eq. 2 ("{}" = the class name); the paper's
            Appendix A.1 states (three by default); candidates are generated for all of them in one batch.
        instance_prompt, class_prompt: DreamBooth's prompts for the normal images and for prior preservation.
        alpha, beta: Eq. 7's weights of S_N and S_text (1 and 0.5).
        text_temperature: of Eq. 6's softmax over cosines. 0.01 (default, ours): CLIP's logit scale 100, as
            WinCLIP, whose prompts the paper uses, scores. 1.0: Eq. 6 as printed, softmax(F_q F_text^T) with
            no scale; S_text is then sigmoid(cos_a - cos_n), within [0.12, 0.88] and in practice within
            |cos_a - cos_n| / 4 of 0.5 (CLIP's state cosines differ by a few hundredths), so beta S_text
            barely moves Eq. 7's ranking. S_text alone ranks the same at any temperature (Table 4's row).
        pool_size: images in the anomaly-free pool (the k normals plus generated ones; 30 in the paper).
        pool_strength: img2img strength of the generated pool images (closer to the normals than to queries;
            the paper gives no value).
        seed: of the personalization noise (per image: mixed with a hash of its pixels).
        fitted_class_name, num_pool_images: set by `fit` (the object word of the prompts, and the number of
            images in the anomaly-free pool saved with the model; 0: not fitted, no pool).

    The paper's DreamBooth fine-tunes the UNet's weights (`fit(..., full_finetune=True)`); hf_fsad's default
    is a rank-4 LoRA (`OneToNormalTrainingArguments`). `PAPER_SETTINGS` lists the settings the paper
    states where the defaults differ, `UNDETERMINED_SETTINGS` those it leaves open.

    Choices where the paper says nothing: Eqs. 4-5 compare raw block tokens (as WinCLIP+ and MetaCAN do);
    S_text (Eq. 6) uses the projected CLS token and the WinCLIP prompt ensemble; the map is the level mean of
    the S_P map plus alpha x the level mean of the S_N map; the generated pool images are img2img variations of
    the normals at `pool_strength` ("settings closer to the normal references", Sec. 3.4).
    """

    model_type = "one_to_normal"
    paper = 'Li, Zhang, Li and Lao, "One-to-Normal: Anomaly Personalization for Few-shot Anomaly Detection"'

    image_size: int | None = 240
    feature_layers: list[int] | None = None
    diffusion_model: str = "stable-diffusion-v1-5/stable-diffusion-v1-5"
    strength: float = 0.3
    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    diffusion_resolution: int = 240
    normal_state_prompts: list[str] = field(default_factory=lambda: list(NORMAL_STATE_PROMPTS))
    instance_prompt: str = "a photo of normal {}"
    class_prompt: str = "a photo of {}"
    alpha: float = 1.0
    beta: float = 0.5
    text_temperature: float = 0.01
    pool_size: int = 30
    pool_strength: float = 0.5
    seed: int = 0
    fitted_class_name: str | None = None
    num_pool_images: int = 0

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.feature_layers is None:
            self.feature_layers = sorted(set(self.quarter_blocks()))
        self.feature_layers = self.checked_feature_layers(self.feature_layers)
        for name in ("strength", "pool_strength"):
            if not 0 < getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in (0, 1], got {getattr(self, name)}.")
        if not self.normal_state_prompts:
            raise ValueError("normal_state_prompts must hold at least one prompt.")
        if self.pool_size < 1 or self.num_inference_steps < 1:
            raise ValueError("pool_size and num_inference_steps must be >= 1.")
        if self.num_pool_images < 0:
            raise ValueError(f"num_pool_images must be >= 0, got {self.num_pool_images}.")
