"""Export a method with its reference bank into one ONNX or OpenVINO graph, for runtimes without PyTorch.

The graph maps preprocessed `pixel_values` (B, 3, S, S), any batch size, to `image_scores` (B,) and, for
methods with maps, `anomaly_maps` (B, S, S); the bank (reference features, text embeddings) is baked in as
constants. Beside it: `hf_fsad_export.json` (the image processor's settings, the method, the bank's class and
calibration, the output names) and `run_exported.py` with `image_files.py`, a runner that needs only numpy,
Pillow and onnxruntime or openvino. A method whose scoring is not one fixed graph says why in its class's
`export_refusal`.

A tiled bank (`hf_fsad.tiled_scoring`) exports as preprocessing around the same fixed-size graph: the graph
holds the bank a tile is scored against (`tile_bank`), the manifest the `Tiling`, and the runner cuts, scores
and stitches (numpy; `tiling.py` is shipped beside it). Pooled tilings only: a position tiling compares each
tile with its own position's bank, which one graph with one baked-in bank cannot (docs/export.md).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import __version__, tiling
from .bank import ReferenceBank
from .calibration import apply_calibration
from .deploy import image_files, regions, run_exported
from .deploy.run_exported import MANIFEST_FILE, MANIFEST_FORMAT, RUNTIMES, ExportedModel
from .deprecation import Replaced, moved_names
from .io import atomic_directory, atomic_write_text
from .modeling_base import FsadPreTrainedModel
from .modeling_outputs import AnomalyDetectionOutput
from .registry import METHODS
from .tiled_scoring import tile_bank

EXPORT_FORMATS = ("onnx", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# What the runner needs beside it: itself, the file reading and result format it shares with hf_fsad.io, and
# the tile geometry and stitching it shares with hf_fsad.tiled_scoring.
RUNNER_MODULES = (run_exported, image_files, regions, tiling)
INPUT_NAME = "pixel_values"
# What scores: PyTorch (the reference) or an exported graph on one of the fused runtimes.
SCORING_RUNTIMES = ("torch", *RUNTIMES)
__all__ = [
    "EXPORT_FORMATS",
    "SCORING_RUNTIMES",
    "BankScorer",
    "ExportedModel",
    "ExportedScorer",
    "cached_export",
    "check_exportable",
    "export_model",
]


class BankScorer(nn.Module):
    """`model` scoring against a fixed `bank`: pixel values -> (image scores, anomaly maps), the graph exported."""

    def __init__(self, model: FsadPreTrainedModel, bank: ReferenceBank):
        super().__init__()
        self.model = model
        self.bank = bank

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, ...]:
        output = self.model.score_features(self.model.encode_images(pixel_values), self.bank)
        return (
            (output.image_scores,)
            if output.anomaly_maps is None
            else (output.image_scores, output.anomaly_maps)
        )


def export_model(
    model: FsadPreTrainedModel,
    bank: ReferenceBank | None,
    out_dir: str | os.PathLike,
    format: str = "onnx",
) -> Path:
    """Write `model` scoring against `bank` (None: the method's default bank, `bank_or_default`) to `out_dir` as
    one ONNX graph (`format="onnx"`) or OpenVINO IR (`"openvino"`: model.xml + model.bin, float32), with the
    manifest JSON and the runner (`run_exported.py`, `image_files.py`, `regions.py` and `tiling.py`). The folder is replaced
    atomically. Returns `out_dir`. A pooled tiled bank exports its tiles' bank into the graph and its tiling
    and calibration into the manifest; a position tiled bank is refused (see the module docstring).

    The graph computes what `model(pixel_values, reference_bank=bank)` does in float32 (the parity tests hold
    it to 1e-4); it does not check pixel values for NaN as the PyTorch model does.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose from {EXPORT_FORMATS}.")
    check_exportable(model)
    model = model.eval()
    # checked against the model here: the traced graph cannot hash weights
    if bank is None or bank.tiling is None:
        bank = graph_bank = model.bank_or_default(bank)
    else:
        graph_bank = model.checked_bank(_tiles_bank(bank))
    scorer = BankScorer(model, graph_bank).eval()
    size = model.config.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
    with torch.no_grad():
        output_names = ["image_scores", "anomaly_maps"][: len(scorer(example))]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as folder:
        onnx_path = folder / MODEL_FILES["onnx"]
        with torch.no_grad():
            torch.onnx.export(
                scorer,
                (example,),
                str(onnx_path),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=output_names,
                dynamic_shapes={INPUT_NAME: {0: torch.export.Dim("batch")}},
                verbose=False,
            )
        _check_dynamic_batch(onnx_path)
        if format == "openvino":
            import openvino

            # f32 weights: OpenVINO's default compresses them to f16, which moves the scores
            openvino.save_model(
                openvino.convert_model(str(onnx_path)),
                str(folder / MODEL_FILES["openvino"]),
                compress_to_fp16=False,
            )
            onnx_path.unlink()
            onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
        manifest = _manifest(model, bank, MODEL_FILES[format], output_names)
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        for module in RUNNER_MODULES:
            shutil.copyfile(module.__file__, folder / Path(module.__file__).name)
    return out_dir


def _tiles_bank(bank: ReferenceBank) -> ReferenceBank:
    """The untiled bank a tiled `bank`'s tiles are scored against, baked into the graph; a position tiling
    is refused with why."""
    if bank.tiling.mode != "pooled":
        raise ValueError(
            "A position-tiled bank does not export: each tile is scored against its own position's bank, and the "
            "exported graph holds one bank; build a pooled tiled bank, or score with hf_fsad (docs/export.md)."
        )
    return tile_bank(bank, 0)


def check_exportable(model: FsadPreTrainedModel) -> None:
    """Raise a ValueError saying why when `model`'s method does not export (its `export_refusal`)."""
    if model.export_refusal is not None:
        raise ValueError(f"{model.config.model_type} cannot be exported: {model.export_refusal}")


def cached_export(
    model: FsadPreTrainedModel,
    bank: ReferenceBank | None,
    runtime: str = "onnxruntime",
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """The export folder of `model` scoring against `bank` for `runtime` ("onnxruntime": ONNX, "openvino": IR),
    exported on first use and reused after: it lives under `cache_dir` (default `~/.cache/hf_fsad/exports`)
    in a folder named by the model (`config_hash`, `feature_key`), the bank (its tensors, class and
    calibration) and the versions of hf_fsad, torch and the runtime, so a change to any of them exports anew."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose from {RUNTIMES}.")
    if bank is None or bank.tiling is None:  # a tiled bank is checked as `export_model` bakes it in
        bank = model.bank_or_default(bank)
    runtime_version = importlib.import_module(runtime).__version__
    digest = hashlib.sha256()
    for part in (model.config_hash(), model.feature_key(), __version__, torch.__version__, runtime_version):
        digest.update(part.encode())
    digest.update(
        json.dumps(
            [
                bank.class_name,
                bank.k,
                bank.calibration and bank.calibration.to_json(),
                bank.tiling and bank.tiling.to_json(),
            ]
        ).encode()
    )
    for name, tensor in sorted(bank.tensors.items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "hf_fsad" / "exports")
    folder = cache_dir / f"{model.config.model_type}-{runtime}-{digest.hexdigest()[:16]}"
    if not (folder / MANIFEST_FILE).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        export_model(model, bank, folder, "openvino" if runtime == "openvino" else "onnx")
    return folder


class ExportedScorer:
    """Scores as `model(pixel_values, reference_bank=bank)` does, on the graph `cached_export` made of them.

    runtime: "onnxruntime" or "openvino"; precision: OpenVINO's "f32" (default: PyTorch's numerics within
    1e-4) or "bf16". The output has `image_scores`, `anomaly_maps` and, with a calibrated bank, the calibrated
    decisions (`apply_calibration`); `branch_scores` is empty: the graph returns the final scores only.
    """

    def __init__(
        self,
        model: FsadPreTrainedModel,
        bank: ReferenceBank | None,
        runtime: str = "onnxruntime",
        precision: str = "f32",
        cache_dir: str | os.PathLike | None = None,
    ):
        check_exportable(model)
        if bank is not None and bank.tiling is not None:
            raise ValueError(
                "ExportedScorer scores preprocessed pixel values; a tiled bank scores whole images: use the "
                "export's runner (`run_exported.ExportedModel.score_tiled`) or hf_fsad's `score_tiled`."
            )
        self.bank = model.bank_or_default(bank)
        self.exported = ExportedModel(cached_export(model, self.bank, runtime, cache_dir), runtime, precision)

    def __call__(self, pixel_values: torch.Tensor) -> AnomalyDetectionOutput:
        outputs = self.exported(pixel_values.detach().float().cpu().numpy())
        maps = outputs.get("anomaly_maps")
        output = AnomalyDetectionOutput(
            image_scores=torch.from_numpy(outputs["image_scores"]),
            anomaly_maps=None if maps is None else torch.from_numpy(maps),
            branch_scores={},
        )
        calibration = self.bank.calibration
        return output if calibration is None else apply_calibration(output, calibration)


def _check_dynamic_batch(onnx_path: Path) -> None:
    """Raise when the exporter fixed the batch size (it falls back to a static graph rather than fail)."""
    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    batch = graph.input[0].type.tensor_type.shape.dim[0]
    if not batch.dim_param:
        raise RuntimeError(
            f"The exported graph takes batches of {batch.dim_value} images only: some step of the method "
            "depends on the batch size in Python (a loop over chunks, a branch on a shape)."
        )


def _manifest(
    model: FsadPreTrainedModel, bank: ReferenceBank, model_file: str, output_names: list[str]
) -> dict:
    processor = model.image_processor().to_dict()
    processor["resample"] = int(processor["resample"])
    return {
        "format": MANIFEST_FORMAT,
        "format_version": "1",
        "model_file": model_file,
        "model_type": model.config.model_type,
        "config_hash": bank.config_hash,
        "class_name": bank.class_name,
        "k": bank.k,
        "input_name": INPUT_NAME,
        "output_names": output_names,
        "image_size": model.config.image_size,
        "image_processor": json.loads(json.dumps(processor)),
        "calibration": None if bank.calibration is None else json.loads(bank.calibration.to_json()),
        "tiling": None if bank.tiling is None else json.loads(bank.tiling.to_json()),
        "hf_fsad_version": __version__,
        "torch_version": torch.__version__,
    }


# Deprecated: the methods' own `export_refusal` flags replace the table.
__getattr__ = moved_names(
    __name__,
    {
        "NOT_EXPORTABLE": Replaced(
            "<model class>.export_refusal",
            lambda: {
                model_type: spec.model.export_refusal
                for model_type, spec in METHODS.items()
                if spec.model.export_refusal is not None
            },
        )
    },
)
