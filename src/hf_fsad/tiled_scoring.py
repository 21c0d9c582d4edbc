"""Tiled scoring of large images with any one-graph method: tiled banks, streamed scoring, calibration.

```python
from hf_fsad.tiling import Tiling
from hf_fsad.tiled_scoring import build_tiled_bank, calibrate_tiled_bank, score_tiled

tiling = Tiling(tile_size=240, tile_stride=180, mode="pooled")       # or mode="position"
bank = build_tiled_bank(model, reference_images, tiling, class_name="fabric")
bank = calibrate_tiled_bank(model, bank, reference_images)          # leave-one-out, image by image
output = score_tiled(model, large_image, bank, batch_size=8)        # maps at the image's full size
```

How a tiled bank is kept: one `ReferenceBank` with its `tiling` set, so it saves, loads, checks the model that
built it and carries one calibration as any bank does (format version 4; a model refuses it in `forward`).
- pooled: the method's own bank built from every tile of every reference, each tile taken as a reference
  image; a query tile is compared with all of them (textures, where a tile's place means nothing).
- position: one bank per tile position p, built from the references' tiles at p, its tensors stored as
  `position.<p>.<name>` (a fixed part under a fixed camera: a tile is compared with what lies at its place);
  the tiling records the references' size, and a query of another size is refused (not resized: a resize
  would move every tile off its place silently).
- `k` is the number of reference images (what leave-one-out leaves out one at a time).
- Anomalous references (the anomalous memory) are cut with their masks the same way. A tile whose mask marks
  defect pixels at the model's input size is an anomalous reference with its mask's tile; a tile without is a
  defect-free part and joins the normal references; a tile whose few defect pixels vanish at the model's
  input size is left out of both, with a warning. In position mode the defect tiles of every position form
  one anomalous memory in each position's bank (a defect looks alike wherever it lies), while the
  defect-free ones join their own position's references. Tiled anomalous references need masks.
- Methods fitted on their normal images (VTFusion) are fitted on all their tiles (`fit_tiled`), then get a
  pooled bank without references; a position bank would need one fitted model per position and is refused.

Scoring (`score_tiled`) cuts the query as the bank's tiling says, encodes `batch_size` tiles at a time and
scores each against its bank, so memory grows with the tile batch, not the image: one batch of tiles and their
features, one band of tile rows in float64 (`MapStitcher`), and the full-resolution map. Each tile's map is
resized to the tile's source size and overlaps are averaged; the image score and each branch score follow
the tiling's `image_score` rule over the tiles (max by default). The bank's calibration applies to the
stitched output as to an untiled one (`apply_calibration`). Tiles are resized whole to the model's input
(`model.image_processor()`), never centre-cropped, so the tiles' maps cover the image.

Calibration (`calibrate_tiled_bank`) fits the same thresholds as `model.calibrate`, with each image scored
tiled: leave-one-out leaves out all tiles of one reference image (pooled) or its tile at every position
(position), and held-out normals are scored tiled against the bank.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from .bank import ReferenceBank
from .calibration import apply_calibration, fit_calibration_of_outputs
from .modeling_base import FsadPreTrainedModel
from .modeling_outputs import AnomalyDetectionOutput
from .tiling import MapStitcher, TileBox, Tiling, combine_tile_scores, crop_tiles
from .visualization import mask_array

Features = dict[str, torch.Tensor]


def resized_maps(maps: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, h, w) maps resized bilinearly (half-pixel centres) to (B, height, width), computed in float64 and
    returned as float32, so a constant map stays exactly constant."""
    resized = torch.nn.functional.interpolate(
        maps[:, None].double(), size=(height, width), mode="bilinear", align_corners=False
    )
    return resized[:, 0].float()


def position_prefix(position: int) -> str:
    """The name prefix of position `position`'s tensors in a position-tiled bank."""
    return f"position.{position}."


