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
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from . import __version__, quantization, tiling
from .augmentation import augment_views
from .bank import ReferenceBank
from .calibration import apply_calibration
from .calibration_inputs import image_digest
from .deploy import image_files, regions, run_exported
from .deploy.run_exported import MANIFEST_FILE, MANIFEST_FORMAT, PRECISIONS, RUNTIMES, ExportedModel
from .deprecation import Replaced, moved_names
from .io import atomic_directory, atomic_write_text
from .modeling_base import FsadPreTrainedModel
from .modeling_outputs import AnomalyDetectionOutput
from .registry import METHODS
from .tiled_scoring import tile_bank

if TYPE_CHECKING:
    from PIL import Image

EXPORT_FORMATS = ("onnx", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# What the runner needs beside it: itself, the file reading and result format it shares with hf_fsad.io, and
# the tile geometry and stitching it shares with hf_fsad.tiled_scoring.
RUNNER_MODULES = (run_exported, image_files, regions, tiling)
INPUT_NAME = "pixel_values"
# What scores: PyTorch (the reference) or an exported graph on one of the fused runtimes.
SCORING_RUNTIMES = ("torch", *RUNTIMES)
# What an export holds: float32 (OpenVINO may compute it in bfloat16 at run time) or an int8-quantised graph.
EXPORT_PRECISIONS = ("float32", "int8")
# The images an int8 export calibrates its quantiser on: the references, topped up with views generated from
# them (`augment_views`) to this many; the references alone are too few, and their scores against the bank
# that holds them are all near zero, where views are not.
QUANTIZATION_IMAGES = 8
__all__ = [
    "EXPORT_FORMATS",
    "EXPORT_PRECISIONS",
    "QUANTIZATION_IMAGES",
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
    precision: str = "float32",
    quantization_images: Sequence[Image.Image] | None = None,
    max_int8_error: float | None = None,
    strict_precision: bool = False,
) -> Path:
    """Write `model` scoring against `bank` (None: the method's default bank, `bank_or_default`) to `out_dir` as
    one ONNX graph (`format="onnx"`) or OpenVINO IR (`"openvino"`: model.xml + model.bin, float32), with the
    manifest JSON and the runner (`run_exported.py`, `image_files.py`, `regions.py` and `tiling.py`). The folder is replaced
    atomically. Returns `out_dir`. A pooled tiled bank exports its tiles' bank into the graph and its tiling
    and calibration into the manifest; a position tiled bank is refused (see the module docstring).

    The graph computes what `model(pixel_values, reference_bank=bank)` does in float32 (the parity tests hold
    it to 1e-4); it does not check pixel values for NaN as the PyTorch model does.

    `precision="int8"` quantises the encoder's weight products (`hf_fsad.quantization`), calibrated on
    `quantization_images` (the bank's references; topped up with generated views to `QUANTIZATION_IMAGES`),
    and measures the int8 outputs against float32 on them (`quantization.int8_error`, recorded in the
    manifest's `int8`). Above `max_int8_error` (None: `quantization.DEFAULT_MAX_INT8_ERROR`) it warns and writes the float32 graph (the manifest's precision
    says which), or with `strict_precision` raises a ValueError.
    """
    if format not in EXPORT_FORMATS:
        raise ValueError(f"Unknown export format {format!r}; choose from {EXPORT_FORMATS}.")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(
            f"Unknown export precision {precision!r}; choose from {EXPORT_PRECISIONS} (bfloat16 is chosen "
            "when a float32 export runs, on OpenVINO)."
        )
    if precision == "int8" and not quantization_images:
        raise ValueError(
            "An int8 export calibrates its quantiser on images: give the bank's reference images."
        )
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
        int8 = None
        if precision == "int8":
            pixel_values = _quantization_pixels(model, quantization_images)
            max_int8_error = quantization.DEFAULT_MAX_INT8_ERROR if max_int8_error is None else max_int8_error
            int8 = _quantize(onnx_path, format, pixel_values, output_names, max_int8_error, strict_precision)
        elif format == "openvino":
            import openvino

            _save_openvino(openvino.convert_model(str(onnx_path)), folder)
        if format == "openvino":
            onnx_path.unlink()
            onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
        manifest = _manifest(model, bank, MODEL_FILES[format], output_names, int8)
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        for module in RUNNER_MODULES:
            shutil.copyfile(module.__file__, folder / Path(module.__file__).name)
    return out_dir


def _save_openvino(model, folder: Path) -> None:
    import openvino

    # f32 weights: OpenVINO's default compresses them to f16, which moves the scores
    openvino.save_model(model, str(folder / MODEL_FILES["openvino"]), compress_to_fp16=False)


def _quantization_pixels(model: FsadPreTrainedModel, images: Sequence[Image.Image]) -> np.ndarray:
    """(N, 3, S, S) float32 pixel values of `images` and, when they are fewer than `QUANTIZATION_IMAGES`, of
    views generated from them (`augment_views`, seeded) up to that many."""
    images = [image.convert("RGB") for image in images]
    missing = max(QUANTIZATION_IMAGES - len(images), 0)
    for index, image in enumerate(images[:missing]):
        share = missing // len(images) + (index < missing % len(images))
        images = images + augment_views(image, share, seed=index)
    if missing and len(images) < QUANTIZATION_IMAGES:  # fewer references than views per reference
        images += augment_views(images[0], QUANTIZATION_IMAGES - len(images), seed=len(images))
    return model.image_processor()(images, return_tensors="np").pixel_values.astype(np.float32)


def _quantize(
    onnx_path: Path,
    format: str,
    pixel_values: np.ndarray,
    output_names: list[str],
    max_error: float,
    strict: bool,
) -> dict:
    """Quantise the float32 graph at `onnx_path` for `format` in place (ONNX: the file; OpenVINO: model.xml
    beside it) when its error on `pixel_values` is within `max_error`, else write the float32 graph (a warning;
    `strict`: a ValueError). Returns the manifest's `int8` record: errors, bound, images, quantised nodes,
    and whether it fell back to float32."""
    folder = onnx_path.parent
    if format == "onnx":
        import onnxruntime

        int8_path = folder / "model.int8.onnx"
        nodes = quantization.quantize_onnx(onnx_path, int8_path, pixel_values, INPUT_NAME)

        def runner(path: Path):
            session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            return lambda pixels: dict(zip(output_names, session.run(output_names, {INPUT_NAME: pixels})))

        float_run, int8_run = runner(onnx_path), runner(int8_path)
    else:
        import openvino

        float_model, int8_model, nodes = quantization.quantize_openvino(onnx_path, pixel_values)

        def runner(model):
            compiled = openvino.Core().compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
            return lambda pixels: {
                name: np.array(value) for name, value in zip(output_names, compiled(pixels).to_tuple())
            }

        float_run, int8_run = runner(float_model), runner(int8_model)
    errors = quantization.int8_error(
        quantization.outputs_of(float_run, pixel_values), quantization.outputs_of(int8_run, pixel_values)
    )
    fallback = max(errors.values()) > max_error
    record = {
        "errors": errors,
        "max_error": max_error,
        "calibration_images": len(pixel_values),
        "quantized_nodes": len(nodes),
        "fell_back_to_float32": fallback,
    }
    if fallback:
        message = (
            f"int8 error {max(errors.values()):.3g} (share of the float32 outputs' spread on {len(pixel_values)} "
            f"calibration images: {errors}) exceeds the bound {max_error}"
        )
        if strict:
            raise ValueError(f"{message}; not exported (without strict precision it falls back to float32).")
        warnings.warn(f"{message}: exporting float32 instead.", stacklevel=3)
    if format == "onnx":
        if not fallback:
            os.replace(int8_path, onnx_path)
            onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
        int8_path.unlink(missing_ok=True)
    else:
        _save_openvino(float_model if fallback else int8_model, folder)
    return record


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
    precision: str = "float32",
    quantization_images: Sequence[Image.Image] | None = None,
) -> Path:
    """The export folder of `model` scoring against `bank` for `runtime` ("onnxruntime": ONNX, "openvino": IR),
    exported on first use and reused after: it lives under `cache_dir` (default `~/.cache/hf_fsad/exports`)
    in a folder named by the model (`config_hash`, `feature_key`), the bank (its tensors, class and
    calibration) and the versions of hf_fsad, torch and the runtime, so a change to any of them exports anew.
    `precision="int8"`: the int8 export (`export_model`) calibrated on `quantization_images`, keyed by them too
    and by the quantiser's version, in a folder of its own."""
    if runtime not in RUNTIMES:
        raise ValueError(f"Unknown runtime {runtime!r}; choose from {RUNTIMES}.")
    if precision not in EXPORT_PRECISIONS:
        raise ValueError(f"Unknown export precision {precision!r}; choose from {EXPORT_PRECISIONS}.")
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
    suffix = ""
    if precision == "int8":
        quantizer = "nncf" if runtime == "openvino" else "onnxruntime"
        digest.update(f"int8 {importlib.import_module(quantizer).__version__}".encode())
        for image in quantization_images or ():
            digest.update(image_digest(image).encode())
        suffix = "-int8"
    cache_dir = Path(cache_dir or Path.home() / ".cache" / "hf_fsad" / "exports")
    folder = cache_dir / f"{model.config.model_type}-{runtime}{suffix}-{digest.hexdigest()[:16]}"
    if not (folder / MANIFEST_FILE).is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        export_format = "openvino" if runtime == "openvino" else "onnx"
        export_model(model, bank, folder, export_format, precision, quantization_images)
    return folder


