"""One policy for the bank a detector scores with, wherever it is made (`hf-fsad score`, the pipeline, the Space,
the benchmark runner): `calibrated_bank` builds it from normal references (exact copies left out) and, for a
method that learns from them, defective images with their masks (paired by file name); runs the anomalous
memory's weight search (paper Sec. 4.3) where defects are given; and calibrates it on held-out normal images,
by leave-one-out on the references, or on the scores of an exported runtime, or says why it cannot. With a
`Tiling` (or a saved tiled bank) the bank is tiled and calibrated on tiled scores (`hf_fsad.tiled_scoring`).

Module-level imports stay light (the command line's parser reads `DEFAULT_FALSE_ALARM_RATE`); torch loads
when a bank is built.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    import torch
    from PIL import Image
    from transformers import CLIPImageProcessorPil

    from .bank import ReferenceBank
    from .modeling_base import FsadPreTrainedModel
    from .modeling_outputs import AnomalyDetectionOutput
    from .tiling import Tiling

    # Images in order, or keyed by file name: masks are then paired with images by file stem.
    Images = Sequence[Image.Image] | Mapping[str, Image.Image]
    # An exported graph's scoring function: pixel values -> uncalibrated outputs (`ExportedScorer`, which with a
    # tiled bank scores images with `score_tiled` instead).
    Scorer = Callable[[torch.Tensor], AnomalyDetectionOutput]

DEFAULT_FALSE_ALARM_RATE = 0.05


class BankBuildError(ValueError):
    """The reference bank cannot be built from the images given (as opposed to calibrated)."""


@dataclass
class EncodedReferences:
    """Normal references already encoded by `model.encode_images` (the benchmark runner's feature cache); the
    last `generated` of them were generated from the others (`ReferenceBank.generated_references`)."""

    features: dict[str, torch.Tensor]
    generated: int = 0


@dataclass
class CalibratedBank:
    """What `calibrated_bank` made: the bank, notes on what it left out and on the weight search, the
    warnings of the calibration (too few normals for the promise asked), and why the bank is not calibrated
    (None: calibrated, or no calibration was asked for)."""

    bank: ReferenceBank
    notes: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    refusal: str | None = None


def paired_masks(
    images: Images, masks: Images | None, what: str
) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """(`images`, their masks in the images' order, or None without masks). Images and masks keyed by file
    name are paired by file stem (`hf_fsad.io.masks_by_stem`: `000.png` with `000.png` or `000_mask.png`);
    given in order, they pair in order. A ValueError names `what` when a mask is missing, unused or ambiguous."""
    from .io import masks_by_stem

    named = isinstance(images, Mapping), isinstance(masks, Mapping)
    image_list = list(images.values()) if named[0] else list(images)
    if masks is None:
        return image_list, None
    if not image_list:
        raise ValueError(f"{what} masks were given without {what} images: give the images they outline")
    if all(named):
        mask_by_path = {Path(name): mask for name, mask in masks.items()}
        order = masks_by_stem(
            [Path(name) for name in images], list(mask_by_path), f"{what} image", f"{what} mask"
        )
        return image_list, [mask_by_path[path] for path in order]
    if any(named):
        raise ValueError(
            f"give the {what} images and their masks both with file names (paired by stem) or both in order"
        )
    if len(masks) != len(image_list):
        raise ValueError(
            f"{len(masks)} {what} masks for {len(image_list)} {what} images: give one mask per image, or none"
        )
    return image_list, list(masks)


def mask_tensor(masks: list[Image.Image], size: int, crop: bool = False) -> torch.Tensor:
    """Masks as a boolean (A, size, size) tensor at the model's input size (non-zero = defect), centre-cropped
    like the images when `crop`."""
    import numpy as np
    import torch

    from .visualization import mask_array

    return torch.from_numpy(np.stack([mask_array(mask, size, crop) for mask in masks]))


def calibrated_bank(
    model: FsadPreTrainedModel,
    references: Sequence[Image.Image] | EncodedReferences | None = None,
    *,
    class_name: str | None = None,
    defects: Images = (),
    defect_masks: Images | None = None,
    held_out_normals: Sequence[Image.Image] = (),
    anomalous: Images = (),
    anomalous_masks: Images | None = None,
    bank: ReferenceBank | None = None,
    calibrate: bool | Literal["auto"] = "auto",
    false_alarm_rate: float | None = None,
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
    weight_search: bool = True,
    paper_preprocessing: bool = False,
    processor=None,
    precision: str = "float32",
    batch_size: int = 8,
    runtime: str = "torch",
    runtime_scorer: Callable[[ReferenceBank], Scorer] | None = None,
    tiling: Tiling | None = None,
) -> CalibratedBank:
    """The bank `model` scores with, built and calibrated by the one policy of the CLI, pipeline, Space and runner.

    Bank: a saved `bank` as given, or built from the `references` (images: exact copies left out, with a
    note; or `EncodedReferences`; None: zero-shot) and, for a method that learns from them
    (`needs_anomalous_references`), the `defects` with their `defect_masks` (`paired_masks`: by file stem when
    keyed by file name; None: each defect wholly anomalous). `held_out_normals` that are also references are
    left out with a note.

    Weight search (methods with `validates_weights`, when defects are given and `weight_search`): the
    anomalous memory's score weights are chosen on augmented views of the defects and of the held-out normals,
    or of the references without them (paper Sec. 4.3; a note says whether it ran). The normals that chose the
    weights do not calibrate them: their scores would run low.

    Calibration (`model.calibrate`): on the held-out normals, else leave-one-out on the references, with the
    `anomalous` images (and `anomalous_masks`, rule "best_f1" only) scored alike; at `false_alarm_rate`
    (None: `DEFAULT_FALSE_ALARM_RATE`), `confidence` and `rule`, in `precision` (recorded). Images are
    preprocessed by `processor` (None: `model.image_processor()`, or with `paper_preprocessing` the geometry of
    the method's paper evaluation, masks alike, as the benchmark runner does). With a
    `runtime_scorer` (bank -> the scorer of its graph exported to `runtime`, `hf_fsad.export.ExportedScorer`),
    held-out normals are scored by that graph instead (`calibrate_on_scorer`; tiled: `ExportedScorer.score_tiled`). calibrate="auto" calibrates where possible and returns the
    reason where not (`refusal`); True raises a ValueError with the reason; False calibrates nothing. A saved
    bank with calibrate="auto" and no held-out normals keeps its own calibration. A ValueError names what
    cannot be used (a `BankBuildError` when the bank cannot be built).
    """
    import torch

    from .calibration_inputs import separate_calibration_images

    if calibrate is False and (held_out_normals or anomalous):
        raise ValueError("Calibration images were given with calibrate=False.")
    if calibrate not in (True, False, "auto"):
        raise ValueError(f'calibrate must be True, False or "auto", got {calibrate!r}.')
    # an int8 graph exists only exported: what PyTorch computes here runs in float32
    torch_precision = "float32" if precision == "int8" else precision
    notes: list[str] = []
    defect_images, defect_mask_images = paired_masks(defects, defect_masks, "defect")
    anomalous_images, anomalous_mask_images = paired_masks(anomalous, anomalous_masks, "anomalous")
    if bank is not None and (references or defect_images):
        raise ValueError("give a saved bank or the images to build one, not both")
    if defect_images and not model.needs_anomalous_references:
        raise ValueError(
            f"{model.config.model_type} builds its bank from normal references only: defective images can "
            "calibrate its threshold instead (anomalous images)"
        )
    if bank is not None:
        conflict = tiling_conflict(bank, tiling)
        if conflict is not None:
            raise ValueError(conflict)
        tiling = bank.tiling
    if tiling is not None:
        return _tiled_calibrated_bank(
            model,
            references,
            tiling,
            class_name=class_name,
            defects=(defect_images, defect_mask_images),
            held_out_normals=held_out_normals,
            anomalous=(anomalous_images, anomalous_mask_images),
            bank=bank,
            calibrate=calibrate,
            settings={
                "false_alarm_rate": false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
                "confidence": confidence,
                "rule": rule,
                "batch_size": batch_size,
            },
            refused={"processor": processor is not None, "paper_preprocessing": paper_preprocessing},
            precision=precision,
            runtime=runtime,
            runtime_scorer=runtime_scorer,
            weight_search=weight_search,
        )
    if processor is None:
        processor = model.paper_image_processor() if paper_preprocessing else model.image_processor()
    crop = paper_preprocessing and model.config.paper_preprocessing == "crop"

    def pixel_values(images: Sequence[Image.Image]) -> torch.Tensor | None:
        return processor(list(images), return_tensors="pt").pixel_values if images else None

    reference_images: list[Image.Image] = []
    if isinstance(references, EncodedReferences):
        reference_inputs, generated = {"reference_features": references.features}, references.generated
        held_out = list(held_out_normals)
    else:
        separated = separate_calibration_images(references or [], held_out_normals)
        notes += separated.notes
        reference_images, held_out = separated.references, separated.held_out_normals
        reference_inputs = {"reference_pixel_values": pixel_values(reference_images)}
        generated = separated.generated_references
    bank_inputs = {}
    if defect_images:
        bank_inputs["anomalous_pixel_values"] = pixel_values(defect_images)
        if defect_mask_images is not None:
            bank_inputs["anomalous_masks"] = mask_tensor(defect_mask_images, model.config.image_size, crop)
    if bank is None:
        try:
            with torch.no_grad():
                bank = model.build_reference_bank(class_name=class_name, **reference_inputs, **bank_inputs)
        except ValueError as error:
            raise BankBuildError(f"the reference bank cannot be built: {error}") from None
        bank = dataclasses.replace(bank, generated_references=generated)
    elif calibrate == "auto" and not held_out:
        refusal = None if bank.calibration else "the bank was saved without a calibration"
        return CalibratedBank(bank, notes, [], refusal)

    chose_weights = None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if model.validates_weights and defect_images:
            with torch.no_grad(), model.autocast(torch_precision):
                bank, chose_weights, note = _searched_weights(
                    functools.partial(_validated, model, processor=processor),
                    bank,
                    held_out,
                    reference_images,
                    defect_images,
                    weight_search,
                )
            notes.append(note)
        if calibrate is False:
            return CalibratedBank(dataclasses.replace(bank, calibration=None), notes)
        calibration_normals = [] if chose_weights == "held-out normal" else held_out
        refusal = None
        if runtime_scorer is not None and calibration_normals:
            bank = calibrate_on_scorer(
                runtime_scorer(dataclasses.replace(bank, calibration=None)),
                processor,
                bank,
                calibration_normals,
                anomalous_images,
                anomalous_mask_images,
                runtime=runtime,
                precision=precision,
                image_size=model.config.image_size,
                crop=crop,
                false_alarm_rate=false_alarm_rate,
                confidence=confidence,
                rule=rule,
                batch_size=batch_size,
            )
        else:
            masks = anomalous_mask_images
            masks = None if masks is None else mask_tensor(masks, model.config.image_size, crop)
            with torch.no_grad(), model.autocast(torch_precision):
                bank, refusal = calibrate_reference_bank(
                    model,
                    bank,
                    calibrate,
                    **reference_inputs,
                    normal_pixel_values=pixel_values(calibration_normals),
                    anomalous_pixel_values=pixel_values(anomalous_images),
                    anomalous_masks=masks,
                    false_alarm_rate=false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
                    confidence=confidence,
                    rule=rule,
                    batch_size=batch_size,
                    bank_inputs=bank_inputs,
                    weights_chosen_by=chose_weights,
                )
            if refusal is None:
                calibration = dataclasses.replace(
                    bank.calibration, runtime="torch", precision=torch_precision
                )
                bank = dataclasses.replace(bank, calibration=calibration)
    if refusal is not None and anomalous_images:
        notes.append(
            "the defective images given to calibrate were not used: without normal scores there is no threshold"
        )
    return CalibratedBank(bank, notes, [str(warning.message) for warning in caught], refusal)


def checked_saved_bank(model: FsadPreTrainedModel, bank: ReferenceBank) -> ReferenceBank:
    """A saved `bank` checked against `model` (`model.checked_bank`), tiled or not: a tiled bank is checked as
    the banks of its tiles, which `model` scores (the forward pass refuses a tiled bank: it scores whole
    images)."""
    if bank.tiling is None:
        return model.checked_bank(bank)
    checked = model.checked_bank(dataclasses.replace(bank, tiling=None))
    return dataclasses.replace(checked, tiling=bank.tiling)


def tiling_conflict(bank: ReferenceBank, tiling: Tiling | None) -> str | None:
    """Why `tiling` (asked for scoring with the saved `bank`) cannot be used, or None: a tiled bank is scored
    as it was tiled (asking for nothing, or for its own tile size, stride and mode, is fine), and an untiled
    bank cannot be scored tiled."""
    if tiling is None:
        return None
    if bank.tiling is None:
        return (
            f"the bank is not tiled, so it cannot score with {tiling.describe()}: build a tiled bank from the "
            "reference images"
        )
    asked = tiling.tile_size, tiling.tile_stride, tiling.mode
    if asked != (bank.tiling.tile_size, bank.tiling.tile_stride, bank.tiling.mode):
        return (
            f"the bank was built with {bank.tiling.describe()}, but {tiling.describe()} was asked: a bank is "
            "scored as it was tiled (leave the tile options out, or build a bank with them)"
        )
    return None


def _tiled_calibrated_bank(
    model: FsadPreTrainedModel,
    references,
    tiling: Tiling,
    *,
    class_name: str | None,
    defects: tuple[list[Image.Image], list[Image.Image] | None],
    held_out_normals: Sequence[Image.Image],
    anomalous: tuple[list[Image.Image], list[Image.Image] | None],
    bank: ReferenceBank | None,
    calibrate: bool | Literal["auto"],
    settings: dict,
    refused: dict[str, bool],
    precision: str,
    runtime: str,
    runtime_scorer: Callable[[ReferenceBank], Scorer] | None,
    weight_search: bool,
) -> CalibratedBank:
    """`calibrated_bank` for a tiled bank (its docstring says what differs): the weight search runs on tiles
    (`validate_tiled_weights`); with a `runtime_scorer`, the held-out normals are scored tiled by the export
    (`ExportedScorer.score_tiled`)."""
    import torch

    from .calibration_inputs import separate_calibration_images
    from .tiled_scoring import build_tiled_bank, calibrate_tiled_bank, validate_tiled_weights

    torch_precision = "float32" if precision == "int8" else precision  # as in `calibrated_bank`
    given = [name for name, value in refused.items() if value]
    if isinstance(references, EncodedReferences):
        given.append("encoded references")
    if given:
        raise ValueError(
            f"tiled banks take reference images and resize each tile whole with the model's image processor: "
            f"{', '.join(given)} cannot be used with tiling"
        )
    separated = separate_calibration_images(references or [], held_out_normals)
    notes = list(separated.notes)
    reference_images, held_out = separated.references, separated.held_out_normals
    defect_images, defect_masks = defects
    if bank is None:
        try:
            bank = build_tiled_bank(
                model,
                reference_images,
                tiling,
                class_name,
                anomalous_images=defect_images,
                anomalous_masks=defect_masks,
                batch_size=settings["batch_size"],
            )
        except ValueError as error:
            raise BankBuildError(f"the reference bank cannot be built: {error}") from None
        bank = dataclasses.replace(bank, generated_references=separated.generated_references)
    elif calibrate == "auto" and not held_out:
        refusal = None if bank.calibration else "the bank was saved without a calibration"
        return CalibratedBank(bank, notes, [], refusal)
    chose_weights = None
    if model.validates_weights and defect_images:
        search = functools.partial(validate_tiled_weights, model, batch_size=settings["batch_size"])
        with torch.no_grad(), model.autocast(torch_precision):
            bank, chose_weights, note = _searched_weights(
                search, bank, held_out, reference_images, defect_images, weight_search
            )
        notes.append(note)
    if calibrate is False:
        return CalibratedBank(dataclasses.replace(bank, calibration=None), notes)
    anomalous_images, anomalous_masks = anomalous
    held_out = [] if chose_weights == "held-out normal" else held_out  # they would score low
    if not held_out:
        refusal = _leave_one_out_refusal(
            model, len(reference_images), bank.generated_references, chose_weights
        )
        if refusal is not None:
            if calibrate is True:
                raise ValueError(
                    f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal images."
                )
            if anomalous_images:
                notes.append(
                    "the defective images given to calibrate were not used: without normal scores there is no "
                    "threshold"
                )
            return CalibratedBank(bank, notes, [], refusal)
    scorer = None
    if runtime_scorer is not None and held_out:
        exported = runtime_scorer(dataclasses.replace(bank, calibration=None))
        scorer = functools.partial(exported.score_tiled, batch_size=settings["batch_size"])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.no_grad(), model.autocast(torch_precision):
            bank = calibrate_tiled_bank(
                model,
                bank,
                reference_images,
                anomalous_references=defect_images,
                anomalous_reference_masks=defect_masks,
                normal_images=held_out,
                anomalous_images=anomalous_images,
                anomalous_masks=anomalous_masks,
                scorer=scorer,
                **settings,
            )
    calibration = dataclasses.replace(
        bank.calibration,
        runtime="torch" if scorer is None else runtime,
        precision=torch_precision if scorer is None else precision,
    )
    return CalibratedBank(
        dataclasses.replace(bank, calibration=calibration),
        notes,
        [str(warning.message) for warning in caught],
    )


def _searched_weights(
    search: Callable[[ReferenceBank, list[Image.Image], list[Image.Image]], tuple[ReferenceBank, int]],
    bank: ReferenceBank,
    held_out: list[Image.Image],
    references: list[Image.Image],
    defects: list[Image.Image],
    weight_search: bool,
) -> tuple[ReferenceBank, str | None, str]:
    """(bank, which normals chose its weights: "held-out normal", "reference" or None, the note saying so):
    `search` (bank, normals, defects -> the bank with its weights chosen on their views, how many views:
    `_validated`, or `validate_tiled_weights` for a tiled bank) on the defects and the held-out normals, or
    the references without them."""
    kept = "the baseline score weights are kept"
    if not weight_search:
        return bank, None, f"weight search (paper Sec. 4.3) skipped as asked: {kept}"
    kind, normals = ("held-out normal", held_out) if held_out else ("reference", references)
    if not normals:
        reason = "it needs a normal image beside the defects (a reference or a held-out normal image)"
        return bank, None, f"weight search (paper Sec. 4.3) not run: {reason}; {kept}"
    bank, views = search(bank, normals, defects)
    auroc = float(bank.tensors["validation_auroc"])
    ran = (
        f"weight search (paper Sec. 4.3) ran: the score weights that rank {views} augmented views of "
        f"{len(normals)} {kind} and {len(defects)} defective images best (validation AUROC {auroc:.3f})"
    )
    return bank, kind, ran


def _validated(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    normals: list[Image.Image],
    defects: list[Image.Image],
    processor: CLIPImageProcessorPil | None = None,
) -> tuple[ReferenceBank, int]:
    """`model.validate_weights` on the views `model.validation_set` makes of `normals` and `defects`,
    preprocessed by `processor` as the bank was, and how many views."""
    views, labels = model.validation_set(normals, defects, processor)
    return model.validate_weights(bank, views, labels), len(views)


def _leave_one_out_refusal(
    model: FsadPreTrainedModel, count: int, generated: int, weights_chosen_by: str | None
) -> str | None:
    """Why a bank of `count` references (`generated` of them generated) cannot be calibrated by leave-one-out
    (`model.leave_one_out_refusal`, or the references chose its weights: their scores would run low), or
    None; `weights_chosen_by` "held-out normal" adds why those cannot stand in."""
    refusal = model.leave_one_out_refusal(count, generated)
    if weights_chosen_by == "reference":
        return (
            "the references chose the bank's score weights (weight search), so their leave-one-out scores "
            "would run too low"
        )
    if weights_chosen_by is not None and refusal is not None:
        refusal += f", and the {weights_chosen_by} images chose the bank's score weights (weight search)"
    return refusal


def calibrate_reference_bank(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    calibrate: bool | Literal["auto"] = "auto",
    *,
    reference_pixel_values: torch.Tensor | None = None,
    reference_features: dict[str, torch.Tensor] | None = None,
    normal_pixel_values: torch.Tensor | None = None,
    anomalous_pixel_values: torch.Tensor | None = None,
    anomalous_masks: torch.Tensor | None = None,
    false_alarm_rate: float = DEFAULT_FALSE_ALARM_RATE,
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
    batch_size: int = 8,
    bank_inputs: dict | None = None,
    weights_chosen_by: str | None = None,
) -> tuple[ReferenceBank, str | None]:
    """`calibrated_bank`'s calibration step, on pixel values: (`bank` calibrated by `model.calibrate`, None),
    or (`bank` as given, the reason) when calibrate="auto" and it cannot be calibrated.

    The normals are the held-out `normal_pixel_values` when given, else the references the bank was built
    from (`reference_pixel_values` or their `reference_features`), each scored against a bank of the others and
    of `bank_inputs` (anomalous memory: its anomalous references). Leave-one-out is refused where
    `model.leave_one_out_refusal` says so, and when the references chose the bank's weights
    (`weights_chosen_by` "reference"; "held-out normal" adds to the reason why those cannot stand in). True
    requires a calibration (a ValueError says why it is impossible); False returns the bank without one.
    `false_alarm_rate`, `confidence`, `rule`: as `model.calibrate` describes.
    """
    if calibrate is False:
        if normal_pixel_values is not None or anomalous_pixel_values is not None:
            raise ValueError("Calibration images were given with calibrate=False.")
        return dataclasses.replace(bank, calibration=None), None
    if normal_pixel_values is None:
        if reference_pixel_values is not None:
            num_references = len(reference_pixel_values)
        else:
            num_references = 0 if reference_features is None else len(next(iter(reference_features.values())))
        refusal = _leave_one_out_refusal(model, num_references, bank.generated_references, weights_chosen_by)
        if refusal is not None:
            if calibrate is True:
                raise ValueError(
                    f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal images."
                )
            return bank, refusal
    calibrated = model.calibrate(
        bank,
        reference_pixel_values if normal_pixel_values is None else None,
        reference_features=reference_features if normal_pixel_values is None else None,
        normal_pixel_values=normal_pixel_values,
        anomalous_pixel_values=anomalous_pixel_values,
        anomalous_masks=anomalous_masks,
        false_alarm_rate=false_alarm_rate,
        confidence=confidence,
        rule=rule,
        bank_inputs=(bank_inputs or {}) if model.needs_anomalous_references else None,
        batch_size=batch_size,
    )
    return calibrated, None


def calibrate_on_scorer(
    scorer: Scorer,
    processor,
    bank: ReferenceBank,
    normal: list[Image.Image],
    anomalous: list[Image.Image],
    masks: list[Image.Image] | None,
    *,
    runtime: str,
    precision: str,
    image_size: int,
    false_alarm_rate: float | None,
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
    batch_size: int,
    crop: bool = False,
) -> ReferenceBank:
    """`bank` calibrated on the held-out `normal` (and `anomalous`) images scored by `scorer`: for an exported
    graph on `runtime` at `precision`, which has the bank built in, so its references cannot be left out (that
    would take one export per reference). `scorer` returns uncalibrated scores; masks are compared at the
    model's `image_size` (centre-cropped alike with `crop`, as the paper preprocessing crops). Too few normals for the promise asked warn, as `model.calibrate` does."""
    from .calibration import fit_calibration_of_outputs
    from .modeling_outputs import concatenated_outputs

    def scored(chosen: list[Image.Image]) -> AnomalyDetectionOutput:
        return concatenated_outputs(
            [
                scorer(processor(chosen[start : start + batch_size], return_tensors="pt").pixel_values)
                for start in range(0, len(chosen), batch_size)
            ]
        )

    calibration = fit_calibration_of_outputs(
        scored(normal),
        scored(anomalous) if anomalous else None,
        None if masks is None else mask_tensor(masks, image_size, crop),
        normal_source="held_out",
        false_alarm_rate=false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
        confidence=confidence,
        rule=rule,
    )
    shortfall = calibration.shortfall()
    if shortfall is not None:
        warnings.warn(shortfall, stacklevel=2)
    calibration = dataclasses.replace(calibration, runtime=runtime, precision=precision)
    return dataclasses.replace(bank, calibration=calibration)
