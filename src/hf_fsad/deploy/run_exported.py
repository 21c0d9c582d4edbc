"""Score images with a model exported by `hf-fsad export`, without PyTorch or transformers.

Needs numpy, Pillow and onnxruntime or openvino. `hf-fsad export` copies this file into the export folder:

    python run_exported.py EXPORT_DIR image.png more_images/ --output results.json --heatmaps heatmaps/

Each image is read upright and as RGB as `hf-fsad score` reads it, preprocessed as the model's image processor does (resize, optional centre crop,
rescale, normalise; the export's JSON holds its settings), scored by the exported graph, and reported with its
raw score and, when the bank was calibrated, its normalised score (0.5 at the threshold) and label (1 =
anomalous). `--heatmaps` writes a jet-coloured overlay of each anomaly map on its image.

Also imported by `hf_fsad.export` (the exported graph as a scoring backend), so it imports nothing of hf_fsad.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

MANIFEST_FILE = "hf_fsad_export.json"
MANIFEST_FORMAT = "hf_fsad.export"
RUNTIMES = ("onnxruntime", "openvino")
# OpenVINO inference precisions: its CPU plugin computes in bf16 by default where the CPU has it.
PRECISIONS = ("f32", "bf16")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# Pillow modes that `convert("RGB")` maps faithfully; wider ones (16-bit, float) would be clipped.
EIGHT_BIT_MODES = {"1", "L", "LA", "P", "PA", "RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}
# matplotlib's "jet" colour map as (position, value) control points per channel; sampled at 256 entries
# it is the table matplotlib builds (LinearSegmentedColormap, N=256).
JET_CONTROL_POINTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def read_manifest(directory: str | os.PathLike) -> dict:
    """The export's JSON (`MANIFEST_FILE` in `directory`); a ValueError says why a folder is not an export."""
    path = Path(directory) / MANIFEST_FILE
    if not path.is_file():
        raise ValueError(f"{directory} is not an hf_fsad export: it has no {MANIFEST_FILE}.")
    manifest = json.loads(path.read_text(encoding="utf-8"))
    if manifest.get("format") != MANIFEST_FORMAT:
        raise ValueError(f"{path} is not an hf_fsad export manifest (format {manifest.get('format')!r}).")
    return manifest


def preprocess(image: Image.Image, processor: dict) -> np.ndarray:
    """(3, H, W) float32 pixel values of an RGB `image`, as transformers' `CLIPImageProcessorPil` with the
    settings `processor` (its `to_dict()`) computes them: Pillow resize to `size` (a height and width, or the
    shortest edge), centre crop to `crop_size` if `do_center_crop`, uint8 -> float64 * `rescale_factor` ->
    float32, then (x - mean) / std in float32."""
    if image.mode != "RGB":
        raise ValueError(f"preprocess takes RGB images, got mode {image.mode}.")
    width, height = image.size
    size = processor["size"]
    if "height" in size and "width" in size:
        new_height, new_width = size["height"], size["width"]
    elif "shortest_edge" in size:
        short, long = sorted((width, height))
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        new_height, new_width = (new_short, new_long) if height <= width else (new_long, new_short)
    else:
        raise ValueError(f"Unsupported image processor size {size}: give height and width, or shortest_edge.")
    if processor.get("do_resize", True):
        image = image.resize((new_width, new_height), resample=Image.Resampling(processor["resample"]))
    pixels = np.asarray(image).transpose(2, 0, 1)
    if processor.get("do_center_crop"):
        crop_height, crop_width = processor["crop_size"]["height"], processor["crop_size"]["width"]
        top, left = (pixels.shape[1] - crop_height) // 2, (pixels.shape[2] - crop_width) // 2
        if top < 0 or left < 0:
            raise ValueError(
                f"Image of {pixels.shape[1:]} is smaller than the crop {crop_height}x{crop_width}."
            )
        pixels = pixels[:, top : top + crop_height, left : left + crop_width]
    values = (pixels.astype(np.float64) * processor["rescale_factor"]).astype(np.float32)
    mean = np.asarray(processor["image_mean"], dtype=np.float32)
    std = np.asarray(processor["image_std"], dtype=np.float32)
    return ((values.T - mean) / std).T


def upright_rgb(image: Image.Image) -> Image.Image:
    """An 8-bit `image` turned by its EXIF orientation and converted to RGB with transparency composited on
    white: `hf_fsad.io.to_upright_rgb`'s rule, repeated here so this file needs nothing of hf_fsad."""
    if image.getexif().get(0x0112, 1) != 1:  # 0x0112: EXIF Orientation
        image = ImageOps.exif_transpose(image)
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