def tile_bank(bank: ReferenceBank, position: int) -> ReferenceBank:
    """The untiled bank a tile at `position` (its index in `Tiling.boxes`) is scored against: the pooled bank
    itself, or the bank of that position, without the tiling and calibration (those apply to whole images)."""
    tiling = _tiling_of(bank)
    tensors = bank.tensors
    if tiling.mode == "position":
        prefix = position_prefix(position)
        tensors = {
            name[len(prefix) :]: value for name, value in bank.tensors.items() if name.startswith(prefix)
        }
        if not tensors:
            raise ValueError(f"The position-tiled bank holds no tile position {position}.")
    return dataclasses.replace(bank, tensors=tensors, tiling=None, calibration=None)


def _unprefixed(name: str) -> str:
    """A bank tensor's name without its position prefix."""
    return name.split(".", 2)[2] if name.startswith("position.") else name


def _tiling_of(bank: ReferenceBank) -> Tiling:
    if not isinstance(bank, ReferenceBank):
        raise TypeError(f"reference_bank must be a ReferenceBank, got {type(bank).__name__}.")
    if bank.tiling is None:
        raise ValueError(
            "This reference bank is not tiled: build one with `build_tiled_bank(model, images, tiling)`, or score "
            "whole images with `model(pixel_values, reference_bank=bank)`."
        )
    return bank.tiling


def _check_batch_size(batch_size: int) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}.")


def _encoded_tiles(
    model: FsadPreTrainedModel, images: Sequence[Image.Image], tiling: Tiling, batch_size: int
) -> list[Features]:
    """Per image, the `encode_images` features of its tiles (T_i, ...) in `Tiling.boxes` order, encoded
    `batch_size` tiles at a time across images."""
    processor = model.image_processor()
    boxes = [tiling.boxes(image.height, image.width) for image in images]
    jobs = [(image, box) for image, image_boxes in zip(images, boxes) for box in image_boxes]
    batches = []
    for start in range(0, len(jobs), batch_size):
        tiles = [image.crop(box.pil_box) for image, box in jobs[start : start + batch_size]]
        batches.append(model.encode_images(processor(tiles, return_tensors="pt").pixel_values))
    if not batches:
        return []
    features = {name: torch.cat([batch[name] for batch in batches]) for name in batches[0]}
    per_image, start = [], 0
    for image_boxes in boxes:
        per_image.append({name: value[start : start + len(image_boxes)] for name, value in features.items()})
        start += len(image_boxes)
    return per_image


def _concatenated(parts: list[Features]) -> Features | None:
    return {name: torch.cat([part[name] for part in parts]) for name in parts[0]} if parts else None


@dataclass
class _AnomalousTiles:
    """The tiles of anomalous references: the defect ones (with their masks at the model's input size), and
    the defect-free ones per anomalous image (`Tiling.boxes` order, None where a tile is not defect-free)."""

    defect_features: Features
    defect_masks: torch.Tensor
    clean_features: list[list[Features | None]]


def _anomalous_tiles(
    model: FsadPreTrainedModel,
    images: Sequence[Image.Image],
    masks: Sequence[Image.Image] | None,
    tiling: Tiling,
    batch_size: int,
) -> _AnomalousTiles | None:
    if not images:
        return None
    if not model.needs_anomalous_references:
        raise ValueError(f"{type(model).__name__} takes no anomalous references.")
    if masks is None or len(masks) != len(images):
        raise ValueError(
            f"Tiled anomalous references need one mask each ({len(images)} images, "
            f"{0 if masks is None else len(masks)} masks): without one, no tile can say whether it holds the defect."
        )
    size = model.config.image_size
    defect_features, defect_masks, clean, vanished = [], [], [], 0
    for image, mask, features in zip(images, masks, _encoded_tiles(model, images, tiling, batch_size)):
        if mask.size != image.size:
            raise ValueError(
                f"An anomalous reference's mask is {mask.size} (width, height), its image {image.size}."
            )
        image_clean = []
        for index, mask_tile in enumerate(
            crop_tiles(mask.convert("L"), tiling.boxes(image.height, image.width))
        ):
            resized = torch.from_numpy(mask_array(mask_tile, size))
            tile_features = {name: value[index : index + 1] for name, value in features.items()}
            has_defect = bool((np.asarray(mask_tile) > 127).any())
            if resized.any():
                defect_features.append(tile_features)
                defect_masks.append(resized)
            vanished += has_defect and not resized.any()
            image_clean.append(None if has_defect else tile_features)
        clean.append(image_clean)
    if vanished:
        warnings.warn(
            f"{vanished} tiles of the anomalous references hold defect pixels that vanish at the model's "
            f"{size} px input: they are left out of both memories.",
            stacklevel=3,
        )
    if not defect_features:
        raise ValueError("The anomalous references' masks mark no defect pixel in any tile.")
    return _AnomalousTiles(_concatenated(defect_features), torch.stack(defect_masks), clean)


