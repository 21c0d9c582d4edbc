"""Score images with a model exported by `hf-fsad export`, without PyTorch or transformers.

Needs numpy, Pillow and onnxruntime or openvino. `hf-fsad export` copies this file, `image_files.py` (the
file reading and result format it shares with `hf-fsad score`) and `tiling.py` (`hf_fsad.tiling`: tile boxes
and map stitching) into the export folder:

    python run_exported.py EXPORT_DIR image.png more_images/ --output results.jsonl --heatmaps heatmaps/

It reads, scores and reports as `hf-fsad score` does. Images are decoded a batch at a time, as the scoring
goes; each is read upright and as RGB (`image_files.read_image`), preprocessed as the model's image processor
does (resize, optional centre crop, rescale, normalise; the export's JSON holds its settings) and scored by
the exported graph. A file that cannot be used (not an image, truncated, empty, a decompression bomb, more
pixels than `--max-pixels`) is reported on stderr as `skipped input PATH: reason` and the run goes on. Each
image gets one JSON line in `hf-fsad score`'s format: path, raw score, empty branch_scores, heatmap path or
null, and with a calibrated bank its label ("anomalous" or "normal"), normalised score (0.5 at the threshold),
threshold, and an error when the score is not finite. An export of a tiled bank (its manifest's `tiling`)
scores each image tiled, as `hf_fsad.tiled_scoring.score_tiled` does: the image cut into the tiling's tiles,
`--batch-size` tiles preprocessed and scored at a time by the fixed-size graph, the tiles' maps resized to their
tiles and stitched at the image's full size (overlaps averaged), the image score the tiling's rule (max or
mean) over the tiles; with a position tiling the graph takes each tile's position beside its pixels and scores
it against that position's bank, one tile per forward pass. The lines are written as each batch is scored into a
temporary file that replaces `--output` at the end or when the run is interrupted (Ctrl-C, SIGTERM), so the
file is always the previous one or a complete new one; `--resume` keeps its records and scores only the
inputs not in it. `--heatmaps` writes a jet-coloured overlay of each anomaly map on its image, with the
region above a calibrated pixel threshold outlined.

Exit status: 0 scored, 1 no input could be scored, 2 the run could not start, 130 interrupted (results so far
kept). Also imported by `hf_fsad.export` (the exported graph as a scoring backend), so it imports nothing of
hf_fsad.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

if __package__:  # hf_fsad.deploy.run_exported
    from . import image_files, regions
else:  # the copy beside an export, run as a script: image_files.py and regions.py lie beside it
    import image_files
    import regions

MANIFEST_FILE = "hf_fsad_export.json"
MANIFEST_FORMAT = "hf_fsad.export"
RUNTIMES = ("onnxruntime", "openvino")
# What an export computes in: float32; bfloat16 (OpenVINO computing a float32 export in bf16: its CPU plugin
# would by default where the CPU has it); int8 (an int8 export, `hf-fsad export --precision int8`).
PRECISIONS = ("float32", "bfloat16", "int8")
# The names earlier runners took.
PRECISION_ALIASES = {"f32": "float32", "bf16": "bfloat16"}
# OpenVINO's inference precision hint per precision: an int8 graph keeps its float operations in f32.
OPENVINO_HINTS = {"float32": "f32", "bfloat16": "bf16", "int8": "f32"}
# matplotlib's "jet" colour map as (position, value) control points per channel; sampled at 256 entries
# it is the table matplotlib builds (LinearSegmentedColormap, N=256).
JET_CONTROL_POINTS = {
    "red": ((0.0, 0.0), (0.35, 0.0), (0.66, 1.0), (0.89, 1.0), (1.0, 0.5)),
    "green": ((0.0, 0.0), (0.125, 0.0), (0.375, 1.0), (0.64, 1.0), (0.91, 0.0), (1.0, 0.0)),
    "blue": ((0.0, 0.5), (0.11, 1.0), (0.34, 1.0), (0.65, 0.0), (1.0, 0.0)),
}


def _tiling_module():
    """`hf_fsad.tiling`, or its copy beside an export run as a script; imported for tiled exports only, so the
    runner runs untiled exports from any place."""
    if __package__:
        from .. import tiling
    else:
        import tiling
    return tiling


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


class ExportedModel:
    """The graph of an export folder on onnxruntime or OpenVINO (CPU): pixel values in, named outputs out.

    runtime: "onnxruntime" (an ONNX export) or "openvino" (an OpenVINO IR or an ONNX export); None picks the
    one the export was made for. precision: None (default) the export's own (its manifest's `precision`);
    "float32" (the PyTorch reference's numerics), "bfloat16" (OpenVINO computing a float32 export in bf16:
    faster where the CPU has bf16, scores move; see docs/performance.md) or "int8" (an int8 export only).
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        runtime: str | None = None,
        precision: str | None = None,
        num_threads: int | None = None,
    ):
        self.directory = Path(directory)
        self.manifest = read_manifest(directory)
        model_file = self.directory / self.manifest["model_file"]
        runtime = runtime or ("openvino" if model_file.suffix == ".xml" else "onnxruntime")
        if runtime not in RUNTIMES:
            raise ValueError(f"Unknown runtime {runtime!r}; choose from {RUNTIMES}.")
        exported = self.manifest.get("precision", "float32")
        precision = PRECISION_ALIASES.get(precision, precision) or exported
        if precision not in PRECISIONS:
            raise ValueError(f"Unknown precision {precision!r}; choose from {PRECISIONS}.")
        if (precision == "int8") != (exported == "int8"):
            raise ValueError(_precision_mismatch(self.manifest, precision))
        self.runtime, self.precision = runtime, precision
        self.input_name = self.manifest["input_name"]
        # a position tiling's graph takes the tile's position too (exports made before it have no such key)
        self.position_input_name = self.manifest.get("position_input_name")
        self.output_names = list(self.manifest["output_names"])
        if runtime == "onnxruntime":
            if model_file.suffix != ".onnx":
                raise ValueError(f"onnxruntime runs ONNX files; {model_file.name} is an OpenVINO model.")
            if precision == "bfloat16":
                raise ValueError(
                    "onnxruntime runs a float32 export in float32 only; use openvino for bfloat16."
                )
            import onnxruntime

            options = onnxruntime.SessionOptions()
            if num_threads:
                options.intra_op_num_threads = num_threads
            session = onnxruntime.InferenceSession(
                str(model_file), options, providers=["CPUExecutionProvider"]
            )
            self._infer = lambda inputs: session.run(self.output_names, inputs)
        else:
            import openvino

            config = {"INFERENCE_PRECISION_HINT": OPENVINO_HINTS[precision]}
            if num_threads:
                config["INFERENCE_NUM_THREADS"] = num_threads
            compiled = openvino.Core().compile_model(str(model_file), "CPU", config)
            request = compiled.create_infer_request()

            def infer(inputs: dict[str, np.ndarray]) -> list[np.ndarray]:
                results = request.infer(inputs)
                return [np.array(results[compiled.output(name)]) for name in self.output_names]

            self._infer = infer
        tiling = self.manifest.get("tiling")
        self._tiles = None if tiling is None else _tiling_module()
        self.tiling = None if tiling is None else self._tiles.Tiling.from_json(json.dumps(tiling))

    def __call__(self, pixel_values: np.ndarray, tile_position: int | None = None) -> dict[str, np.ndarray]:
        """Outputs (`image_scores` (B,), and `anomaly_maps` (B, S, S) where the method has maps) of a batch
        (B, 3, S, S) of preprocessed images; a position tiling's graph scores tiles of one `tile_position`
        (their index in `Tiling.boxes`) against that position's bank."""
        inputs = {self.input_name: np.ascontiguousarray(pixel_values, dtype=np.float32)}
        if self.position_input_name is not None:
            if tile_position is None:
                raise ValueError(
                    "This export scores the tiles of a position tiling: give the tiles' tile_position (their "
                    "index in Tiling.boxes), or score whole images with score_tiled."
                )
            inputs[self.position_input_name] = np.array([tile_position], dtype=np.int64)
        return dict(zip(self.output_names, self._infer(inputs)))

    def preprocess(self, images: Sequence[Image.Image]) -> np.ndarray:
        """(B, 3, S, S) pixel values of RGB `images` for this export (`preprocess`)."""
        return np.stack([preprocess(image, self.manifest["image_processor"]) for image in images])

    def score_images(self, images: Sequence[Image.Image], batch_size: int) -> dict[str, list[np.ndarray]]:
        """Per image of `images`, its `image_scores` (a float32 scalar) and, where the method has maps, its
        `anomaly_maps`: the graph's (S, S) map, or with a tiling the stitched map at the image's size
        (`score_tiled`, `batch_size` tiles at a time)."""
        if self.tiling is None:
            outputs = self(self.preprocess(images))
            return {name: list(values) for name, values in outputs.items()}
        tiled = [self.score_tiled(image, batch_size) for image in images]
        return {name: [output[name] for output in tiled] for name in tiled[0]}

    def score_tiled(self, image: Image.Image, batch_size: int) -> dict[str, np.ndarray]:
        """One RGB `image` scored with the export's tiling: `image_scores` (the tiling's rule over the tiles'
        scores) and `anomaly_maps` (the tiles' maps resized to their tiles and stitched, (H, W) float32).
        `batch_size` tiles per forward pass; one with a position tiling's graph, which scores each tile against
        its own position's bank."""
        tiles, boxes = self._tiles, self.tiling.boxes(image.height, image.width)
        by_position = self.position_input_name is not None
        step = 1 if by_position else batch_size
        scores, stitcher = [], None
        for start in range(0, len(boxes), step):
            batch = boxes[start : start + step]
            outputs = self(self.preprocess(tiles.crop_tiles(image, batch)), start if by_position else None)
            scores.append(outputs["image_scores"])
            if "anomaly_maps" in outputs:
                stitcher = stitcher or tiles.MapStitcher(image.height, image.width, boxes)
                for box, tile_map in zip(batch, outputs["anomaly_maps"]):
                    stitcher.add(box, resized_map(tile_map, (box.width, box.height)))
        result = {"image_scores": tiles.combine_tile_scores(np.concatenate(scores), self.tiling.image_score)}
        return result if stitcher is None else result | {"anomaly_maps": stitcher.result()}


