"""What every engine of `hf-fsad score` shares (the local one in `hf_fsad.cli.score`, Ray's in
`hf_fsad.ray_engine`): the scorer of a model and bank on a runtime, and the record of each scored image, so
both engines write the same records for the same image."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from PIL import Image

from .bank import ReferenceBank
from .calibration import exceeds_threshold, normalize_around, score_error
from .modeling_base import FsadPreTrainedModel
from .pipeline import LABEL_NAMES, decision, pixel_decision, resized_map
from .visualization import heatmap_overlay, outline_region


@dataclass(frozen=True)
class RecordOptions:
    """How records decide and draw: a manual raw `threshold` (instead of the calibrated one), the
    `review_band` half-width around the calibrated threshold, and the heatmap colour scale's
    `heatmap_range` (LOW, HIGH; None: each map's own min and max)."""

    threshold: float | None = None
    review_band: float | None = None
    heatmap_range: tuple[float, float] | None = None


def batch_scorer(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    runtime: str = "torch",
    precision: str = "float32",
    batch_size: int = 8,
    quantization_images: Sequence[Image.Image] | None = None,
) -> Callable:
    """pixel values -> calibrated `AnomalyDetectionOutput`: the model in PyTorch under `precision`, or its
    export on `runtime` ("onnxruntime", "openvino": `ExportedScorer`, exported on first use into the export
    cache; at "int8" quantised on `quantization_images`). With a tiled bank: one image -> its output (`score_tiled`, tiles in batches of `batch_size`), in
    PyTorch only."""
    if bank.tiling is not None:

        def score_image(image: Image.Image):
            from .tiled_scoring import score_tiled

            with model.autocast(precision):
                return score_tiled(model, image, bank, batch_size)

        return score_image
    if runtime == "torch":

        def score_batch(pixel_values: torch.Tensor):
            with torch.no_grad(), model.autocast(precision):
                return model(pixel_values, reference_bank=bank)

        return score_batch
    from .export import ExportedScorer

    return ExportedScorer(model, bank, runtime, precision, None, quantization_images)


def manual_decision(score: float, threshold: float, calibration) -> dict:
    """The verdict at a manual raw `threshold`, as `decision` gives the calibrated one: anomalous above it
    (or when the score is not finite); normalized_score 0.5 at it on the calibration's scale, None without a
    calibration (no scale to normalise with)."""
    value = torch.tensor([score], dtype=torch.float64)
    normalized = None if calibration is None else normalize_around(value, threshold, calibration.image_scale)
    verdict = {
        "label": LABEL_NAMES[int(exceeds_threshold(value, threshold))],
        "normalized_score": None if normalized is None else float(normalized),
        "threshold": threshold,
        "threshold_source": "manual",
    }
    error = score_error(score)
    return verdict if error is None else verdict | {"error": error}


def image_record(
    path: str | Path,
    image: Image.Image | tuple[int, int],
    result,
    index: int,
    calibration,
    options: RecordOptions,
    heatmap: Path | None = None,
) -> dict:
    """The record of image `index` of `result`: score, branch scores, heatmap (written to `heatmap` when given
    and the method makes maps; `image` is then the image itself, else its (width, height) suffices) and, with
    a `calibration`, the verdict and the defect `regions` (`hf_fsad.pipeline.pixel_decision`)."""
    from .io import save_image_atomically

    record = {
        "path": str(path),
        "score": float(result.image_scores[index]),
        "branch_scores": {k: float(v[index]) for k, v in (result.branch_scores or {}).items()},
        "heatmap": None,
    }
    anomaly_map = None if result.anomaly_maps is None else result.anomaly_maps[index]
    size = image.size if isinstance(image, Image.Image) else tuple(image)
    mask = None
    if options.threshold is not None:
        record |= manual_decision(record["score"], options.threshold, calibration)
    elif calibration is not None:
        record |= decision(result, index, calibration, options.review_band)
    if calibration is not None:  # the pixel threshold stays the calibrated one
        at_image_size = None if anomaly_map is None else resized_map(anomaly_map, size)
        mask, record["regions"] = pixel_decision(at_image_size, calibration)
    if heatmap is not None and anomaly_map is not None:
        overlay = heatmap_overlay(image, anomaly_map.float().cpu().numpy(), options.heatmap_range)
        if mask is not None:
            overlay = outline_region(overlay, mask)
        save_image_atomically(overlay, heatmap)
        record["heatmap"] = str(heatmap)
    return record


def verdict_summary(records: Sequence[dict]) -> str:
    """One line counting the calibrated verdicts in `records`, e.g. `5 images: 2 fail (anomalous), 3 pass`
    (and `, 1 review` with a review band)."""
    labels = [record["label"] for record in records if "label" in record]
    failed, review = labels.count("anomalous"), labels.count("review")
    summary = f"{len(labels)} images: {failed} fail (anomalous), {len(labels) - failed - review} pass"
    summary += f", {review} review" if review else ""
    unlabelled = len(records) - len(labels)
    return summary + (f"; {unlabelled} earlier results without a verdict" if unlabelled else "")