def _bank_of_tiles(
    model: FsadPreTrainedModel,
    tiling: Tiling,
    class_name: str | None,
    references: list[Features],
    anomalous: _AnomalousTiles | None,
) -> ReferenceBank:
    """The tiled bank of encoded reference tiles (see the module docstring): pooled, or one per position."""
    anomalous_inputs = {}
    if anomalous is not None:
        anomalous_inputs = {
            "anomalous_features": anomalous.defect_features,
            "anomalous_masks": anomalous.defect_masks,
        }
    clean = [] if anomalous is None else anomalous.clean_features
    if tiling.mode == "pooled":
        parts = references + [tile for image in clean for tile in image if tile is not None]
        bank = model.build_reference_bank(
            class_name=class_name, reference_features=_concatenated(parts), **anomalous_inputs
        )
        tensors = bank.tensors
    else:
        tensors = {}
        for position in range(len(tiling.boxes(*tiling.image_size))):
            parts = [
                {name: value[position : position + 1] for name, value in image.items()}
                for image in references
            ]
            parts += [image[position] for image in clean if image[position] is not None]
            bank = model.build_reference_bank(
                class_name=class_name, reference_features=_concatenated(parts), **anomalous_inputs
            )
            tensors |= {position_prefix(position) + name: value for name, value in bank.tensors.items()}
    k = len(references) if references else bank.k
    return dataclasses.replace(bank, k=k, tensors=tensors, tiling=tiling)


def _source_sized(tiling: Tiling, images: Sequence[Image.Image]) -> Tiling:
    """`tiling` with the size of `images` recorded (position mode: all must share it); each image checked to
    hold a tile."""
    for image in images:
        tiling.check_fits(image.height, image.width)
    if tiling.mode == "pooled":
        return tiling
    if not images:
        raise ValueError(
            "Position tiling compares each tile with the references' tile at its place: give reference images."
        )
    sizes = {(image.height, image.width) for image in images}
    if tiling.image_size is not None:
        sizes.add(tiling.image_size)
    if len(sizes) > 1:
        raise ValueError(
            f"Position tiling needs references of one size, got (height, width) {sorted(sizes)}: resize them to "
            "one size, or use pooled tiling."
        )
    return dataclasses.replace(tiling, image_size=sizes.pop())


@torch.no_grad()
def build_tiled_bank(
    model: FsadPreTrainedModel,
    reference_images: Sequence[Image.Image] | None,
    tiling: Tiling,
    class_name: str | None = None,
    *,
    anomalous_images: Sequence[Image.Image] | None = None,
    anomalous_masks: Sequence[Image.Image] | None = None,
    batch_size: int = 8,
) -> ReferenceBank:
    """The tiled bank of `reference_images` (RGB PIL images; None or [] for a zero-shot or fitted method's
    bank) and, for methods with anomalous references, `anomalous_images` with their `anomalous_masks` (PIL,
    non-zero = defect, each at its image's size), cut as `tiling` says and encoded `batch_size` tiles at a
    time. Position tiling records the references' size, which they must share."""
    _check_batch_size(batch_size)
    references, anomalous = list(reference_images or []), list(anomalous_images or [])
    if model.saves_its_references:
        if references:
            raise ValueError(
                f"{type(model).__name__} keeps its normal images in its weights: fit it on their tiles with "
                "`fit_tiled(model, images, tiling)`, then build the bank without references."
            )
        if tiling.mode == "position":
            raise ValueError(
                f"{type(model).__name__} is fitted on its normal images, so a position bank would need one "
                "fitted model per tile position: use pooled tiling."
            )
    tiling = _source_sized(tiling, references + anomalous)
    return _bank_of_tiles(
        model,
        tiling,
        class_name,
        _encoded_tiles(model, references, tiling, batch_size),
        _anomalous_tiles(model, anomalous, anomalous_masks, tiling, batch_size),
    )


