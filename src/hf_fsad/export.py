"""Export a method with its reference bank into one ONNX or OpenVINO graph, for runtimes without PyTorch.

The graph maps preprocessed `pixel_values` (B, 3, S, S), any batch size, to `image_scores` (B,) and, for
methods with maps, `anomaly_maps` (B, S, S); the bank (reference features, text embeddings) is baked in as
constants. Beside it: `hf_fsad_export.json` (the image processor's settings, the method, the bank's class and
calibration, the output names) and `run_exported.py` with `image_files.py`, a runner that needs only numpy,
Pillow and onnxruntime or openvino. A method whose scoring is not one fixed graph says why in its class's
`export_refusal`.

A tiled bank (`hf_fsad.tiled_scoring`) exports as preprocessing around the same fixed-size graph: the graph
holds the bank a tile is scored against (`tile_bank`), the manifest the `Tiling`, and the runner cuts, scores
and stitches (numpy; `tiling.py` is shipped beside it). A position tiling's graph holds every position's bank
and takes the tile's position as a second input, `tile_position` (1,) int64: the tensors all positions share
are constants, those that differ are stacked (P, ...) and the position picks its slice (docs/export.md).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import os
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
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

EXPORT_FORMATS = ("onnx", "openvino")
MODEL_FILES = {"onnx": "model.onnx", "openvino": "model.xml"}
# What the runner needs beside it: itself, the file reading and result format it shares with hf_fsad.io, and
# the tile geometry and stitching it shares with hf_fsad.tiled_scoring.
RUNNER_MODULES = (run_exported, image_files, regions, tiling)
INPUT_NAME = "pixel_values"
# A position tiling's second graph input: the index of the tile's position in `Tiling.boxes`.
POSITION_INPUT_NAME = "tile_position"
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
    "position_banks",
]


class BankScorer(nn.Module):
    """`model` scoring against a fixed `bank`: pixel values -> (image scores, anomaly maps), the graph exported.

    With `position_tensors` (a position tiling's bank tensors that differ between tile positions, stacked
    (P, ...) by `position_banks`) it also takes `tile_position` (1,) int64 and scores against that position's
    bank: `bank`'s tensors (those every position shares) with the position's slice of each stacked tensor.
    """

    def __init__(
        self,
        model: FsadPreTrainedModel,
        bank: ReferenceBank,
        position_tensors: dict[str, torch.Tensor] | None = None,
    ):
        super().__init__()
        self.model = model
        self.bank = bank
        self.position_tensors = position_tensors or {}

    def forward(
        self, pixel_values: torch.Tensor, tile_position: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        bank = self.bank
        if self.position_tensors:
            picked = {
                name: stacked.index_select(0, tile_position)[0]
                for name, stacked in self.position_tensors.items()
            }
            bank = dataclasses.replace(bank, tensors=bank.tensors | picked)
        output = self.model.score_features(self.model.encode_images(pixel_values), bank)
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
    atomically. Returns `out_dir`. A tiled bank exports its tiles' bank into the graph (a position tiling: every
    position's, picked by the `tile_position` input, see `position_banks`) and its tiling and calibration into
    the manifest.

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
    if precision == "int8" and bank is not None and bank.tiling is not None and bank.tiling.mode != "pooled":
        raise ValueError(
            "An int8 export of a position-tiled bank is not supported: its quantiser is calibrated on pixel "
            "values alone, and this graph also takes the tile's position; export it in float32, or tile pooled."
        )
    check_exportable(model)
    model = model.eval()
    # checked against the model here: the traced graph cannot hash weights
    position_tensors = {}
    if bank is None or bank.tiling is None:
        bank = graph_bank = model.bank_or_default(bank)
    elif bank.tiling.mode == "pooled":
        graph_bank = model.checked_bank(tile_bank(bank, 0))
    else:
        graph_bank, position_tensors = position_banks(model, bank)
        graph_bank = model.checked_bank(graph_bank)
        position_tensors = {name: value.to(model.device) for name, value in position_tensors.items()}
    scorer = BankScorer(model, graph_bank, position_tensors).eval()
    size = model.config.image_size
    example = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0)).to(model.device)
    examples, input_names = (example,), [INPUT_NAME]
    dynamic_shapes = {INPUT_NAME: {0: torch.export.Dim("batch")}}
    if position_tensors:
        examples += (torch.zeros(1, dtype=torch.int64, device=model.device),)
        input_names.append(POSITION_INPUT_NAME)
        dynamic_shapes[POSITION_INPUT_NAME] = None
    with torch.no_grad():
        output_names = ["image_scores", "anomaly_maps"][: len(scorer(*examples))]
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as folder:
        onnx_path = folder / MODEL_FILES["onnx"]
        with torch.no_grad():
            torch.onnx.export(
                scorer,
                examples,
                str(onnx_path),
                dynamo=True,
                input_names=input_names,
                output_names=output_names,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        _check_dynamic_batch(onnx_path)
        int8 = None
        if precision == "int8":
            pixel_values = _quantization_pixels(model, bank, quantization_images)
            max_int8_error = quantization.DEFAULT_MAX_INT8_ERROR if max_int8_error is None else max_int8_error
            int8 = _quantize(onnx_path, format, pixel_values, output_names, max_int8_error, strict_precision)
        elif format == "openvino":
            import openvino

            _save_openvino(openvino.convert_model(str(onnx_path)), folder)
        if format == "openvino":
            onnx_path.unlink()
            onnx_path.with_name(onnx_path.name + ".data").unlink(missing_ok=True)
        manifest = _manifest(model, bank, MODEL_FILES[format], input_names, output_names, int8)
        atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2) + "\n")
        for module in RUNNER_MODULES:
            shutil.copyfile(module.__file__, folder / Path(module.__file__).name)
    return out_dir


def position_banks(
    model: FsadPreTrainedModel, bank: ReferenceBank
) -> tuple[ReferenceBank, dict[str, torch.Tensor]]:
    """A position-tiled `bank` as one graph holds it: (the untiled bank of the tensors every position shares,
    the tensors that differ between positions stacked (P, ...) in `Tiling.boxes` order).

    Stacking needs one shape at every position. A nearest-neighbour memory (`model.memory_prefixes`) may hold
    more items at one position than at another (the anomalous memory's defect-free tiles of its anomalous
    references join their own position's memory): the smaller ones repeat their first item up to the largest,
    which changes no score, since a repeated item is no nearer than itself. Any other difference in shape is
    refused with why.
    """
    tiling = bank.tiling
    banks = [tile_bank(bank, position) for position in range(len(tiling.boxes(*tiling.image_size)))]
    shared, stacked = {}, {}
    for name, first in banks[0].tensors.items():
        values = [position_bank.tensors[name] for position_bank in banks]
        if all(torch.equal(first, value) for value in values[1:]):
            shared[name] = first
        else:
            stacked[name] = torch.stack(_of_one_shape(model, name, values))
    return dataclasses.replace(banks[0], tensors=shared), stacked


def _of_one_shape(model: FsadPreTrainedModel, name: str, values: list[torch.Tensor]) -> list[torch.Tensor]:
    """The tensor `name` of every position at one shape (`position_banks`)."""
    if len({value.shape for value in values}) == 1:
        return values
    rows = max(len(value) for value in values)
    if (
        name.startswith(model.memory_prefixes)
        and len({value.shape[1:] for value in values}) == 1
        and min(len(value) for value in values) > 0
    ):
        return [torch.cat([value, value[:1].expand(rows - len(value), *value.shape[1:])]) for value in values]
    shapes = sorted({tuple(value.shape) for value in values})
    raise ValueError(
        f"The position-tiled bank's tensor {name!r} has shapes {shapes} at different tile positions, which one "
        "fixed-size graph cannot stack (a memory empty at some positions only changes which scores count "
        "there): build a pooled tiled bank, or score with hf_fsad."
    )


def _save_openvino(model, folder: Path) -> None:
    import openvino

    # f32 weights: OpenVINO's default compresses them to f16, which moves the scores
    openvino.save_model(model, str(folder / MODEL_FILES["openvino"]), compress_to_fp16=False)


def _quantization_pixels(
    model: FsadPreTrainedModel, bank: ReferenceBank, images: Sequence[Image.Image]
) -> np.ndarray:
    """(N, 3, S, S) float32 pixel values of what the graph will see of `images` (a tiled `bank`'s tiles, else
    the images) and, when those are fewer than `QUANTIZATION_IMAGES`, of views generated from them
    (`augment_views`, seeded, spread evenly) up to that many."""
    seen = [image.convert("RGB") for image in images]
    if bank.tiling is not None:
        seen = [
            tile
            for image in seen
            for tile in tiling.crop_tiles(image, bank.tiling.boxes(image.height, image.width))
        ]
    missing = max(QUANTIZATION_IMAGES - len(seen), 0)
    views = []
    for index, image in enumerate(seen):
        share = missing // len(seen) + (index < missing % len(seen))
        if share:
            views += augment_views(image, share, seed=index)
    return model.image_processor()(seen + views, return_tensors="np").pixel_values.astype(np.float32)


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
    """Scores as `model(pixel_values, reference_bank=bank)` does, on the graph `cached_export` made of them; a
    tiled bank scores whole images as `score_tiled` does, with `ExportedScorer.score_tiled`.

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
        # a tiled bank is checked as `export_model` bakes it in
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
        self.bank = bank if bank is not None and bank.tiling is not None else model.bank_or_default(bank)
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
        if self.bank.tiling is not None:
            raise ValueError(
                "ExportedScorer scores preprocessed pixel values with an untiled bank; a tiled bank scores whole "
                "images: use `ExportedScorer.score_tiled(image)`."
            )
        outputs = self.exported(pixel_values.detach().float().cpu().numpy())
        return self._output(outputs["image_scores"], outputs.get("anomaly_maps"))

    def score_tiled(self, image: Image.Image, batch_size: int = 8) -> AnomalyDetectionOutput:
        """One RGB `image` scored with the tiled bank's export as `hf_fsad.tiled_scoring.score_tiled` scores it
        (`ExportedModel.score_tiled`, `batch_size` tiles a forward pass): (1,) score, (1, H, W) map."""
        if self.bank.tiling is None:
            raise ValueError("score_tiled scores with a tiled bank; this one is not tiled.")
        outputs = self.exported.score_tiled(image, batch_size)
        maps = outputs.get("anomaly_maps")
        return self._output(np.reshape(outputs["image_scores"], 1), None if maps is None else maps[None])

    def _output(self, scores: np.ndarray, maps: np.ndarray | None) -> AnomalyDetectionOutput:
        output = AnomalyDetectionOutput(
            image_scores=torch.from_numpy(scores),
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
    input_names: list[str],
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
        # a position tiling's graph only: the tile's position in `Tiling.boxes`, (1,) int64
        "position_input_name": POSITION_INPUT_NAME if POSITION_INPUT_NAME in input_names else None,
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
