"""The reference bank: a method's k-shot "prompt" as tensors, its safetensors file format and its checks.

A bank fits only the model that built it: `ReferenceBank.check_built_by` compares the model type and config
hash it records with a model's (`FsadPreTrainedModel.checked_bank` calls it with its own). Building a bank
is the model's work (`build_reference_bank`, `bank_from_tensors` in `hf_fsad.modeling_base`); this module
knows no model.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .calibration import Calibration
from .tiling import Tiling

# The `format` and `format_version` a bank file records in its safetensors metadata. `load` reads every
# version up to this one and refuses a later one. 2: the calibration carries its own format version (2).
BANK_FORMAT = "hf_fsad.reference_bank"
BANK_FORMAT_VERSION = "2"


@dataclass
class ReferenceBank:
    """A method's k-shot "prompt": reference features and text embeddings, saved as safetensors.

    Build one with `model.build_reference_bank(...)`; it only fits the model type and config that built it.
    `model.calibrate(bank, ...)` adds a `calibration` (thresholds and score normalisation), saved with it.
    `generated_references`: how many of its k references were generated from the others (One-to-Normal's
    `augment_references_with_generated`); leave-one-out is refused while it holds any, since a left-out
    image's generated copies stay in the bank.
    `tiling`: how the references were cut into tiles (`hf_fsad.tiled_scoring.build_tiled_bank`), which queries
    are cut the same way (`score_tiled`); a position-tiled bank holds one bank per tile position, its tensors
    named `position.<index>.<name>`. A model refuses a tiled bank in `forward`: score it tiled.
    """

    model_type: str
    config_hash: str
    class_name: str
    k: int
    tensors: dict[str, torch.Tensor]
    calibration: Calibration | None = None
    generated_references: int = 0
    tiling: Tiling | None = None

    def save(self, path: str | os.PathLike) -> None:
        """Write the bank to one `.safetensors` file (atomically)."""
        path = Path(path)
        metadata = {
            "format": BANK_FORMAT,
            "format_version": BANK_FORMAT_VERSION,
            "model_type": self.model_type,
            "config_hash": self.config_hash,
            "class_name": self.class_name,
            "k": str(self.k),
            "generated_references": str(self.generated_references),
        }
        if self.calibration is not None:
            metadata["calibration"] = self.calibration.to_json()
        if self.tiling is not None:
            metadata["tiling"] = self.tiling.to_json()
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors.items()}
        temporary = path.with_name(path.name + ".tmp")
        save_file(tensors, temporary, metadata=metadata)
        os.replace(temporary, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> ReferenceBank:
        """Read a bank written by `save` in this or an earlier format version; a ValueError says why a file
        is not one, or names both versions when it is of a later one."""
        if not Path(path).is_file():
            raise ValueError(f"Reference bank {path} does not exist.")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = handle.metadata() or {}
        except SafetensorError as error:
            raise ValueError(
                f"{path} is not an hf_fsad reference bank (not a safetensors file: {error})."
            ) from None
        if metadata.get("format") != BANK_FORMAT:
            raise ValueError(f"{path} is not an hf_fsad reference bank (no bank metadata in the file).")
        version = metadata.get("format_version", "1")
        if not version.isdecimal():
            raise ValueError(
                f"Reference bank {path}: format_version must be a positive integer, got {version!r}."
            )
        if int(version) > int(BANK_FORMAT_VERSION):
            raise ValueError(
                f"Reference bank {path} is in format version {version}, but this hf_fsad reads bank format "
                f"versions up to {BANK_FORMAT_VERSION}: upgrade hf_fsad to load it."
            )
        calibration = tiling = None
        try:
            if "calibration" in metadata:
                calibration = Calibration.from_json(metadata["calibration"])
            if "tiling" in metadata:
                tiling = Tiling.from_json(metadata["tiling"])
        except (TypeError, ValueError) as error:
            raise ValueError(f"Reference bank {path}: {error}") from None
        return cls(
            model_type=metadata["model_type"],
            config_hash=metadata["config_hash"],
            class_name=metadata["class_name"],
            k=int(metadata["k"]),
            tensors=load_file(str(path)),
            calibration=calibration,
            generated_references=int(metadata.get("generated_references", "0")),  # version 1 wrote none
            tiling=tiling,
        )

    def to(self, device: torch.device | str) -> ReferenceBank:
        tensors = {name: tensor.to(device) for name, tensor in self.tensors.items()}
        return dataclasses.replace(self, tensors=tensors)

    def check_built_by(self, model_type: str, config_hash: str) -> None:
        """Raise a ValueError naming the mismatch unless a `model_type` model whose `config_hash()` is
        `config_hash` built this bank."""
        if self.model_type != model_type:
            raise ValueError(
                f"This reference bank was built by a '{self.model_type}' model, but this model is "
                f"'{model_type}'. Rebuild the bank with `model.build_reference_bank(...)`."
            )
        if self.config_hash != config_hash:
            raise ValueError(
                f"This reference bank was built by a '{self.model_type}' model with another config or backbone "
                f"(bank hash {self.config_hash}, model hash {config_hash}). Rebuild it with this model."
            )