class ExportedScorer:
    """Scores as `model(pixel_values, reference_bank=bank)` does, on the graph `cached_export` made of them.

    runtime: "onnxruntime" or "openvino"; precision: "float32" (default: PyTorch's numerics within 1e-4),
    "bfloat16" (OpenVINO computing the float32 graph in bf16) or "int8" (the int8 export, calibrated on
    `quantization_images`; where its error was above the bound it is the float32 graph, with a warning). The
    output has `image_scores`, `anomaly_maps` and, with a calibrated bank, the calibrated decisions
    (`apply_calibration`); `branch_scores` is empty: the graph returns the final scores only.
    """

    def __init__(
        self,
        model: FsadPreTrainedModel,
        bank: ReferenceBank | None,
        runtime: str = "onnxruntime",
        precision: str = "float32",
        cache_dir: str | os.PathLike | None = None,
        quantization_images: Sequence[Image.Image] | None = None,
    ):
        check_exportable(model)
        if bank is not None and bank.tiling is not None:
            raise ValueError(
                "ExportedScorer scores preprocessed pixel values; a tiled bank scores whole images: use the "
                "export's runner (`run_exported.ExportedModel.score_tiled`) or hf_fsad's `score_tiled`."
            )
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
        self.bank = model.bank_or_default(bank)
        export_precision = "int8" if precision == "int8" else "float32"
        folder = cached_export(model, self.bank, runtime, cache_dir, export_precision, quantization_images)
        self.exported = ExportedModel(folder, runtime, None if precision == "int8" else precision)
        int8 = self.exported.manifest.get("int8")
        if int8 is not None and int8["fell_back_to_float32"]:
            warnings.warn(
                f"The int8 export of {model.config.model_type} scores in float32: its int8 error {int8['errors']} "
                f"was above the bound {int8['max_error']} ({folder}).",
                stacklevel=2,
            )

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
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    model_file: str,
    output_names: list[str],
    int8: dict | None = None,
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
        "precision": "int8" if int8 is not None and not int8["fell_back_to_float32"] else "float32",
        "int8": int8,
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
