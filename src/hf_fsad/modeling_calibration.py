"""How a model calibrates its bank: `CalibrationMixin.calibrate` scores normal images (held out, or each reference
left out of a bank of the others) and optionally anomalous ones against the bank, and fits
`hf_fsad.calibration`'s thresholds to those scores.

A mixin of `FsadPreTrainedModel`, as transformers keeps `generate` in `GenerationMixin`: it scores through the
method contract (`encode_images`, `score_features`, `build_reference_bank`, `checked_bank`, `features_of`)
and reads the class flags `saves_its_references`, `needs_anomalous_references` and `validated_tensors` and
whether the model is `fitted_on_normals`.
"""

from __future__ import annotations

import dataclasses
import warnings
from typing import TYPE_CHECKING

import torch

from .calibration import fit_calibration_of_outputs
from .modeling_outputs import AnomalyDetectionOutput, concatenated_outputs

if TYPE_CHECKING:
    from .bank import ReferenceBank


class CalibrationMixin:
    """`calibrate` and `leave_one_out_refusal` of every method."""

    @torch.no_grad()
    def calibrate(
        self,
        reference_bank: ReferenceBank,
        reference_pixel_values: torch.Tensor | None = None,
        *,
        reference_features: dict[str, torch.Tensor] | None = None,
        normal_pixel_values: torch.Tensor | None = None,
        anomalous_pixel_values: torch.Tensor | None = None,
        anomalous_masks: torch.Tensor | None = None,
        false_alarm_rate: float = 0.05,
        confidence: float | None = None,
        rule: str = "false_alarm_rate",
        bank_inputs: dict | None = None,
        batch_size: int = 8,
    ) -> ReferenceBank:
        """The bank with a `Calibration`: thresholds and score normalisation (`hf_fsad.calibration`).

        Normal scores come from held-out `normal_pixel_values` scored against the bank when given, else
        leave-one-out on the bank's own references (`reference_pixel_values` or their `encode_images`
        features): each is scored against a bank built from the others (at least 2; refused when
        `leave_one_out_refusal` gives a reason). `bank_inputs` are the other arguments the bank was built
        with (anomalous memory: its anomalous references, or {} when it had none). `anomalous_pixel_values` are scored by the
        same protocol as the normals: against the bank with held-out normals, else against each of the k
        leave-one-out banks and averaged, so both sides see the same number of references.

        rule="false_alarm_rate" (default): the image and pixel thresholds are the conformal ones of the normal
        scores and maps' maxima for `false_alarm_rate` (kept on average, or with probability `confidence` over
        the draw of the normals when given); anomalous images only add their miss rate at it
        (`calibration_miss_rate`). rule="best_f1" (needs anomalous images): the best-F1 image threshold, and
        the best pixel F1 with `anomalous_masks` ((A, H, W) at the input size, non-zero = defect); it
        promises no false-alarm rate and moves with the share of defects given. Leave-one-out banks hold k - 1
        references, so for nearest-neighbour methods their normal scores run higher than with k: the
        threshold errs towards fewer false alarms, except where docs/calibration.md says otherwise (MetaCAN,
        signed anomalous-memory weights, coreset-thinned memories). When the normals are too few for the
        promise asked, the threshold is their maximum and a UserWarning says how many would do.
        """
        bank = self.checked_bank(reference_bank)
        if anomalous_masks is not None and anomalous_pixel_values is None:
            raise ValueError("anomalous_masks were given without anomalous_pixel_values.")
        anomalous = None
        if normal_pixel_values is not None:
            normal, source = (
                self._score_in_batches(normal_pixel_values, bank, batch_size, "normal_pixel_values"),
                "held_out",
            )
            if anomalous_pixel_values is not None:
                anomalous = self._score_in_batches(
                    anomalous_pixel_values, bank, batch_size, "anomalous_pixel_values"
                )
        else:
            features = self.features_of(reference_pixel_values, reference_features, "reference_pixel_values")
            if features is None:
                raise ValueError(
                    "Calibration needs normal images: the bank's references (reference_pixel_values, scored "
                    "leave-one-out) or held-out normal_pixel_values."
                )
            anomalous_features = None
            if anomalous_pixel_values is not None:
                anomalous_features = self._encode_in_batches(
                    anomalous_pixel_values, batch_size, "anomalous_pixel_values"
                )
            (normal, anomalous), source = (
                self._leave_one_out(bank, features, bank_inputs, anomalous_features, batch_size),
                "leave_one_out",
            )
        calibration = fit_calibration_of_outputs(
            normal,
            anomalous,
            anomalous_masks,
            normal_source=source,
            false_alarm_rate=false_alarm_rate,
            confidence=confidence,
            rule=rule,
        )
        shortfall = calibration.shortfall()
        if shortfall is not None:
            warnings.warn(shortfall, stacklevel=3)  # the caller of calibrate, past torch.no_grad's wrapper
        return dataclasses.replace(reference_bank, calibration=calibration)

    def _score_in_batches(
        self, pixel_values: torch.Tensor, bank: ReferenceBank, batch_size: int, name: str
    ) -> AnomalyDetectionOutput:
        features = self._encode_in_batches(pixel_values, batch_size, name)
        return self._score_features_in_batches(features, bank, batch_size)

    def _encode_in_batches(
        self, pixel_values: torch.Tensor, batch_size: int, name: str
    ) -> dict[str, torch.Tensor]:
        batches = [
            self.encode_images(pixel_values[start : start + batch_size], name)
            for start in range(0, max(len(pixel_values), 1), batch_size)
        ]
        return {key: torch.cat([batch[key] for batch in batches]) for key in batches[0]}

    def _score_features_in_batches(
        self, features: dict[str, torch.Tensor], bank: ReferenceBank, batch_size: int
    ) -> AnomalyDetectionOutput:
        count = next(iter(features.values())).shape[0]
        outputs = [
            self.score_features(
                {key: value[start : start + batch_size] for key, value in features.items()}, bank
            )
            for start in range(0, count, batch_size)
        ]
        return concatenated_outputs(outputs)

    def leave_one_out_refusal(self, num_references: int, generated_references: int = 0) -> str | None:
        """Why `calibrate` cannot score `num_references` references leave-one-out, `generated_references` of
        them generated from the others (`ReferenceBank.generated_references`); None when it can."""
        name = type(self).__name__
        if self.saves_its_references:
            return (
                f"{name} keeps what it learnt from its normal images in its weights, so none can "
                "be left out (it would be refitted once per reference)"
            )
        if self.fitted_on_normals:
            return (
                f"this {name} was fitted (`fit`) on normal images, so a left-out reference may still be known "
                "to it and score too low (it would be refitted once per reference)"
            )
        if generated_references:
            return (
                f"{generated_references} of the references were generated from the others, so a left-out "
                "image's generated copies stay in the bank"
            )
        if num_references < 2:
            return f"leave-one-out needs at least 2 reference images, got {num_references}"
        return None

    def _leave_one_out(
        self,
        bank: ReferenceBank,
        features: dict[str, torch.Tensor],
        bank_inputs: dict | None,
        anomalous_features: dict[str, torch.Tensor] | None = None,
        batch_size: int = 8,
    ) -> tuple[AnomalyDetectionOutput, AnomalyDetectionOutput | None]:
        """(normal, anomalous) outputs: each reference scored against a bank built from the others, with
        `bank`'s `validated_tensors`; each anomalous image scored against all k such banks, its scores and maps
        averaged (None without `anomalous_features`)."""
        k = next(iter(features.values())).shape[0]
        refusal = self.leave_one_out_refusal(k, bank.generated_references)
        if refusal is not None:
            raise ValueError(
                f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal_pixel_values."
            )
        if self.needs_anomalous_references and bank_inputs is None:
            raise ValueError(
                f"{type(self).__name__} builds its bank with anomalous references too: pass the arguments the "
                "bank was built with (anomalous_pixel_values or anomalous_features, anomalous_masks) in "
                "bank_inputs ({} if it had none), or give held-out normal_pixel_values."
            )
        outputs, anomalous_outputs, bank_inputs = [], [], bank_inputs or {}
        for index in range(k):
            others = {
                name: torch.cat([tensor[:index], tensor[index + 1 :]]) for name, tensor in features.items()
            }
            rebuilt = self.build_reference_bank(
                class_name=bank.class_name, reference_features=others, **bank_inputs
            )
            validated = {name: bank.tensors[name] for name in self.validated_tensors if name in bank.tensors}
            left_out_bank = dataclasses.replace(bank, k=k - 1, tensors=rebuilt.tensors | validated)
            left_out = {name: tensor[index : index + 1] for name, tensor in features.items()}
            outputs.append(self.score_features(left_out, left_out_bank))
            if anomalous_features is not None:
                anomalous_outputs.append(
                    self._score_features_in_batches(anomalous_features, left_out_bank, batch_size)
                )
        return concatenated_outputs(outputs), _averaged_outputs(anomalous_outputs)


def _averaged_outputs(outputs: list[AnomalyDetectionOutput]) -> AnomalyDetectionOutput | None:
    """The mean image scores and maps of outputs of the same images (None for no outputs)."""
    if not outputs:
        return None
    maps = [output.anomaly_maps for output in outputs]
    return AnomalyDetectionOutput(
        image_scores=torch.stack([output.image_scores for output in outputs]).mean(0),
        anomaly_maps=None if maps[0] is None else torch.stack(maps).mean(0),
    )
