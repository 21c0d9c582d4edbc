"""Tiled benchmark cells: a cell run with a `Tiling` builds, calibrates and scores as `hf_fsad.tiled_scoring`
does, and is measured at full resolution.

- References (and anomalous references with their masks) are cut into tiles and encoded in each cell, tiles
  preprocessed by the model's image processor (whole-tile resize, as `score_tiled`); tiled cells do not use
  the feature cache, whose entries are whole images in the paper's preprocessing. Methods fitted per category
  are fitted on the references' tiles (`fit_tiled`).
- Bank and calibration: the one bank policy (`hf_fsad.calibration_policy.calibrated_bank` with the tiling),
  for the protocol's false-alarm rate, on the validation normals when the protocol keeps some, else
  leave-one-out on the k references (all tiles of one reference left out at a time); the score-weight search
  of methods that validate weights is not run on tiles. On an exported runtime the validation normals are
  scored tiled by the export (`ExportedScorer.score_tiled`), so the calibration holds for the scores the cell
  is judged on; leave-one-out there would take one export per reference, so a cell without validation normals
  is left without verdicts, as an untiled one.
- Test images are scored tiled (`score_tiled`, or the export's runner on an exported runtime) and their maps
  stitched at the image's size. Pixel metrics compare maps and masks at the test images' source size; where
  the sizes differ, at the largest height and width among them (maps resized bilinearly, masks by nearest
  neighbour), which the cell records as `metrics_size`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from ..bank import ReferenceBank
from ..export import ExportedScorer
from ..modeling_base import FsadPreTrainedModel
from ..tiled_scoring import resized_maps, score_tiled


@torch.no_grad()
def score_tiled_images(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    images: Sequence[Image.Image],
    batch_size: int,
    runtime: str = "torch",
) -> tuple[np.ndarray, list[np.ndarray] | None]:
    """(image scores (N,), each image's stitched (H, W) map or None for image-level methods), `batch_size`
    tiles at a time, with PyTorch or the bank's export on `runtime`."""
    model.warn_if_untrained()
    if runtime == "torch":
        outputs = [score_tiled(model, image, bank, batch_size) for image in images]
    else:
        # raw scores only: the uncalibrated bank's export, which the calibration on this runtime made already
        scorer = ExportedScorer(model, dataclasses.replace(bank, calibration=None), runtime)
        outputs = [scorer.score_tiled(image, batch_size) for image in images]
    scores = [output.image_scores[0].item() for output in outputs]
    maps = [None if output.anomaly_maps is None else output.anomaly_maps[0].numpy() for output in outputs]
    return np.asarray(scores, dtype=np.float32), None if maps[0] is None else maps


def metrics_size(images: Sequence[Image.Image]) -> tuple[int, int]:
    """(height, width) the pixel metrics of a tiled cell are computed at: the images' size, or the largest
    height and width among them."""
    return max(image.height for image in images), max(image.width for image in images)


def maps_at(maps: Sequence[np.ndarray], size: tuple[int, int]) -> np.ndarray:
    """(N, height, width) float32: each map, resized bilinearly where it has another size."""
    return np.stack(
        [
            anomaly_map
            if anomaly_map.shape == size
            else resized_maps(torch.from_numpy(anomaly_map)[None], *size)[0].numpy()
            for anomaly_map in maps
        ]
    )


def mask_at(mask: Image.Image | None, size: tuple[int, int]) -> np.ndarray:
    """A benchmark mask (PIL, or None for a normal image: all False) as a boolean (height, width) array,
    resized by nearest neighbour so it stays binary."""
    if mask is None:
        return np.zeros(size, dtype=bool)
    height, width = size
    return np.asarray(mask.convert("L").resize((width, height), Image.Resampling.NEAREST)) > 127
