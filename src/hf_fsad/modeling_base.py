"""What every method shares: config base, model base, output type and the reference bank."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessorPil, CLIPTokenizer, PreTrainedModel
from transformers.models.clip.modeling_clip import CLIPPreTrainedModel
from transformers.utils import ModelOutput, cached_file

from .backbones.clip import ClipBackbone
from .calibration import Calibration, fit_calibration
from .configuration_base import FsadConfig
from .scoring import greedy_coreset, upsample_maps

BANK_FORMAT_VERSION = "1"
# Precisions `FsadPreTrainedModel.autocast` offers: name -> autocast dtype (None: compute as stored).
PRECISIONS = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}
# Prompt embeddings the model computed before it was saved (see `ClipBackbone.text_cache`).
TEXT_CACHE_FILE = "text_embeddings.safetensors"
# Config keys that say nothing about how features are computed (and change on save/load).
_VOLATILE_CONFIG_KEYS = {"transformers_version", "_name_or_path", "architectures", "dtype", "auto_map"}


def _without_volatile_keys(config: dict) -> dict:
    return {
        key: _without_volatile_keys(value) if isinstance(value, dict) else value
        for key, value in config.items()
        if key not in _VOLATILE_CONFIG_KEYS
    }


@dataclass
class AnomalyDetectionOutput(ModelOutput):
    """Output of every method.

    image_scores: (B,) higher = more anomalous.
    anomaly_maps: (B, H, W) at input resolution, or None for image-level-only methods.
    branch_scores: name -> (B,) per-branch image scores, to explain which cue fired.
    With a calibrated bank (`model.calibrate`), also: normalized_scores (B,) in (0, 1), 0.5 at the
    threshold; labels (B,) 1 = anomalous; anomaly_masks (B, H, W) True where the map is above the pixel
    threshold. Without one they stay None.
    """

    image_scores: torch.Tensor | None = None
    anomaly_maps: torch.Tensor | None = None
    branch_scores: dict[str, torch.Tensor] | None = None
    normalized_scores: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    anomaly_masks: torch.Tensor | None = None


@dataclass
class ReferenceBank:
    """A method's k-shot "prompt": reference features and text embeddings, saved as safetensors.

    Build one with `model.build_reference_bank(...)`; it only fits the model type and config that built it.
    `model.calibrate(bank, ...)` adds a `calibration` (thresholds and score normalisation), saved with it.
    """

    model_type: str
    config_hash: str
    class_name: str
    k: int
    tensors: dict[str, torch.Tensor]
    calibration: Calibration | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to one `.safetensors` file (atomically)."""
        path = Path(path)
        metadata = {
            "format": "hf_fsad.reference_bank",
            "format_version": BANK_FORMAT_VERSION,
            "model_type": self.model_type,
            "config_hash": self.config_hash,
            "class_name": self.class_name,
            "k": str(self.k),
        }
        if self.calibration is not None:
            metadata["calibration"] = self.calibration.to_json()
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors.items()}
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBank:
        """Read a bank written by `save`; a ValueError says why a file is not one."""
        if not Path(path).is_file():
            raise ValueError(f"Reference bank {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not an hf_fsad reference bank (not a safetensors file: {error})."
            ) from None
        if metadata.get("format") != "hf_fsad.reference_bank":
            raise ValueError(f"{path} is not an hf_fsad reference bank (no bank metadata in the file).")
        calibration = None
        if "calibration" in metadata:
            try:
                calibration = Calibration.from_json(metadata["calibration"])
            except (TypeError, ValueError) as error:
                raise ValueError(f"Reference bank {path}: {error}") from None
        return cls(
            model_type=metadata["model_type"],
            config_hash=metadata["config_hash"],
            class_name=metadata["class_name"],
            k=int(metadata["k"]),
            tensors=load_file(str(path)),
            calibration=calibration,
        )

    def to(self, device: torch.device | str) -> ReferenceBank:
        tensors = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return dataclasses.replace(self, tensors=tensors)