def read_rgb(path: str | os.PathLike) -> Image.Image:
    """The 8-bit image at `path`, upright and as RGB (`upright_rgb`); 16-bit and float images are refused
    (convert them to 8 bits first, or score them with `hf-fsad score`, which maps their full range)."""
    with Image.open(path) as image:
        if image.mode not in EIGHT_BIT_MODES:
            raise ValueError(f"{path}: {image.mode} images are not read here; convert to 8-bit first.")
        image.load()
        return upright_rgb(image)


class ExportedModel:
    """The graph of an export folder on onnxruntime or OpenVINO (CPU): pixel values in, named outputs out.

    runtime: "onnxruntime" (an ONNX export) or "openvino" (an OpenVINO IR or an ONNX export); None picks the
    one the export was made for. precision: OpenVINO's inference precision, "f32" (default: the PyTorch
    reference's numerics) or "bf16" (faster where the CPU has bf16, scores move; see docs/performance.md).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        runtime: str | None = None,
        precision: str = "f32",
        num_threads: int | None = None,
    ):
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        model_file = self.directory / self.manifest["model_file"]
        runtime = runtime or ("openvino" if model_file.suffix == ".xml" else "onnxruntime")
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown runtime {runtime!r}; choose from {RUNTIMES}.")
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
        self.runtime, self.precision = runtime, precision
        self.input_name = self.manifest["input_name"]
        self.output_names = list(self.manifest["output_names"])
        if runtime == "onnxruntime":
            if model_file.suffix != ".onnx":
                raise ValueError(f"onnxruntime runs ONNX files; {model_file.name} is an OpenVINO model.")
            if precision != "f32":
                raise ValueError(
                    "onnxruntime runs the exported graph in float32 only; use openvino for bf16."
                )
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
            session = onnxruntime.InferenceSession(
                str(model_file), options, providers=["CPUExecutionProvider"]
            )
            self._infer = lambda pixels: session.run(self.output_names, {self.input_name: pixels})
        else:
            import openvino

            config = {"INFERENCE_PRECISION_HINT": precision}
            if num_threads:
                config["INFERENCE_NUM_THREADS"] = num_threads
            compiled = openvino.Core().compile_model(str(model_file), "CPU", config)
            request = compiled.create_infer_request()

            def infer(pixels: np.ndarray) -> list[np.ndarray]:
                results = request.infer({self.input_name: pixels})
                return [np.array(results[compiled.output(name)]) for name in self.output_names]

            self._infer = infer

    def __call__(self, pixel_values: np.ndarray) -> dict[str, np.ndarray]:
        """Outputs (`image_scores` (B,), and `anomaly_maps` (B, S, S) where the method has maps) of a batch
        (B, 3, S, S) of preprocessed images."""
        pixel_values = np.ascontiguousarray(pixel_values, dtype=np.float32)
        return dict(zip(self.output_names, self._infer(pixel_values)))

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 3, S, S) pixel values of RGB `images` for this export (`preprocess`)."""
        return np.stack([preprocess(image, self.manifest["image_processor"]) for image in images])


def normalized_scores(image_scores: np.ndarray, calibration: dict) -> np.ndarray:
    """Calibrated scores in (0, 1), 0.5 at the image threshold and above 0.5 exactly where `labels` is 1
    (hf_fsad's `Calibration.normalize`: 1/2 + z / (2 (1 + |z|)), z = (score - threshold) / scale)."""
    scores = np.asarray(image_scores, dtype=np.float64)
    with np.errstate(invalid="ignore"):
        distance = (scores - calibration["image_threshold"]) / calibration["image_scale"]
        tail = 0.5 / (1 + np.abs(distance))
        result = np.where(distance > 0, 1 - tail, tail).astype(np.float32)
    result = np.minimum(result, np.nextafter(np.float32(1), np.float32(0)))
    anomalous = labels(scores, calibration) == 1
    result = np.where(anomalous, np.maximum(result, np.nextafter(np.float32(0.5), np.float32(1))), result)
    return np.where(np.isfinite(scores), result, np.float32(1)).astype(np.float32)


def labels(image_scores: np.ndarray, calibration: dict) -> np.ndarray:
    """1 where an image is anomalous (score above the calibrated threshold, or NaN or infinite: such a score
    cannot be trusted, so the part fails), else 0."""
    scores = np.asarray(image_scores, dtype=np.float64)
    return ((scores > calibration["image_threshold"]) | ~np.isfinite(scores)).astype(np.int64)