def fit_tiled(
    model: FsadPreTrainedModel,
    normal_images: Sequence[Image.Image],
    tiling: Tiling,
    class_name: str | None = None,
    **arguments,
):
    """`model.fit` (methods fitted per category, e.g. VTFusion) on every tile of `normal_images`; then build
    its bank with `build_tiled_bank(model, None, tiling, class_name)`. Pooled tiling only."""
    if not model.fits_per_category:
        raise ValueError(
            f"{type(model).__name__} is not fitted per category: build its tiled bank from the references."
        )
    if tiling.mode != "pooled":
        raise ValueError("A model fitted on tiles compares any tile with all of them: use pooled tiling.")
    tiles = [
        tile for image in normal_images for tile in crop_tiles(image, tiling.boxes(image.height, image.width))
    ]
    return model.fit(tiles, class_name, **arguments)


@torch.no_grad()
def validate_tiled_weights(
    model: FsadPreTrainedModel,
    reference_bank: ReferenceBank,
    normal_images: Sequence[Image.Image],
    anomalous_images: Sequence[Image.Image],
    batch_size: int = 8,
) -> tuple[ReferenceBank, int]:
    """(`model.validate_weights` on a tiled bank, the number of validation views): one weight vector for every
    tile and position, the one whose tiled image scores (the tiling's `image_score` rule over each view's
    tiles' weighted scores, each tile's `score_vectors` against its own bank) rank the augmented views
    (`model.validation_views`, at the images' size, cut as the bank's tiling says) of `normal_images` and
    `anomalous_images` best. Every tile bank gets the weights; `validation_auroc` is kept once, unprefixed.
    A position bank whose positions leave different scores empty (a memory empty at some places only) is
    refused: its positions weigh different scores."""
    _check_batch_size(batch_size)
    tiling = _tiling_of(reference_bank)
    if not model.validates_weights:
        raise ValueError(f"{type(model).__name__} has no weights to validate (validates_weights is False).")
    by_position = tiling.mode == "position"
    positions = len(tiling.boxes(*tiling.image_size)) if by_position else 1
    banks = [tile_bank(reference_bank, position) for position in range(positions)]
    baselines = [{name: bank.tensors.get(name) for name in model.validated_tensors} for bank in banks]
    if any(not _equal_tensors(baselines[0], baseline) for baseline in baselines[1:]):
        raise ValueError(
            "The tile positions of this bank weigh their scores differently (a memory empty at some places "
            "only), so no one weight vector fits them all."
        )
    views, labels = model.validation_views(normal_images, anomalous_images)
    view_scores = []
    for view in views:  # one view's tiles at a time: memory holds one view's tile features
        (features,) = _encoded_tiles(model, [view], tiling, batch_size)
        if by_position:
            count = next(iter(features.values())).shape[0]
            batches = [
                {name: value[index : index + 1] for name, value in features.items()} for index in range(count)
            ]
            scores = [model.score_vectors(batch, bank) for batch, bank in zip(batches, banks)]
        else:
            scores = [
                model.score_vectors(batch, banks[0]) for batch in _feature_batches(features, batch_size)
            ]
        view_scores.append(torch.cat(scores))
    chosen = model.chosen_weights(banks[0], view_scores, labels, tiling.image_score)
    auroc = chosen.pop("validation_auroc")  # one search for the whole bank: kept once
    prefixes = [position_prefix(position) for position in range(positions)] if by_position else [""]
    tensors = reference_bank.tensors | {
        prefix + name: value for prefix in prefixes for name, value in chosen.items()
    }
    return dataclasses.replace(reference_bank, tensors=tensors | {"validation_auroc": auroc}), len(views)


