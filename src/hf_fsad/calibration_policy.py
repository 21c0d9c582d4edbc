"""How `hf-fsad score` calibrates the bank it scores with: on held-out normal images, on anomalous images (and
their masks), or by leave-one-out on the references a bank was built from; a saved bank is used as saved
unless a calibration is asked for. `separate_calibration_images` (CLI, pipeline, Space) keeps exact copies out
of the references and the references out of the held-out normals; a calibration fits only the runtime and
precision it was fitted at (`calibration_mismatch`), and `calibrate_on_scorer` fits one on an exported runtime.

Module-level imports stay light (the command line's parser reads `DEFAULT_FALSE_ALARM_RATE`); torch loads
when a bank is calibrated.
"""

from __future__ import annotations

import dataclasses
import hashlib
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .bank import GENERATED_IMAGE_INFO

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .bank import ReferenceBank
    from .calibration import Calibration
    from .modeling_base import FsadPreTrainedModel
    from .modeling_outputs import AnomalyDetectionOutput

DEFAULT_FALSE_ALARM_RATE = 0.05


@dataclass
class CalibrationImages:
    """The images a bank is calibrated with, read before the model loads: held-out normals, anomalous images
    and their masks (one per anomalous image, in the same order, or None)."""

    normal: list[Image.Image]
    anomalous: list[Image.Image]
    masks: list[Image.Image] | None

    @property
    def given(self) -> bool:
        return bool(self.normal or self.anomalous)


@dataclass
class SeparatedImages:
    """The references without exact copies, the held-out normals without the references' images, how many
    references are generated (`ReferenceBank.generated_references`) and notes saying what was left out."""

    references: list[Image.Image]
    held_out_normals: list[Image.Image]
    generated_references: int
    notes: list[str]


def image_digest(image: Image.Image) -> str:
    """SHA-256 of an image's decoded RGB pixels and size: equal for exact copies, whatever their files."""
    image = image if image.mode == "RGB" else image.convert("RGB")
    digest = hashlib.sha256(f"{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def separate_calibration_images(
    references: Sequence[Image.Image], held_out_normals: Sequence[Image.Image] = ()
) -> SeparatedImages:
    """Exact copies among `references` (same decoded pixels) left out but the first, and the
    `held_out_normals` that are also references left out, each with a note: a copy of a left-out reference
    would stay in its leave-one-out bank, and a held-out image in the bank is not held out. Generated
    references (marked `GENERATED_IMAGE_INFO` by `augment_references_with_generated`) are counted. A ValueError
    when every held-out normal is a reference."""
    kept, seen = [], set()
    for image in references:
        digest = image_digest(image)
        if digest not in seen:
            seen.add(digest)
            kept.append(image)
    notes = []
    if len(kept) < len(references):
        notes.append(
            f"{len(references) - len(kept)} of the {len(references)} reference images are exact copies of "
            "others (same pixels) and were left out: leave-one-out would keep a left-out image's copy in "
            "the bank"
        )
    held_out = [image for image in held_out_normals if image_digest(image) not in seen]
    if held_out_normals and not held_out:
        raise ValueError(
            f"all {len(held_out_normals)} held-out normal images are also reference images: the bank holds "
            "them, so they cannot calibrate it; give normal images that are not references"
        )
    if len(held_out) < len(held_out_normals):
        notes.append(
            f"{len(held_out_normals) - len(held_out)} of the {len(held_out_normals)} held-out normal images "
            "are also reference images and were left out of the calibration: the bank holds them"
        )
    generated = sum(bool(image.info.get(GENERATED_IMAGE_INFO)) for image in kept)
    return SeparatedImages(kept, held_out, generated, notes)


def calibration_mismatch(calibration: Calibration, runtime: str, precision: str) -> str | None:
    """Why `calibration`'s thresholds do not fit scores computed on `runtime` at `precision` (it was fitted
    on other ones), or None."""
    if (calibration.runtime, calibration.precision) == (runtime, precision):
        return None
    return (
        f"the bank's calibration was fitted on {calibration.runtime} at {calibration.precision}, but the "
        f"images are scored on {runtime} at {precision}"
    )