def apply_calibration(output: AnomalyDetectionOutput, calibration: Calibration) -> AnomalyDetectionOutput:
    """`output` with the calibrated decisions: normalised scores, labels and (with a pixel threshold) masks."""
    return AnomalyDetectionOutput(
        image_scores=output.image_scores,
        anomaly_maps=output.anomaly_maps,
        branch_scores=output.branch_scores,
        normalized_scores=calibration.normalize(output.image_scores),
        labels=calibration.labels(output.image_scores),
        anomaly_masks=calibration.masks(output.anomaly_maps),
    )


def validate_pixel_values(pixel_values: torch.Tensor, patch_size: int, name: str = "pixel_values") -> None:
    """Raise an error naming the problem when `pixel_values` cannot be a batch of RGB images."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(pixel_values).__name__}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (normalised pixels from `model.image_processor()`), "
            f"got dtype {pixel_values.dtype}."
        )
    if pixel_values.ndim != 4:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}.")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} holds no images (batch size 0).")
    if pixel_values.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels, got {pixel_values.shape[1]}.")
    height, width = pixel_values.shape[-2:]
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"{name} images are {height}x{width}, smaller than the {patch_size}-pixel patch size."
        )
    if torch.compiler.is_exporting():
        return  # the values are symbolic while a graph is exported; the exported graph does not check them
    if torch.isnan(pixel_values).any():
        raise ValueError(f"{name} contains NaN values ({int(torch.isnan(pixel_values).sum())} of them).")
    if torch.isinf(pixel_values).any():
        raise ValueError(f"{name} contains infinite values ({int(torch.isinf(pixel_values).sum())} of them).")


class FsadPreTrainedModel(PreTrainedModel):
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
        size = self.config.image_size
        geometry = (
            {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
            if crop
            else {"size": {"height": size, "width": size}}
        )
        return CLIPImageProcessorPil(
            **geometry,
            do_center_crop=crop,
            image_mean=list(self.config.image_mean),
            image_std=list(self.config.image_std),
        )

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
        """`pixel_values` on the model's device and dtype, after `validate_pixel_values` and
        `check_input_size`."""
        validate_pixel_values(pixel_values, self.backbone.patch_size, name)
        self.check_input_size(pixel_values)
        return pixel_values.to(self.device, self.dtype)

    def to_pixel_maps(self, patch_maps: torch.Tensor) -> torch.Tensor:
        """(B, P) patch-grid scores -> (B, S, S) maps at `config.image_size`, bilinearly."""
        size = self.config.image_size
        return upsample_maps(patch_maps.reshape(-1, *self.grid_size()), (size, size))

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
        """Forget the hashed vision weights (call after changing them, e.g. training or merging LoRA)."""
        self._vision_weights_digest = None

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
        output = self.score_features(self.encode_images(pixel_values), reference_bank)
        if reference_bank is not None and reference_bank.calibration is not None:
            output = apply_calibration(output, reference_bank.calibration)
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
        default, see `resolve_bank`)."""
        raise NotImplementedError(f"{type(self).__name__} does not implement score_features.")

    def build_reference_bank(self, *args, **kwargs) -> ReferenceBank:
        """The method's k-shot bank (reference features, text embeddings); called without references, the
        default bank `resolve_bank` scores with."""
        raise NotImplementedError(f"{type(self).__name__} does not implement build_reference_bank.")

    def fit(self, normal_images, class_name: str | None = None, **arguments):
        """Fit the model to one category's normal images (methods with `fits_per_category`)."""
        raise NotImplementedError(
            f"{type(self).__name__} is not fitted per category (fits_per_category is False): give its "
            "references to `build_reference_bank` instead."
        )

    def validation_set(
        self, normal_images: Sequence[Image.Image], anomalous_images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, list[int]]:
        """Preprocessed labelled views (0 normal, 1 anomalous) for `validate_weights` (methods with
        `validates_weights`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no weights to validate (validates_weights is False)."
        )

    def validate_weights(
        self,
        reference_bank: ReferenceBank,
        validation_pixel_values: torch.Tensor,
        validation_labels: Sequence[int],
    ) -> ReferenceBank:
        """The bank with the method's weights chosen on labelled validation images (methods with
        `validates_weights`)."""
        raise NotImplementedError(
            f"{type(self).__name__} has no weights to validate (validates_weights is False)."
        )

    @torch.no_grad()
    def calibrate(
        self,
        reference_bank: ReferenceBank,
        reference_pixel_values: torch.Tensor | None = None,
        *,
        reference_features: dict[str, torch.Tensor] | None = None,
        normal_pixel_values: torch.Tensor | None = None,
        anomalous_pixel_values: torch.Tensor | None = None,
        anomalous_masks: torch.Tensor | None = None,
        false_alarm_rate: float = 0.05,
        bank_inputs: dict | None = None,
        batch_size: int = 8,
    ) -> ReferenceBank:
        """The bank with a `Calibration`: thresholds and score normalisation (`hf_fsad.calibration`).

        Normal scores come from held-out `normal_pixel_values` scored against the bank when given, else
        leave-one-out on the bank's own references (`reference_pixel_values` or their `encode_images`
        features): each is scored against a bank built from the others (at least 2; not for methods that
        `saves_its_references`). `bank_inputs` are the other arguments the bank was built with (anomalous
        memory: its anomalous references, or {} when it had none). With only normals the image threshold is
        the conformal one for `false_alarm_rate`; with `anomalous_pixel_values` too, the best-F1 one. The
        pixel threshold is the best pixel F1 with `anomalous_masks` ((A, H, W) at the input size, non-zero =
        defect), else the conformal threshold of the normal maps' maxima. Leave-one-out banks hold k - 1
        references, so for nearest-neighbour methods their normal scores run higher than with k: the
        threshold errs towards fewer false alarms.
        """
        bank = self.check_bank(reference_bank)
        if normal_pixel_values is not None:
            normal, source = (
                self._score_in_batches(normal_pixel_values, bank, batch_size, "normal_pixel_values"),
                "held_out",
            )
        else:
            features = self.features_of(reference_pixel_values, reference_features, "reference_pixel_values")
            if features is None:
                raise ValueError(
                    "Calibration needs normal images: the bank's references (reference_pixel_values, scored "
                    "leave-one-out) or held-out normal_pixel_values."
                )
            normal, source = self._leave_one_out(bank, features, bank_inputs), "leave_one_out"
        anomalous = None
        if anomalous_pixel_values is not None:
            anomalous = self._score_in_batches(
                anomalous_pixel_values, bank, batch_size, "anomalous_pixel_values"
            )
        elif anomalous_masks is not None:
            raise ValueError("anomalous_masks were given without anomalous_pixel_values.")
        calibration = fit_calibration(
            normal.image_scores,
            normal.anomaly_maps,
            None if anomalous is None else anomalous.image_scores,
            None if anomalous is None else anomalous.anomaly_maps,
            anomalous_masks,
            normal_source=source,
            false_alarm_rate=false_alarm_rate,
        )
        if calibration.false_alarm_bound is not None and calibration.false_alarm_bound > false_alarm_rate:
            warnings.warn(
                f"{calibration.num_normal} normal scores cannot guarantee a false-alarm rate of "
                f"{false_alarm_rate:.1%}: the threshold (their maximum) guarantees "
                f"{calibration.false_alarm_bound:.1%}. Give at least {math.ceil(1 / false_alarm_rate) - 1} "
                "normal images for the rate asked.",
                stacklevel=3,  # the caller of calibrate, past torch.no_grad's wrapper
            )
        return dataclasses.replace(reference_bank, calibration=calibration)

    def _score_in_batches(
        self, pixel_values: torch.Tensor, bank: ReferenceBank, batch_size: int, name: str
    ) -> AnomalyDetectionOutput:
        outputs = [
            self.score_features(self.encode_images(pixel_values[start : start + batch_size], name), bank)
            for start in range(0, max(len(pixel_values), 1), batch_size)
        ]
        return _concatenated(outputs)

    def leave_one_out_refusal(self, num_references: int) -> str | None:
        """Why `calibrate` cannot score `num_references` references leave-one-out; None when it can."""
        if self.saves_its_references:
            return (
                f"{type(self).__name__} keeps what it learnt from its normal images in its weights, so none can "
                "be left out (it would be refitted once per reference)"
            )
        if num_references < 2:
            return f"leave-one-out needs at least 2 reference images, got {num_references}"
        return None

    def _leave_one_out(
        self, bank: ReferenceBank, features: dict[str, torch.Tensor], bank_inputs: dict | None
    ) -> AnomalyDetectionOutput:
        """Each reference scored against a bank built from the others, with `bank`'s `validated_tensors`."""
        k = next(iter(features.values())).shape[0]
        refusal = self.leave_one_out_refusal(k)
        if refusal is not None:
            raise ValueError(f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal_pixel_values.")
        if self.needs_anomalous_references and bank_inputs is None:
            raise ValueError(
                f"{type(self).__name__} builds its bank with anomalous references too: pass the arguments the "
                "bank was built with (anomalous_pixel_values or anomalous_features, anomalous_masks) in "
                "bank_inputs ({} if it had none), or give held-out normal_pixel_values."
            )
        outputs, bank_inputs = [], bank_inputs or {}
        for index in range(k):
            others = {
                name: torch.cat([tensor[:index], tensor[index + 1 :]]) for name, tensor in features.items()
            }
            rebuilt = self.build_reference_bank(
                class_name=bank.class_name, reference_features=others, **bank_inputs
            )
            validated = {name: bank.tensors[name] for name in self.validated_tensors if name in bank.tensors}
            left_out_bank = dataclasses.replace(bank, k=k - 1, tensors=rebuilt.tensors | validated)
            left_out = {name: tensor[index : index + 1] for name, tensor in features.items()}
            outputs.append(self.score_features(left_out, left_out_bank))
        return _concatenated(outputs)

    def resolve_bank(self, reference_bank: ReferenceBank | None) -> ReferenceBank:
        """The bank to score with: `reference_bank` checked against this model (`check_bank`), or without one
        the method's default, `build_reference_bank()` (zero-shot with `config.default_class_name`, or the
        fitted category). Methods that cannot score without references use `require_bank`."""
        if reference_bank is not None:
            return self.check_bank(reference_bank)
        return self.build_reference_bank()

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

    def config_hash(self) -> str:
        """Fingerprint of the config, the backbone's projections and every trained weight (a method's own
        layers, LoRA); a reference bank only fits a matching model. Recomputed only when a weight changed."""
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

    def make_bank(self, class_name: str, k: int, tensors: dict[str, torch.Tensor]) -> ReferenceBank:
        """A bank of `tensors`. Its memories (`memory_prefixes`) are kept whole (exact search) unless
        `config.max_memory_items` is set: then a larger one is thinned to a greedy k-center coreset of that
        size, with a warning naming the memory and both sizes."""
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
        return ReferenceBank(self.config.model_type, self.config_hash(), class_name, k, kept)

    def require_bank(self, bank: ReferenceBank | None, how: str) -> ReferenceBank:
        """`check_bank` for methods that cannot score without a bank; `how` says in the error how to build one."""
        if bank is None:
            raise ValueError(f"{type(self).__name__} needs a reference bank {how}")
        return self.check_bank(bank)

    def check_bank(self, bank: ReferenceBank) -> ReferenceBank:
        """Raise a clear error when `bank` was built by another model type or config; else the bank on our device."""
        if not isinstance(bank, ReferenceBank):
            raise TypeError(f"reference_bank must be a ReferenceBank, got {type(bank).__name__}.")
        if bank.model_type != self.config.model_type:
            raise ValueError(
                f"This reference bank was built by a '{bank.model_type}' model, but this model is "
                f"'{self.config.model_type}'. Rebuild the bank with `model.build_reference_bank(...)`."
            )
        # While a graph is exported the weights are symbolic: `hf_fsad.export` checks the bank before it traces.
        expected = bank.config_hash if torch.compiler.is_exporting() else self.config_hash()
        if bank.config_hash != expected:
            raise ValueError(
                f"This reference bank was built by a '{bank.model_type}' model with another config or backbone "
                f"(bank hash {bank.config_hash}, model hash {expected}). Rebuild it with this model."
            )
        return bank.to(self.device)


def _concatenated(outputs: list[AnomalyDetectionOutput]) -> AnomalyDetectionOutput:
    """Image scores and maps of several outputs, on the CPU."""
    maps = [output.anomaly_maps for output in outputs]
    return AnomalyDetectionOutput(
        image_scores=torch.cat([output.image_scores.float().cpu() for output in outputs]),
        anomaly_maps=None if maps[0] is None else torch.cat([part.float().cpu() for part in maps]),
    )