def _equal_tensors(first: dict[str, torch.Tensor | None], second: dict[str, torch.Tensor | None]) -> bool:
    return all(
        (value is None and second[name] is None)
        or (value is not None and second[name] is not None and torch.equal(value, second[name]))
        for name, value in first.items()
    )


def _joined(outputs: list[AnomalyDetectionOutput]) -> AnomalyDetectionOutput:
    """Outputs of consecutive tiles joined along the batch, branch scores included."""
    maps = [output.anomaly_maps for output in outputs]
    branches = outputs[0].branch_scores or {}
    return AnomalyDetectionOutput(
        image_scores=torch.cat([output.image_scores for output in outputs]),
        anomaly_maps=None if maps[0] is None else torch.cat(maps),
        branch_scores={
            name: torch.cat([output.branch_scores[name] for output in outputs]) for name in branches
        },
    )


def _stitched(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    boxes: list[TileBox],
    image_size: tuple[int, int],
    feature_batches: Iterable[Features],
) -> AnomalyDetectionOutput:
    """One image's uncalibrated output from its tiles' features, given batch by batch in `boxes` order: each
    tile scored against its bank (`tile_bank`), its map resized to the tile's size and stitched."""
    tiling = bank.tiling
    pooled_bank = tile_bank(bank, 0) if tiling.mode == "pooled" else None
    stitcher, scores, branches, start = None, [], {}, 0
    for features in feature_batches:
        count = next(iter(features.values())).shape[0]
        if pooled_bank is not None:
            output = model.score_features(features, pooled_bank)
        else:
            output = _joined(
                [
                    model.score_features(
                        {name: value[index : index + 1] for name, value in features.items()},
                        tile_bank(bank, start + index),
                    )
                    for index in range(count)
                ]
            )
        scores.append(output.image_scores.float().cpu())
        for name, value in (output.branch_scores or {}).items():
            branches.setdefault(name, []).append(value.float().cpu())
        if output.anomaly_maps is not None:
            stitcher = stitcher or MapStitcher(*image_size, boxes)
            tile_height, tile_width = tiling.tile_size
            for box, tile_map in zip(
                boxes[start : start + count], resized_maps(output.anomaly_maps, tile_height, tile_width)
            ):
                stitcher.add(box, tile_map)
        start += count
    rule = tiling.image_score
    return AnomalyDetectionOutput(
        image_scores=combine_tile_scores(torch.cat(scores), rule)[None],
        anomaly_maps=None if stitcher is None else torch.from_numpy(stitcher.result())[None],
        branch_scores={
            name: combine_tile_scores(torch.cat(values), rule)[None] for name, values in branches.items()
        },
    )


def _feature_batches(features: Features, batch_size: int) -> Iterator[Features]:
    count = next(iter(features.values())).shape[0]
    for start in range(0, count, batch_size):
        yield {name: value[start : start + batch_size] for name, value in features.items()}


def _scored(
    model: FsadPreTrainedModel, image: Image.Image, bank: ReferenceBank, batch_size: int
) -> AnomalyDetectionOutput:
    """`score_tiled` without the calibration."""
    boxes = bank.tiling.boxes(image.height, image.width)
    processor = model.image_processor()

    def feature_batches() -> Iterator[Features]:
        for start in range(0, len(boxes), batch_size):
            tiles = crop_tiles(image, boxes[start : start + batch_size])
            yield model.encode_images(processor(tiles, return_tensors="pt").pixel_values)

    return _stitched(model, bank, boxes, (image.height, image.width), feature_batches())


@torch.no_grad()
def score_tiled(
    model: FsadPreTrainedModel, image: Image.Image, reference_bank: ReferenceBank, batch_size: int = 8
) -> AnomalyDetectionOutput:
    """Score one large RGB `image` with a tiled bank: `batch_size` tiles at a time, the maps stitched at the
    image's full size ((1, H, W)), the image and branch scores by the tiling's rule over the tiles, and the
    bank's calibration applied (labels, normalised scores, masks at full size)."""
    _check_batch_size(batch_size)
    _tiling_of(reference_bank)
    model.warn_if_untrained()
    output = _scored(model, image, reference_bank, batch_size)
    calibration = reference_bank.calibration
    return output if calibration is None else apply_calibration(output, calibration)