def _precision_mismatch(manifest: dict, precision: str) -> str:
    """Why an export cannot run at `precision`: an int8 export runs at int8 only, a float32 one not at int8
    (with why, where its int8 export fell back to float32)."""
    if manifest.get("precision") == "int8":
        return f"This export holds an int8 graph: it runs at precision int8, not {precision}."
    int8 = manifest.get("int8")
    why = ""
    if int8 is not None:
        why = (
            f" (its int8 quantisation fell back: error {int8['errors']} above the bound {int8['max_error']})"
        )
    return f"This export holds a float32 graph{why}: export with --precision int8 to run at int8."


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


def heatmap_overlay(
    image: Image.Image,
    anomaly_map: np.ndarray,
    value_range: tuple[float, float] | None = None,
    alpha: float = 0.5,
    rows_per_strip: int = 256,
) -> Image.Image:
    """Blend a jet-coloured `anomaly_map` (resized bilinearly to the image) over `image`; hf_fsad's
    `visualization.heatmap_overlay` is this function.

    value_range: the scores mapped to the ends of the colour scale; None uses the map's own min and max
    (good for one image; give a shared range to compare images). Non-finite values are drawn at the top of
    the scale, and the range is taken over the finite ones.

    The map is resized once in float32 and coloured `rows_per_strip` rows at a time through a 256-entry
    table (the quantisation matplotlib's colormap applies), so a large image costs its own size a few times
    over, never a float RGBA copy of every pixel.
    """
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    if anomaly_map.ndim != 2:
        raise ValueError(f"anomaly_map must be 2-D (H, W), got shape {anomaly_map.shape}.")
    finite = np.isfinite(anomaly_map)
    if value_range is None:
        values = anomaly_map[finite]
        value_range = (float(values.min()), float(values.max())) if values.size else (0.0, 1.0)
    low, high = value_range
    # A non-finite value fails its part (`image_files.score_error`): drawn at the top of the scale.
    scaled = np.where(finite, np.clip((anomaly_map - low) / max(high - low, 1e-12), 0.0, 1.0), 1.0)
    resized = np.asarray(
        Image.fromarray(scaled.astype(np.float32)).resize(image.size, Image.Resampling.BILINEAR)
    )
    lookup = jet_lookup()
    overlay = np.array(image.convert("RGB"))
    for top in range(0, overlay.shape[0], rows_per_strip):
        rows = slice(top, top + rows_per_strip)
        colours = lookup[np.minimum((resized[rows] * 256).astype(np.int32), 255)]
        overlay[rows] = np.round(overlay[rows] * (1 - alpha) + colours * alpha).astype(np.uint8)
    return Image.fromarray(overlay)


