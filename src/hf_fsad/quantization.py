"""Post-training int8 quantisation of an exported graph, and the measure of what it costs the scores.

`hf-fsad export --precision int8` quantises the float32 graph `hf_fsad.export` wrote: with ONNX Runtime's
static quantiser (`quantize_onnx`) or with NNCF on the OpenVINO model (`quantize_openvino`), both calibrated
on the same preprocessed images (the model's references and views generated from them, `hf_fsad.export`).

Only the matrix products of the image encoder's weights are quantised: the query, key, value, output and MLP
projections of each transformer block (`ENCODER_MATMULS`). Everything else stays float32: the softmax over
attention rows and over WinCLIP's windows, the layer norms, the attention products of two activations, and the
whole scoring head after the encoder, where query features are compared with the bank's memory and the text
embeddings: a cosine similarity near 1 is the signal there, and an int8 step of ~1 % of its range is a large
score error. The patch-embedding convolution stays float32 too (one small product, and the pixel values'
range is not the tower's).

`int8_error` measures the quantised graph against the float32 one on the calibration images, relative to the
spread of the float32 outputs; above `DEFAULT_MAX_INT8_ERROR` the export keeps float32 and says so. Torch-free:
numpy, onnx, onnxruntime and nncf (imported where used).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np

# The matrix products that are quantised: those of a transformer block's weights in the image encoder. The
# dynamo exporter records each node's module path in its `pkg.torch.onnx.name_scopes` metadata, e.g.
# [..., 'model.backbone.clip.vision_model.encoder.layers.0.mlp.fc1', 'linear_4'].
ENCODER_MATMULS = re.compile(
    r"vision_model\.encoder\.layers\.\d+\.(self_attn\.(q|k|v|out)_proj|mlp\.fc[12])', 'linear(_\d+)?'\]$"
)
NAME_SCOPES = "pkg.torch.onnx.name_scopes"
ORT_OP_TYPES = ("MatMul", "Gemm")
# The largest error accepted, as a share of the float32 outputs' spread on the calibration images (max - min
# of the image scores; of the anomaly maps' values): 5 %. Measured on paper-sized ViT-B/16+ random weights:
# 0.3-2 % (docs/performance.md), so the bound leaves room while a broken quantisation (tens of %) is caught.
DEFAULT_MAX_INT8_ERROR = 0.05
# ONNX Runtime's kernels for u8 activations x s8 weights can saturate on x86 CPUs with AVX2 but no VNNI (the
# intermediate int16 sums); its documented remedies are 7-bit weights (`reduce_range`) or u8 weights (U8U8).
ORT_WEIGHT_MODES = ("u8s8", "u8s8-reduce-range", "u8u8")
DEFAULT_ORT_WEIGHT_MODE = "u8s8-reduce-range"


def encoder_matmuls(graph) -> list:
    """The nodes of the ONNX `graph` that are quantised: the encoder's weight products (`ENCODER_MATMULS`); a
    ValueError when there are none."""
    nodes = [
        node
        for node in graph.node
        if node.op_type in ORT_OP_TYPES
        and any(p.key == NAME_SCOPES and ENCODER_MATMULS.search(p.value) for p in node.metadata_props)
    ]
    if not nodes:
        raise ValueError("The graph has no image-encoder matrix products to quantise (ENCODER_MATMULS).")
    return nodes


def quantize_onnx(
    float_path: str | Path,
    int8_path: str | Path,
    pixel_values: np.ndarray,
    input_name: str,
    weight_mode: str = DEFAULT_ORT_WEIGHT_MODE,
) -> list[str]:
    """Write the float32 ONNX graph at `float_path` with its encoder's weight products quantised to int8 (QDQ,
    per-channel weights, activations u8 calibrated by min-max on `pixel_values`) to `int8_path`; `weight_mode`
    one of `ORT_WEIGHT_MODES`. Returns the names of the quantised nodes."""
    import onnx
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    if weight_mode not in ORT_WEIGHT_MODES:
        raise ValueError(f"Unknown weight mode {weight_mode!r}; choose from {ORT_WEIGHT_MODES}.")

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{input_name: pixel_values[i : i + 1]} for i in range(len(pixel_values))])

        def get_next(self):
            return next(self.batches, None)

    nodes = [
        node.name for node in encoder_matmuls(onnx.load(str(float_path), load_external_data=False).graph)
    ]
    quantize_static(
        str(float_path),
        str(int8_path),
        Reader(),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=list(ORT_OP_TYPES),
        nodes_to_quantize=nodes,
        per_channel=True,
        reduce_range=weight_mode == "u8s8-reduce-range",
        activation_type=QuantType.QUInt8,
        weight_type=QuantType.QUInt8 if weight_mode == "u8u8" else QuantType.QInt8,
    )
    return nodes


def quantize_openvino(onnx_path: str | Path, pixel_values: np.ndarray):
    """The ONNX graph at `onnx_path` converted to OpenVINO with its encoder's weight products quantised by NNCF
    (`nncf.quantize`, transformer preset, calibrated on `pixel_values` one image at a time); every other
    operation is in its ignored scope. Returns (the float32 model, the quantised one, the quantised nodes)."""
    import nncf
    import onnx
    import openvino

    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    names = {name for node in encoder_matmuls(graph) for name in (node.name, *node.output)}
    model = openvino.convert_model(str(onnx_path))
    nodes = {op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() in names}
    if not nodes:
        raise ValueError("OpenVINO's conversion kept none of the encoder's matrix products by name.")
    ignored = [op.get_friendly_name() for op in model.get_ops() if op.get_friendly_name() not in nodes]
    nncf_logger = logging.getLogger("nncf")
    level = nncf_logger.level
    nncf_logger.setLevel(logging.WARNING)  # its INFO lines name every operation it leaves float
    try:
        quantized = nncf.quantize(
            model,
            nncf.Dataset([pixel_values[i : i + 1] for i in range(len(pixel_values))]),
            model_type=nncf.ModelType.TRANSFORMER,
            subset_size=len(pixel_values),
            ignored_scope=nncf.IgnoredScope(names=ignored, validate=False),
        )
    finally:
        nncf_logger.setLevel(level)
    return model, quantized, sorted(nodes)


def int8_error(float_outputs: dict[str, np.ndarray], int8_outputs: dict[str, np.ndarray]) -> dict[str, float]:
    """Per output (`image_scores`, `anomaly_maps`), the largest |int8 - float32| as a share of the float32
    values' spread (max - min; 1 where they are all equal); infinite where the int8 graph gave a NaN."""
    errors = {}
    for name, reference in float_outputs.items():
        reference = np.asarray(reference, dtype=np.float64)
        difference = np.abs(np.asarray(int8_outputs[name], dtype=np.float64) - reference)
        spread = float(reference.max() - reference.min()) or 1.0
        worst = float(difference.max()) if np.isfinite(difference).all() else float("inf")
        errors[name] = worst / spread
    return errors


def outputs_of(
    infer: Callable[[np.ndarray], dict[str, np.ndarray]], pixel_values: np.ndarray, batch: int = 8
):
    """`infer`'s outputs on `pixel_values`, `batch` images at a time, concatenated per name."""
    parts = [infer(pixel_values[start : start + batch]) for start in range(0, len(pixel_values), batch)]
    return {name: np.concatenate([part[name] for part in parts]) for name in parts[0]}