def _calibration_output(outputs: list[AnomalyDetectionOutput], full_maps: bool) -> AnomalyDetectionOutput:
    """Outputs of several images as one for `fit_calibration_of_outputs`. Without `full_maps` each map is kept
    as its maximum ((N, 1, 1)), all the false-alarm pixel threshold reads, so images of any size and many
    megapixels calibrate without holding their maps; with it (best-F1 pixel threshold against masks) the
    maps, which must then share one size."""
    scores = torch.cat([output.image_scores for output in outputs])
    maps = [output.anomaly_maps for output in outputs]
    if maps[0] is None:
        return AnomalyDetectionOutput(image_scores=scores)
    if not full_maps:
        return AnomalyDetectionOutput(
            image_scores=scores, anomaly_maps=torch.stack([m.amax() for m in maps])[:, None, None]
        )
    if len({tuple(m.shape) for m in maps}) > 1:
        raise ValueError("A pixel threshold fitted against masks needs calibration images of one size.")
    return AnomalyDetectionOutput(image_scores=scores, anomaly_maps=torch.cat(maps))


def _mask_tensor(masks: Sequence[Image.Image], images: Sequence[Image.Image]) -> torch.Tensor:
    """Masks at their images' full size as a boolean (A, H, W) tensor (non-zero = defect)."""
    if len(masks) != len(images):
        raise ValueError(f"{len(masks)} anomalous masks for {len(images)} anomalous images.")
    for mask, image in zip(masks, images):
        if mask.size != image.size:
            raise ValueError(f"An anomalous mask is {mask.size} (width, height), its image {image.size}.")
    return torch.from_numpy(np.stack([np.asarray(mask.convert("L")) > 127 for mask in masks]))


@torch.no_grad()
def calibrate_tiled_bank(
    model: FsadPreTrainedModel,
    reference_bank: ReferenceBank,
    reference_images: Sequence[Image.Image] | None = None,
    *,
    anomalous_references: Sequence[Image.Image] | None = None,
    anomalous_reference_masks: Sequence[Image.Image] | None = None,
    normal_images: Sequence[Image.Image] | None = None,
    anomalous_images: Sequence[Image.Image] | None = None,
    anomalous_masks: Sequence[Image.Image] | None = None,
    false_alarm_rate: float = 0.05,
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
    batch_size: int = 8,
    scorer: Callable[[Image.Image], AnomalyDetectionOutput] | None = None,
) -> ReferenceBank:
    """The tiled bank with a `Calibration`, as `model.calibrate` fits it, every image scored tiled.

    Normal scores: the held-out `normal_images` scored against the bank when given, else leave-one-out on
    the `reference_images` the bank was built from: each scored against a tiled bank of the others' tiles
    (and of the `anomalous_references` with their `anomalous_reference_masks` the bank was built with, which
    stay), keeping the bank's `validated_tensors`. `anomalous_images` (with `anomalous_masks` at their full
    size for rule="best_f1") are scored against the bank with held-out normals, else against every
    leave-one-out bank and averaged. `false_alarm_rate`, `confidence` and `rule` as `model.calibrate` takes
    them. `scorer` (image -> its uncalibrated tiled output against this bank, e.g. the bank's export,
    `hf_fsad.export.ExportedScorer.score_tiled`) scores the held-out images instead of PyTorch, so the
    calibration holds for its scores; it scores with the whole bank, so it needs `normal_images`.
    """
    _check_batch_size(batch_size)
    tiling = _tiling_of(reference_bank)
    model.checked_bank(dataclasses.replace(reference_bank, tiling=None))
    anomalous_images = list(anomalous_images or [])
    if anomalous_masks is not None and not anomalous_images:
        raise ValueError("anomalous_masks were given without anomalous_images.")
    if scorer is not None and not normal_images:
        raise ValueError(
            "A scorer scores against the whole bank, so it cannot leave references out: give normal_images."
        )
    masks = None if anomalous_masks is None else _mask_tensor(anomalous_masks, anomalous_images)
    if normal_images:
        score = scorer or (lambda image: _scored(model, image, reference_bank, batch_size))
        normal = [score(image) for image in normal_images]
        anomalous = [score(image) for image in anomalous_images]
        source = "held_out"
    else:
        normal, anomalous = _leave_one_out(
            model,
            reference_bank,
            list(reference_images or []),
            _anomalous_tiles(
                model, list(anomalous_references or []), anomalous_reference_masks, tiling, batch_size
            ),
            anomalous_images,
            batch_size,
        )
        source = "leave_one_out"
    calibration = fit_calibration_of_outputs(
        _calibration_output(normal, masks is not None),
        _calibration_output(anomalous, masks is not None) if anomalous else None,
        masks,
        normal_source=source,
        false_alarm_rate=false_alarm_rate,
        confidence=confidence,
        rule=rule,
    )
    shortfall = calibration.shortfall()
    if shortfall is not None:
        warnings.warn(shortfall, stacklevel=3)
    return dataclasses.replace(reference_bank, calibration=calibration)


