"""`FsadPreTrainedModel`: the base class of every method, which declares the method contract.

Its neighbours hold what is not the model: the config base in `configuration_base`, the output type in
`modeling_outputs`, the reference bank (its file format and its check against a model) in `bank`, the image
processor and the pixel checks in `image_processing`, thresholds and calibrated decisions in `calibration`;
`calibrate` (held-out or leave-one-out scores of a bank) comes from `modeling_calibration.CalibrationMixin`.
The two fingerprints stay here as methods, as they hash the model's own weights: `config_hash` (which banks
fit the model) and `feature_key` (which cached features it can reuse).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPTokenizer, PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
from transformers.utils import cached_file

# `ReferenceBank`, `apply_calibration` and `validate_pixel_values` are used through their modules: importing
# them from this one is deprecated (`__getattr__` below), so they are not bound here.
from . import bank as bank_module
from . import calibration as calibration_module
from . import image_processing as image_processing_module
from .backbones.clip import ClipBackbone
from .configuration_base import FsadConfig
from .deprecation import moved_names, renamed_method
from .modeling_calibration import CalibrationMixin
from .scoring import greedy_coreset, upsample_maps

if TYPE_CHECKING:
    from .bank import ReferenceBank
    from .modeling_outputs import AnomalyDetectionOutput

# Precisions `FsadPreTrainedModel.autocast` offers: name -> autocast dtype (None: compute as stored).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt embeddings the model computed before it was saved (see `ClipBackbone.text_cache`).
TEXT_CACHE_FILE = "text_embeddings.safetensors"
# Config keys that say nothing about how features are computed (and change on save/load; `trained_parts`
# records where weights came from, and reads "unrecorded" for a model saved before it existed).
_VOLATILE_CONFIG_KEYS = {
    "transformers_version",
    "_name_or_path",
    "architectures",
    "dtype",
    "auto_map",
    "trained_parts",
}


class UntrainedWeightsWarning(UserWarning):
    """A model whose trained parts (`FsadPreTrainedModel.needs_training`) were never trained, or may not have
    been, is scoring: its scores mean nothing until they are."""


def _without_volatile_keys(config: dict) -> dict:
    return {
        key: _without_volatile_keys(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in _VOLATILE_CONFIG_KEYS
    }


class FsadPreTrainedModel(PreTrainedModel, CalibrationMixin):
    """Base of every method: a frozen CLIP backbone (`self.backbone`) plus the method's own parts.

    `from_pretrained` loads the CLIP tokenizer saved beside the weights and freezes the backbone;
    `save_pretrained` writes the tokenizer and the image processor config with the weights, so a saved
    directory or Hub repo is self-contained, and the prompt embeddings computed so far, so a loaded model
    skips the prompt ensemble of classes it has seen.
    """

    config_class = FsadConfig
    base_model_prefix = "fsad"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    # Whether the method's banks need anomalous references (the benchmark runner gives them only then).
    needs_anomalous_references = False
    # Name prefixes of the bank tensors that are nearest-neighbour memories (M, D), which
    # `config.max_memory_items` thins when set.
    memory_prefixes: tuple[str, ...] = ()
    # Whether `fit(normal_images, class_name)` must run on each category's normal images before scoring it
    # (the benchmark runner and `hf-fsad fit` fit such methods per cell / on demand).
    fits_per_category = False
    # Whether `validate_weights` tunes the bank on labelled views from `validation_set` (the benchmark runner
    # then gives it the protocol's held-out normal and anomalous images).
    validates_weights = False
    # The bank tensors `validate_weights` sets; leave-one-out calibration keeps them from the validated bank.
    validated_tensors: tuple[str, ...] = ()
    # Whether the saved model holds what it learnt from its references (VTFusion's prototypes), so its bank
    # is built without references and takes none.
    saves_its_references = False
    # Whether the method's own layers must be trained before its scores mean anything (they are random in a
    # model built by `from_clip`); `untrained_weights` then reads `config.trained_parts`. `trained_parts_name`
    # names them and `how_to_get_weights` says how, for the messages.
    needs_training = False
    trained_parts_name = ""
    how_to_get_weights = ""
    # Why the method cannot be exported as one fixed ONNX / OpenVINO graph (`hf_fsad.export` refuses it with
    # this reason); None: it exports.
    export_refusal: str | None = None

    def __init__(self, config: FsadConfig):
        super().__init__(config)
        self.backbone = ClipBackbone(config.clip_config, config.position_interpolation)
        self.freeze_backbone()

    @torch.no_grad()
    def _init_weights(self, module):
        """CLIP's initialisation inside the backbone; PyTorch's defaults for a method's own layers."""
        if any(module is part for part in self.backbone.modules()):
            CLIPPreTrainedModel._init_weights(self.backbone.clip, module)
        elif module is not self and hasattr(module, "reset_parameters"):
            module.reset_parameters()

    @property
    def tokenizer(self) -> CLIPTokenizer | None:
        return self.backbone.tokenizer

    @tokenizer.setter
    def tokenizer(self, tokenizer: CLIPTokenizer | None) -> None:
        self.backbone.tokenizer = tokenizer

    def freeze_backbone(self) -> None:
        """Freeze the CLIP weights (done after loading: `requires_grad_` in `__init__` does not survive it)."""
        self.backbone.clip.requires_grad_(False)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        model = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        hub_kwargs = {
            key: kwargs[key]
            for key in ("cache_dir", "revision", "token", "local_files_only", "force_download")
            if key in kwargs
        }
        model.tokenizer = CLIPTokenizer.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        text_cache = cached_file(
            pretrained_model_name_or_path,
            TEXT_CACHE_FILE,
            _raise_exceptions_for_missing_entries=False,
            **hub_kwargs,
        )
        if text_cache is not None:
            model.backbone.load_text_cache(text_cache)
        model.freeze_backbone()
        model._align_tensors()
        return model

    @torch.no_grad()
    def _align_tensors(self, alignment: int = 64) -> None:
        """Copy weights that loading left at unaligned addresses (safetensors offsets) into fresh memory: CPU
        matrix kernels pick their code path by alignment, and a loaded model should compute bit for bit
        what the saved one did."""
        for tensor in [*self.parameters(), *self.buffers()]:
            if tensor.device.type == "cpu" and tensor.data_ptr() % alignment:
                tensor.data = tensor.data.clone()

    @classmethod
    def from_clip(
        cls, clip_name_or_path: str | os.PathLike, hub_kwargs: dict | None = None, **config_kwargs
    ) -> FsadPreTrainedModel:
        """A fresh method model around a pretrained CLIP (a Hub id or a local `CLIPModel` directory).

        hub_kwargs go to both `from_pretrained` calls (e.g. `local_files_only`, `revision`, `token`);
        config_kwargs set the method's config fields.
        """
        from transformers import CLIPModel

        hub_kwargs = hub_kwargs or {}
        clip = CLIPModel.from_pretrained(clip_name_or_path, **hub_kwargs)
        tokenizer = CLIPTokenizer.from_pretrained(clip_name_or_path, **hub_kwargs)
        model = cls(cls.config_class(clip_config=clip.config, **config_kwargs))
        model.backbone.load_clip_weights(clip.state_dict())
        model.tokenizer = tokenizer
        model.freeze_backbone()
        return model.eval()

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(save_directory)
        self.image_processor().save_pretrained(save_directory)
        if self.backbone.text_cache:
            self.backbone.save_text_cache(Path(save_directory) / TEXT_CACHE_FILE)

    def autocast(self, precision: str = "float32") -> contextlib.AbstractContextManager:
        """A context in which the model computes in `precision` ("bfloat16", "float16": `torch.autocast`
        on the model's device, matrix products in half precision, softmax and norms in float32) or as stored
        ("float32"). docs/performance.md states how far half-precision scores move from float32."""
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose from {sorted(PRECISIONS)}.")
        dtype = PRECISIONS[precision]
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    def compile_backbone(self, **compile_kwargs) -> FsadPreTrainedModel:
        """Compile the backbone's vision passes for faster inference (`ClipBackbone.compile_passes`)."""
        self.backbone.compile_passes(**compile_kwargs)
        return self

    def image_processor(self, crop: bool = False) -> CLIPImageProcessorPil:
        """The preprocessing this model expects: RGB, bicubic resize to a square of `config.image_size`,
        CLIP normalisation.

        crop=False (default, for scoring): the whole image is resized to the square, so maps cover all of it.
        crop=True: the short side is resized to `config.image_size` and the centre square kept, as the papers'
        evaluation code does (see `paper_image_processor`). The processor's saved config records which.
        """
        return image_processing_module.build_image_processor(self.config, crop)

    def paper_image_processor(self) -> CLIPImageProcessorPil:
        """`image_processor` with the geometry of the method's published evaluation
        (`config.paper_preprocessing`), which the benchmark runner and training use."""
        return self.image_processor(crop=self.config.paper_preprocessing == "crop")

    def grid_size(self) -> tuple[int, int]:
        """Patch grid of a `config.image_size` input."""
        side = self.config.image_size // self.backbone.patch_size
        return side, side

    def check_input_size(self, pixel_values: torch.Tensor) -> None:
        """Raise unless the images are `config.image_size` squares (what `image_processor()` makes)."""
        size = self.config.image_size
        if tuple(pixel_values.shape[-2:]) != (size, size):
            height, width = pixel_values.shape[-2:]
            raise ValueError(
                f"pixel_values are {height}x{width} images, but this model takes {size}x{size} "
                "(config.image_size): preprocess with `model.image_processor()`."
            )

    def check_pixels(self, pixel_values: torch.Tensor, name: str = "pixel_values") -> torch.Tensor:
        """`pixel_values` on the model's device and dtype, after `image_processing.validate_pixel_values` and
        `check_input_size`."""
        image_processing_module.validate_pixel_values(pixel_values, self.backbone.patch_size, name)
        self.check_input_size(pixel_values)
        return pixel_values.to(self.device, self.dtype)

    def to_pixel_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B, P) patch-grid scores -> (B, S, S) maps at `config.image_size`, bilinearly."""
        size = self.config.image_size
        return upsample_maps(patch_maps.reshape(-1, *self.grid_size()), (size, size))

    def config_hash(self) -> str:
        """Fingerprint of the config, the backbone's projections and every trained weight (a method's own
        layers, LoRA); a reference bank only fits a matching model.

        Memoised on each weight's storage and autograd version counter, which every write through the
        weight changes: optimizer steps, `load_state_dict`, `weight.copy_(...)` under `torch.no_grad()`,
        `weight.data = tensor`. A write through `weight.data` in place (`weight.data.copy_(...)`) or a NumPy
        view bypasses the counter: call `invalidate_feature_key()` after one."""
        clip = self.backbone.clip
        weights = [clip.visual_projection.weight, clip.text_projection.weight]
        weights += [
            p for name, p in self.named_parameters() if not name.startswith("backbone.") or "lora_" in name
        ]
        config = json.dumps(_without_volatile_keys(self.config.to_dict()), sort_keys=True, default=str)
        state = (config, tuple((w.data_ptr(), w._version) for w in weights))
        cached = getattr(self, "_config_hash_cache", None)
        if cached is not None and cached[0] == state:
            return cached[1]
        digest = hashlib.sha256(config.encode())
        for weight in weights:
            digest.update(weight.detach().float().cpu().numpy().tobytes())
        self._config_hash_cache = (state, digest.hexdigest()[:16])
        return self._config_hash_cache[1]

    def feature_spec(self) -> dict:
        """What `encode_images` computes besides the weights; equal specs on equal backbones share cached
        features. Methods whose features depend on more config fields extend this."""
        spec = {
            "image_size": self.config.image_size,
            "image_mean": self.config.image_mean,
            "image_std": self.config.image_std,
        }
        if self.config.image_size != self.config.clip_config.vision_config.image_size:
            spec["position_interpolation"] = self.config.position_interpolation
        return spec

    def invalidate_feature_key(self) -> None:
        """Forget the memoised weight hashes of `feature_key` and `config_hash` (call after changing weights,
        e.g. training, merging LoRA or writing through `weight.data`)."""
        self._vision_weights_digest = None
        self._config_hash_cache = None

    def feature_key(self) -> str:
        """Fingerprint of `encode_images`: the vision weights (hashed once; they are frozen) + `feature_spec()`."""
        if getattr(self, "_vision_weights_digest", None) is None:
            digest = hashlib.sha256()
            for name, tensor in sorted(self.backbone.clip.vision_model.state_dict().items()):
                digest.update(name.encode())
                digest.update(tensor.detach().float().cpu().numpy().tobytes())
            digest.update(
                self.backbone.clip.visual_projection.weight.detach().float().cpu().numpy().tobytes()
            )
            self._vision_weights_digest = digest.hexdigest()
        spec = json.dumps(self.feature_spec(), sort_keys=True, default=str)
        return hashlib.sha256((self._vision_weights_digest + spec).encode()).hexdigest()[:16]

    @property
    def untrained_weights(self) -> str | None:
        """Whether the parts this method must train (`needs_training`) are untrained: "random" when they never
        were, "unrecorded" when the model was saved before `config.trained_parts` existed and names no
        `trained_on`, so nothing says; None when they were trained or converted, or the method trains none."""
        if not self.needs_training or self.config.trained_on is not None:
            return None
        return self.config.trained_parts if self.config.trained_parts in ("random", "unrecorded") else None

    def untrained_message(self) -> str | None:
        """One line on `untrained_weights` with how to get weights; None when there is nothing to say."""
        return self.untrained_message_for(self.untrained_weights)

    @classmethod
    def untrained_message_for(cls, state: str | None) -> str | None:
        """`untrained_message` of a model of this class whose `untrained_weights` is `state`."""
        if state is None:
            return None
        method = cls.config_class.model_type
        if state == "random":
            return (
                f"{method}'s {cls.trained_parts_name} were never trained (random weights), so its scores mean "
                f"nothing: {cls.how_to_get_weights}"
            )
        return (
            f"this {method} model was saved before hf_fsad recorded training (config.trained_parts), so "
            f"whether its {cls.trained_parts_name} were trained is unknown; untrained, its scores mean "
            f"nothing: {cls.how_to_get_weights}"
        )

    def warn_if_untrained(self) -> None:
        """Warn (`UntrainedWeightsWarning`, once per model) when `untrained_message` has something to say."""
        message = self.untrained_message()
        if message is not None and not getattr(self, "_warned_untrained", False):
            self._warned_untrained = True
            warnings.warn(message, UntrainedWeightsWarning, stacklevel=3)

    def forward(
        self,
        pixel_values: torch.Tensor,
        reference_bank: ReferenceBank | None = None,
        return_dict: bool = True,
    ) -> AnomalyDetectionOutput | tuple:
        """Score a batch (B, 3, S, S), S = `config.image_size`. Without a bank: the method's default
        (zero-shot with `config.default_class_name` for methods with text prompts).

        Every method implements `encode_images` (per-image features), `score_features` (features + bank ->
        output) and `build_reference_bank`; keeping encoding apart lets features be cached and reused.
        """
        self.warn_if_untrained()
        output = self.score_features(self.encode_images(pixel_values), reference_bank)
        if reference_bank is not None and reference_bank.calibration is not None:
            output = calibration_module.apply_calibration(output, reference_bank.calibration)
        return output if return_dict else output.to_tuple()

    def encode_images(
        self, pixel_values: torch.Tensor, name: str = "pixel_values"
    ) -> dict[str, torch.Tensor]:
        """Per-image features of a batch (B, 3, S, S), name -> tensor with the batch first; `name` names the
        input in errors. What `score_features` and `build_reference_bank` take instead of pixels."""
        raise NotImplementedError(f"{type(self).__name__} does not implement encode_images.")

    def score_features(
        self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank | None = None
    ) -> AnomalyDetectionOutput:
        """Scores (and maps) of `encode_images` features against `reference_bank` (None: the method's
        default, see `bank_or_default`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score_features.")

    def build_reference_bank(self, *args, **kwargs) -> ReferenceBank:
        """The method's k-shot bank (reference features, text embeddings); called without references, the
        default bank `bank_or_default` scores with."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build_reference_bank.")

    @property
    def fitted_on_normals(self) -> bool:
        """Whether `fit` has taught this model normal images (methods with `fits_per_category`, fitted or
        loaded fitted): it may know a reference left out of its bank, so leave-one-out is refused."""
        return False

    def fit(self, normal_images, class_name: str | None = None, **arguments):
        """Fit the model to one category's normal images (methods with `fits_per_category`)."""
        raise NotImplementedError(
            f"{type(self).__name__} is not fitted per category (fits_per_category is False): give its "
            "references to `build_reference_bank` instead."
        )

    def validation_set(
        self,
        normal_images: Sequence[Image.Image],
        anomalous_images: Sequence[Image.Image],
        processor: CLIPImageProcessorPil | None = None,
    ) -> tuple[torch.Tensor, list[int]]:
        """Preprocessed labelled views (0 normal, 1 anomalous) for `validate_weights` (methods with
        `validates_weights`): `validation_views` through `processor`, the bank's and the queries' preprocessing
        (None: `image_processor()`), so the weights are chosen on views of the geometry they will score (e.g.
        `paper_image_processor()`'s centre crop in benchmarks)."""
        views, labels = self.validation_views(normal_images, anomalous_images)
        return (processor or self.image_processor())(views, return_tensors="pt").pixel_values, labels

    def validation_views(
        self, normal_images: Sequence[Image.Image], anomalous_images: Sequence[Image.Image]
    ) -> tuple[list[Image.Image], list[int]]:
        """Labelled views (0 normal, 1 anomalous) of the images, at their size, that choose the weights (methods
        with `validates_weights`; a tiled bank's are tiled, `hf_fsad.tiled_scoring.validate_tiled_weights`)."""
        raise NotImplementedError(self._no_weights())

    def validate_weights(
        self,
        reference_bank: ReferenceBank,
        validation_pixel_values: torch.Tensor,
        validation_labels: Sequence[int],
    ) -> ReferenceBank:
        """The bank with the method's weights chosen on labelled validation images (methods with
        `validates_weights`): `chosen_weights` of their `score_vectors`."""
        raise NotImplementedError(self._no_weights())

    def score_vectors(self, features: dict[str, torch.Tensor], reference_bank: ReferenceBank) -> torch.Tensor:
        """(B, S): the scores of `encode_images` features that the validated weights combine (methods with
        `validates_weights`)."""
        raise NotImplementedError(self._no_weights())

    def chosen_weights(
        self,
        reference_bank: ReferenceBank,
        validation_scores: torch.Tensor | Sequence[torch.Tensor],
        validation_labels: Sequence[int],
        tile_rule: str | None = None,
    ) -> dict[str, torch.Tensor]:
        """The bank tensors (`validated_tensors`) chosen on the validation images' `score_vectors` (V, S), or
        on each image's tiles' (T_v, S) combined by `tile_rule` (methods with `validates_weights`)."""
        raise NotImplementedError(self._no_weights())

    def _no_weights(self) -> str:
        return f"{type(self).__name__} has no weights to validate (validates_weights is False)."

    def features_of(
        self, pixel_values: torch.Tensor | None, features: dict[str, torch.Tensor] | None, name: str
    ) -> dict[str, torch.Tensor] | None:
        """Features of an image set given as pixels (encoded here) or as `encode_images` features; None if
        neither is given."""
        if pixel_values is None:
            return features
        if features is not None:
            raise ValueError(f"Give {name} or its features, not both.")
        if isinstance(pixel_values, torch.Tensor) and pixel_values.shape[0] == 0:
            raise ValueError(f"The reference set {name} is empty: give at least one image, or None.")
        return self.encode_images(pixel_values, name)

    # The bank verbs: `build_reference_bank` (the method's public builder) keeps its tensors with
    # `bank_from_tensors`; scoring takes `bank_or_default` (a bank is optional) or `required_bank` (one is
    # needed), both checked with `checked_bank`.

    def bank_from_tensors(self, class_name: str, k: int, tensors: dict[str, torch.Tensor]) -> ReferenceBank:
        """A bank of `tensors` for this model. Its memories (`memory_prefixes`) are kept whole (exact search)
        unless `config.max_memory_items` is set: then a larger one is thinned to a greedy k-center coreset of
        that size, with a warning naming the memory and both sizes."""
        limit = self.config.max_memory_items
        kept = {}
        for name, tensor in tensors.items():
            if limit is not None and name.startswith(self.memory_prefixes) and tensor.shape[0] > limit:
                warnings.warn(
                    f"{self.config.model_type}: memory '{name}' holds {tensor.shape[0]} items; keeping a "
                    f"greedy k-center coreset of {limit} (config.max_memory_items), so its nearest-neighbour "
                    "search is approximate. Set max_memory_items=None for the exact memory.",
                    stacklevel=2,
                )
                tensor = tensor[greedy_coreset(tensor, limit)]
            kept[name] = tensor
        return bank_module.ReferenceBank(self.config.model_type, self.config_hash(), class_name, k, kept)

    def bank_or_default(self, reference_bank: ReferenceBank | None) -> ReferenceBank:
        """The bank to score with: `reference_bank` checked against this model (`checked_bank`), or without
        one the method's default, `build_reference_bank()` (zero-shot with `config.default_class_name`, or the
        fitted category). Methods that cannot score without references use `required_bank`."""
        if reference_bank is not None:
            return self.checked_bank(reference_bank)
        return self.build_reference_bank()

    def required_bank(self, bank: ReferenceBank | None, how: str) -> ReferenceBank:
        """`checked_bank` for methods that cannot score without a bank; `how` says in the error how to build
        one."""
        if bank is None:
            raise ValueError(f"{type(self).__name__} needs a reference bank {how}")
        return self.checked_bank(bank)

    def checked_bank(self, bank: ReferenceBank) -> ReferenceBank:
        """`bank` on this model's device; a clear error when it is no bank or another model type or config
        built it (`ReferenceBank.check_built_by`)."""
        if not isinstance(bank, bank_module.ReferenceBank):
            raise TypeError(f"reference_bank must be a ReferenceBank, got {type(bank).__name__}.")
        if bank.tiling is not None:
            raise ValueError(
                f"This reference bank is tiled ({bank.tiling.describe()}): score large images with it through "
                "`hf_fsad.tiled_scoring.score_tiled(model, image, bank)`, which cuts them the same way."
            )
        # While a graph is exported the weights are symbolic: `hf_fsad.export` checks the bank before it traces.
        bank.check_built_by(
            self.config.model_type, bank.config_hash if torch.compiler.is_exporting() else self.config_hash()
        )
        return bank.to(self.device)

    make_bank = renamed_method("make_bank", "bank_from_tensors")
    resolve_bank = renamed_method("resolve_bank", "bank_or_default")
    require_bank = renamed_method("require_bank", "required_bank")
    check_bank = renamed_method("check_bank", "checked_bank")


# Public names that moved out of this module; importing them from here still works, with a DeprecationWarning,
# for one release.
__getattr__ = moved_names(
    __name__,
    {
        "AnomalyDetectionOutput": "hf_fsad.modeling_outputs.AnomalyDetectionOutput",
        "ReferenceBank": "hf_fsad.bank.ReferenceBank",
        "BANK_FORMAT_VERSION": "hf_fsad.bank.BANK_FORMAT_VERSION",
        "apply_calibration": "hf_fsad.calibration.apply_calibration",
        "validate_pixel_values": "hf_fsad.image_processing.validate_pixel_values",
    },
)