def jet_lookup() -> np.ndarray:
    """(256, 3) uint8: matplotlib's jet colour of each of its 256 entries."""
    positions = np.linspace(0, 1, 256)
    channels = [np.interp(positions, *zip(*JET_CONTROL_POINTS[name])) for name in ("red", "green", "blue")]
    return (np.stack(channels, axis=1) * 255).astype(np.uint8)


def heatmap_overlay(image: Image.Image, anomaly_map: np.ndarray, alpha: float = 0.5) -> Image.Image:
    """A jet-coloured `anomaly_map` (scaled to its own min..max, resized bilinearly to the image) blended
    over `image`, as hf_fsad's `visualization.heatmap_overlay` draws it."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    low, high = float(anomaly_map.min()), float(anomaly_map.max())
    scaled = np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0)
    resized = np.asarray(Image.fromarray(scaled).resize(image.size, Image.Resampling.BILINEAR))
    colours = jet_lookup()[np.minimum((resized * 256).astype(np.int32), 255)]
    overlay = np.asarray(image.convert("RGB"), dtype=np.float64) * (1 - alpha) + colours * alpha
    return Image.fromarray(np.round(overlay).astype(np.uint8))


def _image_paths(inputs: Sequence[str]) -> list[Path]:
    paths = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
        else:
            paths.append(item)
    return paths


def _unique_name(stem: str, used: set[str]) -> str:
    """`<stem>.png`, or `<stem>-2.png`, ... when another image of the run had the same stem."""
    name, count = f"{stem}.png", 1
    while name in used:
        count += 1
        name = f"{stem}-{count}.png"
    used.add(name)
    return name


def _write_atomically(path: Path, write) -> None:
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def score_files(
    model: ExportedModel, paths: Sequence[Path], batch_size: int = 8, heatmap_dir: Path | None = None
) -> list[dict]:
    """One result per readable image: path, score and (with a calibrated bank) normalised score and label;
    a NaN or infinite score is written as null with an `error`, and fails the part. Unreadable images are
    reported on stderr and skipped. Heatmaps go to `heatmap_dir` as <stem>.png (<stem>-2.png, ... for
    repeated stems)."""
    calibration = model.manifest.get("calibration")
    heatmap_names: set[str] = set()
    readable = []
    for path in paths:
        try:
            readable.append((path, read_rgb(path)))
        except (OSError, ValueError) as error:
            print(f"skipped {path}: {error}", file=sys.stderr)
    results = []
    for start in range(0, len(readable), batch_size):
        batch = readable[start : start + batch_size]
        outputs = model(model.preprocess([image for _, image in batch]))
        scores = outputs["image_scores"]
        for index, (path, image) in enumerate(batch):
            score = float(scores[index])
            result = {"path": str(path), "score": score if np.isfinite(score) else None}
            if not np.isfinite(score):
                result["error"] = f"the image score is {score}: the part fails"
            if calibration is not None:
                result["normalized_score"] = float(
                    normalized_scores(scores[index : index + 1], calibration)[0]
                )
                result["label"] = int(labels(scores[index : index + 1], calibration)[0])
            if heatmap_dir is not None and "anomaly_maps" in outputs:
                heatmap = heatmap_dir / _unique_name(path.stem, heatmap_names)
                overlay = heatmap_overlay(image, outputs["anomaly_maps"][index])
                _write_atomically(heatmap, lambda target, overlay=overlay: overlay.save(target, format="PNG"))
                result["heatmap"] = str(heatmap)
            results.append(result)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="the folder `hf-fsad export` wrote")
    parser.add_argument("images", nargs="+", help="image files or folders of images")
    parser.add_argument("--runtime", choices=RUNTIMES, help="default: the one the export was made for")
    parser.add_argument("--precision", choices=PRECISIONS, default="f32", help="OpenVINO's (default f32)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's choice)")
    parser.add_argument("--output", help="write the results as JSON here (default: print them)")
    parser.add_argument("--heatmaps", help="write a heatmap overlay PNG per image into this folder")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    try:
        model = ExportedModel(args.export_dir, args.runtime, args.precision, args.threads)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    heatmap_dir = Path(args.heatmaps) if args.heatmaps else None
    if heatmap_dir is not None:
        heatmap_dir.mkdir(parents=True, exist_ok=True)
    results = score_files(model, _image_paths(args.images), args.batch_size, heatmap_dir)
    text = json.dumps(results, indent=2, allow_nan=False)
    if args.output:
        _write_atomically(Path(args.output), lambda target: target.write_text(text + "\n", encoding="utf-8"))
    else:
        print(text)
    return 0 if results else 1


if __name__ == "__main__":
    sys.exit(main())