def _leave_one_out(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    references: list[Image.Image],
    anomalous_references: _AnomalousTiles | None,
    anomalous_images: list[Image.Image],
    batch_size: int,
) -> tuple[list[AnomalyDetectionOutput], list[AnomalyDetectionOutput]]:
    """(each reference scored against the tiled bank of the others, each anomalous image's mean output over
    those banks)."""
    refusal = model.leave_one_out_refusal(len(references), bank.generated_references)
    if refusal is not None:
        raise ValueError(f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal_images.")
    if model.needs_anomalous_references and anomalous_references is None:
        raise ValueError(
            f"{type(model).__name__} builds its bank with anomalous references too: pass the "
            "anomalous_references and anomalous_reference_masks the bank was built with."
        )
    tiling = bank.tiling
    for image in references:
        tiling.boxes(image.height, image.width)  # position banks: the references' size
    features = _encoded_tiles(model, references, tiling, batch_size)
    anomalous_features = _encoded_tiles(model, anomalous_images, tiling, batch_size)
    normal, anomalous_sums = [], [None] * len(anomalous_images)
    for index, image in enumerate(references):
        left_out = _bank_of_tiles(
            model, tiling, bank.class_name, features[:index] + features[index + 1 :], anomalous_references
        )
        validated = {
            name: value
            for name, value in bank.tensors.items()
            if _unprefixed(name) in model.validated_tensors
        }
        left_out = dataclasses.replace(left_out, tensors=left_out.tensors | validated)
        normal.append(_scored_features(model, left_out, image, features[index], batch_size))
        for position, (anomalous_image, tiles) in enumerate(zip(anomalous_images, anomalous_features)):
            output = _scored_features(model, left_out, anomalous_image, tiles, batch_size)
            anomalous_sums[position] = (
                output if anomalous_sums[position] is None else _summed(anomalous_sums[position], output)
            )
    count = len(references)
    anomalous = [
        AnomalyDetectionOutput(
            image_scores=total.image_scores / count,
            anomaly_maps=None if total.anomaly_maps is None else total.anomaly_maps / count,
        )
        for total in anomalous_sums
    ]
    return normal, anomalous


def _scored_features(
    model: FsadPreTrainedModel, bank: ReferenceBank, image: Image.Image, features: Features, batch_size: int
) -> AnomalyDetectionOutput:
    boxes = bank.tiling.boxes(image.height, image.width)
    return _stitched(model, bank, boxes, (image.height, image.width), _feature_batches(features, batch_size))


def _summed(first: AnomalyDetectionOutput, second: AnomalyDetectionOutput) -> AnomalyDetectionOutput:
    return AnomalyDetectionOutput(
        image_scores=first.image_scores + second.image_scores,
        anomaly_maps=None if first.anomaly_maps is None else first.anomaly_maps + second.anomaly_maps,
    )
