"""The `image-anomaly-detection` pipeline: images in, scores, maps and heatmap overlays out, and with a
calibrated bank pass/fail decisions."""

from __future__ import annotations

import base64
import binascii
import dataclasses
import logging
import os
import urllib.request
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.pipelines import PIPELINE_REGISTRY

from .bank import ReferenceBank
from .calibration import Calibration, score_error
from .calibration_inputs import separate_calibration_images
from .io import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_image_bytes, to_upright_rgb
from .modeling_base import FsadPreTrainedModel
from .modeling_outputs import AnomalyDetectionOutput
from .visualization import heatmap_overlay

TASK = "image-anomaly-detection"
# The name of each calibrated label (`Calibration.labels`: 1 = anomalous).
LABEL_NAMES = ("normal", "anomalous")
logger = logging.getLogger(__name__)
URL_SCHEMES = ("http://", "https://")
# Seconds to wait on a server that stops answering (transformers' `load_image` waits forever by default).
URL_TIMEOUT_S = 60.0


def as_rgb_image(source: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A pipeline input (file path, http(s) or `data:` URL, PIL image) upright and as RGB, as the CLI reads
    files (`to_upright_rgb`); a file or URL that cannot be used raises `ImageReadError` naming it, as the
    CLI's messages do."""
    if isinstance(source, Image.Image):
        return to_upright_rgb(source)
    if not isinstance(source, (str, os.PathLike)):
        raise TypeError(f"an image input must be a path, a URL or a PIL image, not {type(source).__name__}")
    if str(source).startswith((*URL_SCHEMES, "data:")):
        return read_image_url(str(source), max_pixels)
    try:
        return read_image(source, max_pixels)
    except ImageReadError as error:
        raise ImageReadError(f"{source}: {error}") from None


def read_image_url(url: str, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at an http(s) URL (fetched with the standard library, which honours `https_proxy` and
    `no_proxy`) or in a base64 `data:` URL, read as `read_image` reads files (upright, transparency composited
    on white, same checks). transformers' `load_image` is not used: it drops alpha."""
    name = "data: URL" if url.startswith("data:") else url
    try:
        if url.startswith("data:"):
            data = base64.b64decode(url.partition(",")[2], validate=True)
        else:
            with urllib.request.urlopen(url, timeout=URL_TIMEOUT_S) as response:
                data = response.read()
        return read_image_bytes(data, max_pixels)
    except ImageReadError as error:
        raise ImageReadError(f"{name}: {error}") from None
    except binascii.Error as error:
        raise ImageReadError(f"{name}: not valid base64 ({error})") from None
    except OSError as error:  # urllib's URLError and HTTPError, timeouts
        raise ImageReadError(f"{name}: cannot download ({error})") from None


def calibrate_reference_bank(
    model: FsadPreTrainedModel,
    bank: ReferenceBank,
    calibrate: bool | Literal["auto"] = "auto",
    *,
    reference_pixel_values: torch.Tensor | None = None,
    normal_pixel_values: torch.Tensor | None = None,
    anomalous_pixel_values: torch.Tensor | None = None,
    anomalous_masks: torch.Tensor | None = None,
    false_alarm_rate: float = 0.05,
    confidence: float | None = None,
    rule: str = "false_alarm_rate",
    batch_size: int = 8,
    bank_inputs: dict | None = None,
) -> tuple[ReferenceBank, str | None]:
    """(`bank` calibrated by `model.calibrate`, None), or (`bank` as given, the reason) when
    calibrate="auto" and it cannot be calibrated.

    The normals are the held-out `normal_pixel_values` when given, else the references the bank was built
    from (`reference_pixel_values`), each scored against a bank of the others and of `bank_inputs`, the
    anomalous references the bank was built with (anomalous memory: `anomalous_pixel_values` and
    `anomalous_masks`; None: none). "auto" calibrates when there are normals to use; True, or calibration
    images, require a calibration (a ValueError says why it is impossible); False returns the bank without
    one. `confidence`: the false-alarm rate holds with that probability over the calibration draw, not only
    on average (`hf_fsad.calibration.conformal_rank`). `rule`: "false_alarm_rate" (the conformal threshold,
    with the miss rate on the anomalous images) or "best_f1" (needs anomalous images; no guarantee), as
    `model.calibrate` describes.
    """
    calibration_images = (normal_pixel_values, anomalous_pixel_values, anomalous_masks)
    asked = calibrate is True or any(images is not None for images in calibration_images)
    if calibrate is False:
        if asked:
            raise ValueError("Calibration images were given with calibrate=False.")
        return dataclasses.replace(bank, calibration=None), None
    if calibrate != "auto" and calibrate is not True:
        raise ValueError(f'calibrate must be True, False or "auto", got {calibrate!r}.')
    if normal_pixel_values is None:
        num_references = 0 if reference_pixel_values is None else len(reference_pixel_values)
        refusal = model.leave_one_out_refusal(num_references, bank.generated_references)
        if refusal is not None:
            if asked:
                raise ValueError(
                    f"Cannot calibrate by leave-one-out: {refusal}; give held-out normal images."
                )
            return bank, refusal
    calibrated = model.calibrate(
        bank,
        reference_pixel_values if normal_pixel_values is None else None,
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


def resized_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) anomaly map resized bilinearly to `size` (width, height), as float32."""
    width, height = size
    resized = torch.nn.functional.interpolate(
        anomaly_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    return resized.cpu().numpy().astype(np.float32)


def decision(output: AnomalyDetectionOutput, index: int, calibration: Calibration) -> dict[str, Any]:
    """The calibrated decision on image `index` of a calibrated `output`: `label` ("anomalous" when the
    score is above `threshold`, else "normal"), `normalized_score` (0.5 at the threshold) and `threshold`
    (the raw image threshold); and `error`, why the part fails, when its score is not finite."""
    verdict = {
        "label": LABEL_NAMES[int(output["labels"][index])],
        "normalized_score": float(output["normalized_scores"][index]),
        "threshold": calibration.image_threshold,
    }
    error = score_error(float(output["image_scores"][index]))
    return verdict if error is None else verdict | {"error": error}


class ImageAnomalyDetectionPipeline(Pipeline):
    """Score images for anomalies with any hf_fsad method.

    ```python
    pipe = pipeline("image-anomaly-detection", model="path/or/hub-id")
    results = pipe(["query.png"], reference_images=["good1.png", "good2.png"], class_name="screw")
    results[0]["score"], results[0]["anomaly_map"], results[0]["heatmap"]
    results[0]["label"], results[0]["normalized_score"], results[0]["mask"]   # with 2 or more references
    ```
    References are encoded once per call (or pass `reference_bank=` to reuse a saved bank). Each result has
    `score` (float), `anomaly_map` (float32 array at the image's own size, or None for image-level methods)
    and `heatmap` (PIL overlay, or None). `heatmap_range=(low, high)` fixes the colour scale.

    With 2 or more references the bank is calibrated leave-one-out (`calibrate="auto"`, see
    `build_reference_bank`), and with a calibrated bank each result also has `label` ("anomalous" or
    "normal"), `normalized_score` (0.5 at the threshold), `threshold` (the raw image threshold) and `mask`
    (bool array at the image's own size, the map above the pixel threshold; None without maps or pixel
    threshold). Without a calibration the result has only the first four keys. Giving `false_alarm_rate`
    asks for a calibration (`calibrate=True`: an error when it is impossible).
    """

    _load_processor = False
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if not isinstance(self.model, FsadPreTrainedModel):
            raise TypeError(f"{TASK} needs an hf_fsad model, got {type(self.model).__name__}.")
        if self.image_processor is None:
            self.image_processor = self.model.image_processor()

    def _images(self, images: Sequence[Any] | Any | None, name: str) -> list[Image.Image]:
        """Images (paths, URLs or PIL images; one or a sequence) as RGB images ([] for None)."""
        if images is None:
            return []
        if isinstance(images, (str, bytes)) or not isinstance(images, Sequence):
            images = [images]
        if len(images) == 0:
            raise ValueError(f"{name} is empty: give at least one image, or leave it out.")
        return [as_rgb_image(image) for image in images]

    def _pixel_values(self, images: list[Image.Image]) -> torch.Tensor | None:
        """RGB images as one batch of pixel values, or None for none."""
        return self.image_processor(images, return_tensors="pt").pixel_values if images else None

    def build_reference_bank(
        self,
        reference_images: Sequence[Any] | None = None,
        class_name: str | None = None,
        calibrate: bool | Literal["auto"] = "auto",
        false_alarm_rate: float = 0.05,
        calibration_images: Sequence[Any] | None = None,
        confidence: float | None = None,
    ) -> ReferenceBank:
        """Encode reference images (paths, URLs or PIL images) into the model's bank, calibrated.

        calibrate="auto": calibrated for `false_alarm_rate` (the conformal threshold, see
        `hf_fsad.calibration`) on `calibration_images` (held-out normal images) when given, else on the
        references left out one at a time when there are 2 or more and `model.leave_one_out_refusal` allows
        it (not VTFusion, a fitted One-to-Normal, or generated references); otherwise not calibrated (logged
        at INFO). True: calibrated, or a ValueError saying why it cannot be. False: never. `confidence`: the
        false-alarm rate holds with that probability over the draw of the calibration images, not only on
        average. Exact copies among the references, and calibration images that are also references, are
        left out with a warning (`hf_fsad.calibration_policy.separate_calibration_images`).
        """
        images = separate_calibration_images(
            self._images(reference_images, "reference_images"),
            self._images(calibration_images, "calibration_images"),
        )
        for note in images.notes:
            logger.warning("%s.", note)
        pixel_values = self._pixel_values(images.references)
        bank = self.model.build_reference_bank(pixel_values, class_name=class_name)
        bank = dataclasses.replace(bank, generated_references=images.generated_references)
        return self.calibrate_bank(
            bank,
            pixel_values,
            calibrate,
            false_alarm_rate=false_alarm_rate,
            calibration_images=images.held_out_normals or None,
            confidence=confidence,
        )

    def calibrate_bank(
        self,
        bank: ReferenceBank,
        reference_pixel_values: torch.Tensor | None = None,
        calibrate: bool | Literal["auto"] = "auto",
        *,
        false_alarm_rate: float = 0.05,
        calibration_images: Sequence[Any] | None = None,
        confidence: float | None = None,
    ) -> ReferenceBank:
        """`bank` calibrated as `build_reference_bank` describes; `reference_pixel_values` are the references
        it was built from (None for a saved bank: then only `calibration_images` can calibrate it)."""
        bank, refusal = calibrate_reference_bank(
            self.model,
            bank,
            calibrate,
            reference_pixel_values=reference_pixel_values,
            normal_pixel_values=self._pixel_values(self._images(calibration_images, "calibration_images")),
            false_alarm_rate=false_alarm_rate,
            confidence=confidence,
        )
        if refusal is not None:
            logger.info("Reference bank not calibrated: %s.", refusal)
        return bank

    def _sanitize_parameters(
        self,
        reference_images=None,
        reference_bank=None,
        class_name=None,
        heatmap_range=None,
        calibrate=None,
        false_alarm_rate=None,
        calibration_images=None,
        confidence=None,
    ):
        if reference_bank is not None and reference_images is not None:
            raise ValueError("Give either reference_images or reference_bank, not both.")
        if (false_alarm_rate is not None or confidence is not None) and calibrate is None:
            calibrate = True
        calibration = {
            name: value
            for name, value in {
                "calibrate": calibrate,
                "false_alarm_rate": false_alarm_rate,
                "calibration_images": calibration_images,
                "confidence": confidence,
            }.items()
            if value is not None
        }
        forward_params = {}
        if reference_bank is None and (reference_images is not None or class_name is not None or calibration):
            reference_bank = self.build_reference_bank(reference_images, class_name, **calibration)
        elif reference_bank is not None and calibration:
            reference_bank = self.calibrate_bank(reference_bank, **calibration)
        if reference_bank is not None:
            forward_params["reference_bank"] = reference_bank
        postprocess_params = {"heatmap_range": heatmap_range} if heatmap_range is not None else {}
        return {}, forward_params, postprocess_params

    def preprocess(self, image) -> dict[str, Any]:
        image = as_rgb_image(image)
        return {"pixel_values": self.image_processor(image, return_tensors="pt").pixel_values, "image": image}

    def _forward(
        self, model_inputs: dict[str, Any], reference_bank: ReferenceBank | None = None
    ) -> dict[str, Any]:
        output = self.model(model_inputs["pixel_values"], reference_bank=reference_bank)
        calibration = None if reference_bank is None else reference_bank.calibration
        return {"output": output, "image": model_inputs["image"], "calibration": calibration}

    def postprocess(self, model_outputs: dict[str, Any], heatmap_range=None) -> dict[str, Any]:
        # The pipeline hands the output back as a plain ModelOutput, which drops the fields that are None.
        output, image = model_outputs["output"], model_outputs["image"]
        branch_scores = output.get("branch_scores", {})
        result = {
            "score": float(output["image_scores"][0]),
            "branch_scores": {name: float(value[0]) for name, value in branch_scores.items()},
            "anomaly_map": None,
            "heatmap": None,
        }
        if "anomaly_maps" in output:
            result["anomaly_map"] = resized_map(output["anomaly_maps"][0], image.size)
            result["heatmap"] = heatmap_overlay(image, result["anomaly_map"], heatmap_range)
        calibration = model_outputs["calibration"]
        if calibration is not None:
            result |= decision(output, 0, calibration)
            anomaly_map = result["anomaly_map"]
            mask = None if anomaly_map is None else calibration.masks(torch.from_numpy(anomaly_map))
            result["mask"] = None if mask is None else mask.numpy()
        return result


def register_pipeline() -> None:
    """Register the task with transformers' pipeline registry (done on `import hf_fsad`)."""
    from transformers import AutoModel

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ImageAnomalyDetectionPipeline, pt_model=AutoModel, type="image"
        )
