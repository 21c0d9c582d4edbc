"""Config base shared by every method (kept apart from the modeling code so configs import light)."""

from __future__ import annotations

from dataclasses import field
from typing import ClassVar

from transformers import CLIPConfig, PreTrainedConfig
from transformers.image_utils import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD

# Resampling modes of the position-embedding grid (`torch.nn.functional.interpolate` modes).
POSITION_INTERPOLATIONS = ("bicubic", "bilinear")

# Image geometries of `FsadConfig.paper_preprocessing`.
PREPROCESSING = ("crop", "squash")

# Where the weights of the parts a method must train come from (`FsadConfig.trained_parts`).
TRAINED_PARTS = ("random", "trained", "converted", "unrecorded")


class FsadConfig(PreTrainedConfig):
    """Base config of every hf_fsad method.

    Args:
        clip_config: the CLIP backbone's `CLIPConfig` (or its dict).
        image_size: side of the square model input in pixels; defaults to the CLIP vision tower's size.
            Other sizes interpolate the position embeddings.
        image_mean, image_std: normalisation of the image processor (OpenAI CLIP values by default).
        default_class_name: class word used when no class name is given.
        trained_on: the dataset a trained method was fitted on (None for training-free methods); the
            benchmark runner reports it, so cross-dataset results (train on A, test on B) are labelled.
        trained_parts: where the weights of the parts the method must train come from, for methods that have
            such parts (`FsadPreTrainedModel.needs_training`: MetaCAN's differentiator and detector, AF-CLIP's
            adapter and prompts; others ignore it). "random" (default): built fresh (`from_clip`, a config),
            so scoring is refused by the CLI and the Space and warned about in Python. "trained": a training
            recipe fitted them; "converted": published weights (`hf-fsad convert --afclip-official`).
            "unrecorded": a config.json without the field, written before it existed, so nothing says
            whether they were trained (warned about, not refused); `from_dict` sets it, as the default would
            read such a save as fresh. A `trained_on` dataset also counts as trained.
        max_memory_items: None (default) keeps every item of a bank's nearest-neighbour memories (patches,
            windows), searched exactly in chunks (`scoring.nearest_cosine`: bounded peak memory, cost linear
            in the memory's size), so every paper setting is computed as published. An int thins each larger
            memory to a greedy k-center coreset of that many items (`scoring.greedy_coreset`, PatchCore's), so
            per-image cost stops growing with k; `bank_from_tensors` then warns with the memory and both sizes.
        position_interpolation: how the vision tower's grid of position embeddings is resized for an
            `image_size` other than the checkpoint's: "bicubic" (transformers' `interpolate_pos_encoding`) or
            "bilinear" (what AF-CLIP's official code does); the CLS position is kept as it is.
        paper_preprocessing: the image geometry of the method's published evaluation, which the benchmark
            runner and training use (`paper_image_processor()`): "crop" (resize the short side to
            `image_size`, keep the centre square: the InCTRL and MetaCAN code; WinCLIP and MetaCAN set it) or
            "squash" (default: resize the whole image to the square, as AF-CLIP's code; methods without
            public code keep it, as their own fitting preprocesses that way). Scoring for users (pipeline,
            CLI, Space) squashes whatever this says, so maps cover the whole image.
    """

    sub_configs_defaults: ClassVar[dict] = {"clip_config": CLIPConfig}
    # The method's paper, cited in model cards (each method's config sets it).
    paper: ClassVar[str | None] = None

    clip_config: dict | CLIPConfig | None = None
    image_size: int | None = None
    image_mean: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(OPENAI_CLIP_STD))
    default_class_name: str = "object"
    trained_on: str | None = None
    trained_parts: str = "random"
    max_memory_items: int | None = None
    position_interpolation: str = "bicubic"
    paper_preprocessing: str = "squash"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        patch_size = self.clip_config.vision_config.patch_size
        if self.image_size is None:
            self.image_size = self.clip_config.vision_config.image_size
        if self.max_memory_items is not None and self.max_memory_items < 1:
            raise ValueError(f"max_memory_items must be >= 1 or None, got {self.max_memory_items}.")
        if self.position_interpolation not in POSITION_INTERPOLATIONS:
            raise ValueError(
                f"position_interpolation must be one of {POSITION_INTERPOLATIONS}, "
                f"got {self.position_interpolation!r}."
            )
        if self.trained_parts not in TRAINED_PARTS:
            raise ValueError(f"trained_parts must be one of {TRAINED_PARTS}, got {self.trained_parts!r}.")
        if self.paper_preprocessing not in PREPROCESSING:
            raise ValueError(
                f"paper_preprocessing must be one of {PREPROCESSING}, got {self.paper_preprocessing!r}."
            )
        if self.image_size < patch_size:
            raise ValueError(f"image_size {self.image_size} is smaller than the patch size {patch_size}.")

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        """The config of `config_dict` (what `from_pretrained` reads from config.json); one written before
        `trained_parts` existed gets "unrecorded" instead of the default "random" (see the class docstring)."""
        if "trained_parts" not in config_dict:
            config_dict = {**config_dict, "trained_parts": "unrecorded"}
        return super().from_dict(config_dict, **kwargs)

    def quarter_blocks(self) -> list[int]:
        """The ends of four equal groups of vision blocks, the papers' four hierarchical levels ([6, 12, 18, 24]
        on a 24-block ViT-L; repeats on towers under four blocks)."""
        num_blocks = self.clip_config.vision_config.num_hidden_layers
        return [max(1, num_blocks * quarter // 4) for quarter in (1, 2, 3, 4)]

    def checked_feature_layers(self, layers: list[int]) -> list[int]:
        """`layers` as ints, refusing any that is not a 1-based block of the vision tower."""
        num_blocks = self.clip_config.vision_config.num_hidden_layers
        layers = [int(layer) for layer in layers]
        for layer in layers:
            if not 1 <= layer <= num_blocks:
                raise ValueError(
                    f"feature layer {layer} does not exist: the vision tower has blocks 1..{num_blocks}."
                )
        return layers
