"""How `hf-fsad score` calibrates the bank it scores with: on held-out normal images, on anomalous images (and
their masks), or by leave-one-out on the references a bank was built from; a saved bank is used as saved
unless a calibration is asked for; `calibrate_on_scorer` calibrates on the scores of an exported runtime (the
images given are first separated by `hf_fsad.calibration_inputs`).

Module-level imports stay light (the command line's parser reads `DEFAULT_FALSE_ALARM_RATE`); torch loads
when a bank is calibrated.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .bank import ReferenceBank
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
    rule: str = "false_alarm_rate",
    no_calibration: bool,
    precision: str,
    batch_size: int,
) -> tuple[ReferenceBank, str | None, list[str]]:
    """(bank, why it is not calibrated or None, the warnings calibrating raised): `bank` calibrated as asked.

    A built bank is calibrated by leave-one-out by default (each of its `references` scored against a bank of
    the others and the `bank_inputs` it was built with); a `saved` bank is used as saved unless calibration
    images, a `false_alarm_rate` or a `confidence` are given (None: `DEFAULT_FALSE_ALARM_RATE`, not asked for).
    `no_calibration` leaves any calibration out. Calibration scores are computed as the queries' are: at
    `precision`, `batch_size` images at a time. `rule`: "false_alarm_rate" or "best_f1" (`model.calibrate`). A ValueError says why an asked-for calibration is impossible.
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
            rule=rule,
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
    rule: str = "false_alarm_rate",
    batch_size: int,
) -> tuple[ReferenceBank, list[str]]:
    """(`bank` calibrated on the held-out normals (and anomalous images) of `images` scored by `scorer`, the
    notes): for an exported graph on `runtime` at `precision`, which has the bank built in, so its references
    cannot be left out (that would take one export per reference). `scorer` returns uncalibrated scores; masks
    are compared at the model's `image_size`."""
    from .calibration import fit_calibration_of_outputs
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
    calibration = fit_calibration_of_outputs(
        normal,
        anomalous,
        masks,
        normal_source="held_out",
        false_alarm_rate=false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
        confidence=confidence,
        rule=rule,
    )
    calibration = dataclasses.replace(calibration, runtime=runtime, precision=precision)
    shortfall = calibration.shortfall()
    return dataclasses.replace(bank, calibration=calibration), [] if shortfall is None else [shortfall]