def outline_region(
    image: Image.Image, region: np.ndarray, colour: tuple[int, int, int] = (255, 255, 255), width: int = 2
) -> Image.Image:
    """`image` with the inner border of `region` (bool (H, W) at the image's size), `width` pixels wide,
    drawn in `colour` (white stands out on a jet heatmap); the region's pixels off the border are kept."""
    region = np.asarray(region, dtype=bool)
    if region.shape != (image.height, image.width):
        raise ValueError(f"region has shape {region.shape}, the image is {image.height}x{image.width}.")
    inner = region
    for _ in range(width):  # erosion by the 4-neighbourhood; outside the image counts as outside the region
        padded = np.pad(inner, 1)
        inner = inner & padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    pixels = np.array(image.convert("RGB"))
    pixels[region & ~inner] = colour
    return Image.fromarray(pixels)


def _bilinear_taps(output_size: int, input_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(lower index, upper index, upper weight) of each output position: the half-pixel source coordinate,
    clamped at 0, as torch's bilinear interpolation with align_corners=False computes it in float32."""
    scale = np.float32(input_size) / np.float32(output_size)
    source = np.maximum(
        scale * (np.arange(output_size, dtype=np.float32) + np.float32(0.5)) - np.float32(0.5), 0
    )
    lower = source.astype(np.int64)
    upper = np.where(lower < input_size - 1, lower + 1, lower)
    return lower, upper, (source - lower).astype(np.float32)


def resized_map(anomaly_map: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) anomaly map resized bilinearly to `size` (width, height) as float32, as `hf_fsad.pipeline`'s
    `resized_map` (torch's interpolate, align_corners=False, no antialiasing) computes it."""
    anomaly_map = np.asarray(anomaly_map, dtype=np.float32)
    (left, right, right_weight), (top, bottom, bottom_weight) = (
        _bilinear_taps(size[0], anomaly_map.shape[1]),
        _bilinear_taps(size[1], anomaly_map.shape[0]),
    )
    rows = anomaly_map[:, left] * (1 - right_weight) + anomaly_map[:, right] * right_weight
    return rows[top] * (1 - bottom_weight)[:, None] + rows[bottom] * bottom_weight[:, None]


def heatmap(image: Image.Image, anomaly_map: np.ndarray, calibration: dict | None) -> Image.Image:
    """The overlay `hf-fsad score --heatmaps` draws: `heatmap_overlay`, and with a calibrated pixel threshold
    the outline of the region above it (the map at the image's size; a NaN or infinite value counts as
    above)."""
    overlay = heatmap_overlay(image, anomaly_map)
    above = pixels_above(image, anomaly_map, calibration)
    return overlay if above is None else outline_region(overlay, above[1])


def pixels_above(
    image: Image.Image, anomaly_map: np.ndarray, calibration: dict | None
) -> tuple[np.ndarray, np.ndarray] | None:
    """(the map at the image's size, where it is above the calibrated pixel threshold: a NaN or infinite value
    counts as above), or None without a pixel threshold."""
    if calibration is None or calibration.get("pixel_threshold") is None:
        return None
    at_image_size = resized_map(anomaly_map, image.size).astype(np.float64)
    return at_image_size, (at_image_size > calibration["pixel_threshold"]) | ~np.isfinite(at_image_size)


def defect_regions(
    image: Image.Image, anomaly_maps: np.ndarray | None, index: int, calibration: dict
) -> list[dict] | None:
    """The defect regions `hf-fsad score` records (`regions.defect_regions` of the map at the image's size above
    the pixel threshold, a NaN or infinite value counting as above), or None without a map or pixel
    threshold."""
    above = None if anomaly_maps is None else pixels_above(image, anomaly_maps[index], calibration)
    return None if above is None else regions.defect_regions(above[1], above[0])


def result_record(path: Path, image_score: float, calibration: dict | None) -> dict:
    """One image's JSON record in `hf-fsad score`'s format: path, score, branch_scores (empty: the graph
    returns final scores only), heatmap (None until drawn) and, with a `calibration`, label, normalized_score,
    threshold and, when the score is not finite, error."""
    record = {"path": str(path), "score": image_score, "branch_scores": {}, "heatmap": None}
    if calibration is not None:
        scores = np.array([image_score])
        record["label"] = image_files.LABEL_NAMES[int(labels(scores, calibration)[0])]
        record["normalized_score"] = float(normalized_scores(scores, calibration)[0])
        record["threshold"] = calibration["image_threshold"]
        error = image_files.score_error(image_score)
        if error is not None:
            record["error"] = error
    return record


def score_files(
    model: ExportedModel,
    paths: Sequence[Path],
    batch_size: int = 8,
    max_pixels: int | None = None,
    heatmap_paths: dict[Path, Path] | None = None,
) -> Iterator[list[dict]]:
    """The records (`result_record`) of each batch of `paths`, decoded as the batch is scored, so at most
    `batch_size` images are held at once; a file that cannot be used is reported on stderr as `skipped
    input PATH: reason` and left out. `heatmap_paths`: where each image's overlay (`heatmap`) is written.
    A tiled export reads one image at a time and scores `batch_size` of its tiles at a time."""
    calibration = model.manifest.get("calibration")
    images_per_batch = batch_size if model.tiling is None else 1
    readable = image_files.readable_images(paths, "input", max_pixels)
    for batch in image_files.batched(readable, images_per_batch):
        outputs = model.score_images([image for _, image in batch], batch_size)
        records = []
        for index, (path, image) in enumerate(batch):
            record = result_record(path, float(outputs["image_scores"][index]), calibration)
            if calibration is not None:
                record["regions"] = defect_regions(image, outputs.get("anomaly_maps"), index, calibration)
            if heatmap_paths is not None and "anomaly_maps" in outputs:
                overlay = heatmap(image, outputs["anomaly_maps"][index], calibration)
                with image_files.atomic_file(heatmap_paths[path]) as temporary:
                    overlay.save(temporary, format="PNG")
                record["heatmap"] = str(heatmap_paths[path])
            records.append(record)
        yield records


def _write_batches(batches: Iterator[list[dict]], sink) -> tuple[int, bool]:
    """(records written, whether the run was interrupted): each batch's JSON lines written and flushed as it
    is scored; Ctrl-C or SIGTERM stops the run after the last whole line."""
    written = 0
    try:
        with image_files.sigterm_interrupts():
            for records in batches:
                sink.write("".join(image_files.json_line(record) for record in records))
                sink.flush()
                written += len(records)
    except KeyboardInterrupt:
        return written, True
    return written, False


def _parse_arguments(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("export_dir", help="the folder `hf-fsad export` wrote")
    parser.add_argument("images", nargs="+", help="image files or directories (searched recursively)")
    parser.add_argument("--runtime", choices=RUNTIMES, help="default: the one the export was made for")
    parser.add_argument(
        "--precision",
        type=lambda name: PRECISION_ALIASES.get(name, name),
        choices=PRECISIONS,
        help="float32 or bfloat16 (OpenVINO) for a float32 export, int8 for an int8 one (default: the export's)",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=8,
        help="images (a tiled export: tiles; a position tiling scores one tile a pass) per forward pass (default 8)",
    )
    parser.add_argument("--threads", type=int, help="CPU threads (default: the runtime's choice)")
    parser.add_argument(
        "--output",
        help="results file (JSON lines), replaced atomically at the end (default: print the lines)",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --output and score only the inputs not in it",
    )
    parser.add_argument("--heatmaps", help="directory for heatmap overlays (PNG; default: none)")
    image_files.add_max_pixels(parser)
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    if args.resume and not args.output:
        parser.error("--resume needs --output (the results to go on from)")
    return args


def _prepare_run(args: argparse.Namespace) -> tuple[ExportedModel, list[dict], Path | None]:
    """(model, the records kept by --resume, heatmap folder or None); a ValueError or ImportError says why the
    run cannot start."""
    output = image_files.prepare_output_file(args.output, "--output") if args.output else None
    heatmap_dir = image_files.prepare_output_dir(args.heatmaps, "--heatmaps") if args.heatmaps else None
    previous = image_files.previous_results(output) if args.resume else []
    model = ExportedModel(args.export_dir, args.runtime, args.precision, args.threads)
    return model, previous, heatmap_dir


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_arguments(argv)
    try:
        model, previous, heatmap_dir = _prepare_run(args)
    except (ValueError, ImportError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    all_paths = image_files.distinct_paths(image_files.expand_inputs(args.images))
    used_names: set[str] = set()
    heatmap_paths = None
    if heatmap_dir is not None:  # named over all inputs, so a resumed run names each image as before
        heatmap_paths = {
            path: heatmap_dir / f"{image_files.unique_name(path.stem, used_names)}.heatmap.png"
            for path in all_paths
        }
    done = {str(record["path"]) for record in previous}
    paths = [path for path in all_paths if str(path) not in done]
    if done:
        print(f"resuming: {len(all_paths) - len(paths)} inputs already in {args.output}", file=sys.stderr)
    batches = score_files(model, paths, args.batch_size, args.max_pixels, heatmap_paths)
    if args.output:
        with (
            image_files.atomic_file(args.output) as temporary,
            open(temporary, "w", encoding="utf-8") as sink,
        ):
            sink.write("".join(image_files.json_line(record) for record in previous))
            scored, interrupted = _write_batches(batches, sink)
    else:
        scored, interrupted = _write_batches(batches, sys.stdout)
    destination = args.output or "stdout"
    if interrupted:
        print(
            f"interrupted: {scored} images scored -> {destination}; run again with --resume to go on",
            file=sys.stderr,
        )
        return 130
    print(f"scored {scored} of {len(paths)} images -> {destination}", file=sys.stderr)
    return 0 if scored or not paths else 1


if __name__ == "__main__":
    sys.exit(main())