def mask_tensor(masks: list[Image.Image], size: int) -> torch.Tensor:
    """Masks as a boolean (A, size, size) tensor at the model's input size (non-zero = defect)."""
    import numpy as np
    import torch

    from .visualization import mask_array

    return torch.from_numpy(np.stack([mask_array(mask, size) for mask in masks]))


def calibrate_bank(
    model: FsadPreTrainedModel,
    processor,
    bank: ReferenceBank,
    images: CalibrationImages,
    *,
    saved: bool,
    references: torch.Tensor | None,
    bank_inputs: dict,
    false_alarm_rate: float | None,
    confidence: float | None = None,
    no_calibration: bool,
    precision: str,
    batch_size: int,
) -> tuple[ReferenceBank, str | None, list[str]]:
    """(bank, why it is not calibrated or None, the warnings calibrating raised): `bank` calibrated as asked.

    A built bank is calibrated by leave-one-out by default (each of its `references` scored against a bank of
    the others and the `bank_inputs` it was built with); a `saved` bank is used as saved unless calibration
    images, a `false_alarm_rate` or a `confidence` are given (None: `DEFAULT_FALSE_ALARM_RATE`, not asked for).
    `no_calibration` leaves any calibration out. Calibration scores are computed as the queries' are: at
    `precision`, `batch_size` images at a time. A ValueError says why an asked-for calibration is impossible.
    """
    import torch

    from .pipeline import calibrate_reference_bank

    asked = images.given or false_alarm_rate is not None or confidence is not None
    if saved and not asked and not no_calibration:
        return bank, None if bank.calibration else "the --bank was saved without a calibration", []

    def pixel_values(chosen: list[Image.Image]) -> torch.Tensor | None:
        return processor(chosen, return_tensors="pt").pixel_values if chosen else None

    masks = None if images.masks is None else mask_tensor(images.masks, model.config.image_size)
    with torch.no_grad(), model.autocast(precision), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank, refusal = calibrate_reference_bank(
            model,
            bank,
            False if no_calibration else True if asked else "auto",
            reference_pixel_values=references,
            normal_pixel_values=pixel_values(images.normal),
            anomalous_pixel_values=pixel_values(images.anomalous),
            anomalous_masks=masks,
            false_alarm_rate=false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
            confidence=confidence,
            batch_size=batch_size,
            bank_inputs=bank_inputs,
        )
    if refusal is None and bank.calibration is not None:
        bank = dataclasses.replace(
            bank, calibration=dataclasses.replace(bank.calibration, precision=precision)
        )
    return bank, refusal, [str(warning.message) for warning in caught]


def calibrate_on_scorer(
    scorer: Callable[[torch.Tensor], AnomalyDetectionOutput],
    processor,
    bank: ReferenceBank,
    images: CalibrationImages,
    *,
    runtime: str,
    precision: str,
    image_size: int,
    false_alarm_rate: float | None,
    confidence: float | None = None,
    batch_size: int,
) -> tuple[ReferenceBank, list[str]]:
    """(`bank` calibrated on the held-out normals (and anomalous images) of `images` scored by `scorer`, the
    notes): for an exported graph on `runtime` at `precision`, which has the bank built in, so its references
    cannot be left out (that would take one export per reference). `scorer` returns uncalibrated scores; masks
    are compared at the model's `image_size`."""
    from .calibration import fit_calibration
    from .modeling_outputs import concatenated_outputs

    def scored(chosen: list[Image.Image]) -> AnomalyDetectionOutput:
        return concatenated_outputs(
            [
                scorer(processor(chosen[start : start + batch_size], return_tensors="pt").pixel_values)
                for start in range(0, len(chosen), batch_size)
            ]
        )

    normal = scored(images.normal)
    anomalous = scored(images.anomalous) if images.anomalous else None
    masks = None if images.masks is None else mask_tensor(images.masks, image_size)
    calibration = fit_calibration(
        normal.image_scores,
        normal.anomaly_maps,
        None if anomalous is None else anomalous.image_scores,
        None if anomalous is None else anomalous.anomaly_maps,
        masks,
        normal_source="held_out",
        false_alarm_rate=false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
        confidence=confidence,
    )
    calibration = dataclasses.replace(calibration, runtime=runtime, precision=precision)
    shortfall = calibration.shortfall()
    return dataclasses.replace(bank, calibration=calibration), [] if shortfall is None else [shortfall]
