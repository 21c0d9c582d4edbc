"""The `image-anomaly-detection` pipeline: images in, scores, maps and heatmap overlays out, and with a
calibrated bank pass/fail decisions."""

from __future__ import annotations

import base64
import binascii
import logging
import os
import urllib.request
import warnings
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .bank import ReferenceBank
from .calibration import Calibration, check_review_band, in_review_band, score_error
from .calibration_policy import calibrated_bank, tiling_conflict
from .deploy.image_files import LABEL_NAMES
from .deploy.regions import defect_regions
from .io import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_image_bytes, read_mask, to_upright_rgb
from .modeling_base import FsadPreTrainedModel
from .modeling_outputs import AnomalyDetectionOutput
from .tiled_scoring import score_tiled
from .tiling import Tiling
from .visualization import heatmap_overlay

TASK = "image-anomaly-detection"
# A part in the review band (`hf_fsad.calibration.in_review_band`) reads this instead of its label.
REVIEW_LABEL = "review"
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


def resized_map(anomaly_map: torch.Tensor, size: tuple[int, int]) -> np.ndarray:
    """An (H, W) anomaly map resized bilinearly to `size` (width, height), as float32."""
    width, height = size
    resized = torch.nn.functional.interpolate(
        anomaly_map[None, None].float(), size=(height, width), mode="bilinear", align_corners=False
    )[0, 0]
    return resized.cpu().numpy().astype(np.float32)


def pixel_decision(
    anomaly_map: np.ndarray | None, calibration: Calibration
) -> tuple[np.ndarray | None, list[dict] | None]:
    """(mask, regions) of a calibrated image's (H, W) `anomaly_map` at the image's own size: the pixels above
    the pixel threshold, and their connected defect regions with box, area and peak score
    (`hf_fsad.deploy.regions.defect_regions`); (None, None) without a map or a pixel threshold."""
    mask = None if anomaly_map is None else calibration.masks(torch.from_numpy(anomaly_map))
    if mask is None:
        return None, None
    mask = mask.numpy()
    return mask, defect_regions(mask, anomaly_map)


def as_tiling(tiling: Tiling | Mapping[str, Any] | None) -> Tiling | None:
    """A `tiling=` argument (a `Tiling`, its fields as a dict, or None) as a `Tiling`."""
    if tiling is None or isinstance(tiling, Tiling):
        return tiling
    if isinstance(tiling, Mapping):
        return Tiling(**tiling)
    raise TypeError(f"tiling must be a Tiling or a dict of its fields, got {type(tiling).__name__}.")


def as_mask(source: Any) -> Image.Image:
    """A mask given as a file path as `hf_fsad.io.read_mask` reads it (transparency ignored, not made white),
    else as given (`hf_fsad.visualization.mask_array` reads its non-zero pixels)."""
    if isinstance(source, (str, os.PathLike)):
        try:
            return read_mask(source)
        except ImageReadError as error:
            raise ImageReadError(f"{source}: {error}") from None
    return source if isinstance(source, Image.Image) else load_image(source)


def _sources(images: Sequence[Any] | Any | None, name: str) -> list[Any]:
    """The images of an argument (one or a sequence) as a list ([] for None); a ValueError when empty."""
    if images is None:
        return []
    if isinstance(images, (str, bytes, os.PathLike)) or not isinstance(images, Sequence):
        images = [images]
    if len(images) == 0:
        raise ValueError(f"{name} is empty: give at least one image, or leave it out.")
    return list(images)


def decision(
    output: AnomalyDetectionOutput, index: int, calibration: Calibration, review_band: float | None = None
) -> dict[str, Any]:
    """The calibrated decision on image `index` of a calibrated `output`: `label` ("anomalous" when the
    score is above `threshold`, else "normal"; "review" when `review_band` is given and the normalised score
    is within it of 0.5: `hf_fsad.calibration.in_review_band`), `normalized_score` (0.5 at the threshold) and
    `threshold` (the raw image threshold); and `error`, why the part fails, when its score is not finite."""
    normalized = output["normalized_scores"][index : index + 1]
    review = review_band is not None and bool(in_review_band(normalized, review_band))
    verdict = {
        "label": REVIEW_LABEL if review else LABEL_NAMES[int(output["labels"][index])],
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
    References are encoded once per call (or pass `reference_bank=` to reuse a saved bank); `defect_images=`
    (and `defect_masks=`) build the bank of a method that learns from them, as `build_reference_bank` says. Each result has
    `score` (float), `anomaly_map` (float32 array at the image's own size, or None for image-level methods)
    and `heatmap` (PIL overlay, or None). `heatmap_range=(low, high)` fixes the colour scale.

    With 2 or more references the bank is calibrated leave-one-out (`calibrate="auto"`, see
    `build_reference_bank`), and with a calibrated bank each result also has `label` ("anomalous" or
    "normal"), `normalized_score` (0.5 at the threshold), `threshold` (the raw image threshold) and `mask`
    (bool array at the image's own size, the map above the pixel threshold; None without maps or pixel
    threshold) and `regions` (the mask's connected defect regions, each with `box` [left, top, right,
    bottom], `area` and `peak_score`, the highest first: `hf_fsad.deploy.regions.defect_regions`; None where `mask`
    is). Without a calibration the result has only the first four keys. Giving `false_alarm_rate`
    asks for a calibration (`calibrate=True`: an error when it is impossible). `review_band=0.1`: a part
    whose normalised score lies in [0.4, 0.6] gets the label "review" instead of "normal" or "anomalous".

    `tiling=Tiling(tile_size=512, tile_stride=384, mode="pooled")` (or a dict of its fields) builds a tiled
    bank: large images are scored tile by tile at the model's input size, their maps stitched at full
    resolution (`hf_fsad.tiled_scoring`; docs/scoring.md). A tiled `reference_bank` scores tiled by itself.
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
        return [as_rgb_image(image) for image in _sources(images, name)]

    def _named_images(
        self, images: Sequence[Any] | Any | None, name: str, read=as_rgb_image
    ) -> list[Image.Image] | Mapping[str, Image.Image]:
        """The images read by `read` (`as_rgb_image`, or `as_mask`), keyed by file name when every one is given as
        a path or URL (masks are then paired with images by file stem: `calibration_policy.paired_masks`)."""
        sources = _sources(images, name)
        images_read = [read(source) for source in sources]
        if all(isinstance(source, (str, os.PathLike)) for source in sources):
            return dict(zip(map(str, sources), images_read))
        return images_read

    def build_reference_bank(
        self,
        reference_images: Sequence[Any] | None = None,
        class_name: str | None = None,
        calibrate: bool | Literal["auto"] = "auto",
        false_alarm_rate: float | None = None,
        calibration_images: Sequence[Any] | None = None,
        confidence: float | None = None,
        defect_images: Sequence[Any] | None = None,
        defect_masks: Sequence[Any] | None = None,
        weight_search: bool = True,
        tiling: Tiling | Mapping[str, Any] | None = None,
    ) -> ReferenceBank:
        """Encode reference images (paths, URLs or PIL images) into the model's bank, calibrated, by the policy
        the CLI, the Space and the benchmark runner use (`hf_fsad.calibration_policy.calibrated_bank`).

        calibrate="auto": calibrated for `false_alarm_rate` (None: 0.05; the conformal threshold, see
        `hf_fsad.calibration`) on `calibration_images` (held-out normal images) when given, else on the
        references left out one at a time when there are 2 or more and `model.leave_one_out_refusal` allows
        it (not VTFusion, a fitted One-to-Normal, or generated references); otherwise not calibrated (logged
        at INFO). True (and giving `calibration_images`): calibrated, or a ValueError saying why it cannot be.
        False: never. `confidence`: the false-alarm rate holds with that probability over the draw of the
        calibration images, not only on average. Exact copies among the references, and calibration images
        that are also references, are left out with a warning.

        `defect_images` (and `defect_masks`, one per defect: paired by file stem when all are paths, else in
        order) go into the bank of a method that learns from them (anomalous memory), whose score weights are
        then chosen on augmented views of them and of the calibration images, or the references without
        them (paper Sec. 4.3; `weight_search=False` keeps the baseline weights); a warning says which.

        `tiling` (a `Tiling` or a dict of its fields): a tiled bank, calibrated on tiled scores, as
        `calibrated_bank` describes; the model's own image processor then resizes each tile whole.
        """
        return self._made_bank(
            calibrate,
            references=self._images(reference_images, "reference_images"),
            class_name=class_name,
            defects=self._named_images(defect_images, "defect_images"),
            defect_masks=self._named_images(defect_masks, "defect_masks", as_mask) if defect_masks else None,
            weight_search=weight_search,
            calibration_images=calibration_images,
            false_alarm_rate=false_alarm_rate,
            confidence=confidence,
            tiling=as_tiling(tiling),
        )

    def calibrate_bank(
        self,
        bank: ReferenceBank,
        calibrate: bool | Literal["auto"] = "auto",
        *,
        false_alarm_rate: float | None = None,
        calibration_images: Sequence[Any] | None = None,
        confidence: float | None = None,
    ) -> ReferenceBank:
        """A saved `bank` calibrated on `calibration_images` (held-out normal images) as `build_reference_bank`
        describes; with calibrate="auto" and none, the bank as saved."""
        return self._made_bank(
            calibrate,
            bank=bank,
            calibration_images=calibration_images,
            false_alarm_rate=false_alarm_rate,
            confidence=confidence,
        )

    def _made_bank(self, calibrate, *, calibration_images, **policy) -> ReferenceBank:
        """`calibrated_bank` with these arguments: its notes logged as warnings, its calibration's warnings
        warned, its refusal logged at INFO."""
        held_out = self._images(calibration_images, "calibration_images")
        bank = policy.get("bank")
        tiled = policy.get("tiling") is not None or (bank is not None and bank.tiling is not None)
        made = calibrated_bank(
            self.model,
            held_out_normals=held_out,
            processor=None if tiled else self.image_processor,  # tiles: the model's own, resizing them whole
            calibrate=True if held_out and calibrate == "auto" else calibrate,
            **policy,
        )
        for note in made.notes:
            logger.warning("%s.", note)
        for message in made.warnings:
            warnings.warn(message, UserWarning, stacklevel=3)
        if made.refusal is not None:
            logger.info("Reference bank not calibrated: %s.", made.refusal)
        return made.bank

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
        defect_images=None,
        defect_masks=None,
        weight_search=None,
        review_band=None,
        tiling=None,
    ):
        if reference_bank is not None and (reference_images is not None or defect_images is not None):
            raise ValueError(
                "Give either reference_images or reference_bank, not both (defect_images go into a built bank)."
            )
        if (false_alarm_rate is not None or confidence is not None) and calibrate is None:
            calibrate = True
        calibration = _given(
            calibrate=calibrate,
            false_alarm_rate=false_alarm_rate,
            calibration_images=calibration_images,
            confidence=confidence,
        )
        defects = _given(defect_images=defect_images, defect_masks=defect_masks, weight_search=weight_search)
        tiling = as_tiling(tiling)
        if reference_bank is not None:
            conflict = tiling_conflict(reference_bank, tiling)
            if conflict is not None:
                raise ValueError(f"reference_bank: {conflict}.")
        forward_params = {}
        building = reference_images is not None or class_name is not None or calibration or defects or tiling
        if reference_bank is None and building:
            reference_bank = self.build_reference_bank(
                reference_images, class_name, **calibration, **defects, tiling=tiling
            )
        elif reference_bank is not None and calibration:
            reference_bank = self.calibrate_bank(reference_bank, **calibration)
        preprocess_params = {}
        if reference_bank is not None:
            forward_params["reference_bank"] = reference_bank
            preprocess_params["tiled"] = reference_bank.tiling is not None
        postprocess_params = {"heatmap_range": heatmap_range} if heatmap_range is not None else {}
        if review_band is not None:
            check_review_band(review_band)
            postprocess_params["review_band"] = review_band
        return preprocess_params, forward_params, postprocess_params

    def preprocess(self, image, tiled: bool = False) -> dict[str, Any]:
        """The RGB image, and its pixel values unless a tiled bank cuts it into tiles in `_forward`."""
        image = as_rgb_image(image)
        if tiled:
            return {"image": image}
        return {"pixel_values": self.image_processor(image, return_tensors="pt").pixel_values, "image": image}

    def _forward(
        self, model_inputs: dict[str, Any], reference_bank: ReferenceBank | None = None
    ) -> dict[str, Any]:
        if reference_bank is not None and reference_bank.tiling is not None:
            output = score_tiled(self.model, model_inputs["image"], reference_bank)
        else:
            output = self.model(model_inputs["pixel_values"], reference_bank=reference_bank)
        calibration = None if reference_bank is None else reference_bank.calibration
        return {"output": output, "image": model_inputs["image"], "calibration": calibration}

    def postprocess(
        self, model_outputs: dict[str, Any], heatmap_range=None, review_band=None
    ) -> dict[str, Any]:
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
        if review_band is not None and calibration is None:
            raise ValueError(
                "review_band needs a calibrated reference bank: the band lies around its threshold."
            )
        if calibration is not None:
            result |= decision(output, 0, calibration, review_band)
            result["mask"], result["regions"] = pixel_decision(result["anomaly_map"], calibration)
        return result


def _given(**arguments: Any) -> dict[str, Any]:
    """The keyword arguments that are not None."""
    return {name: value for name, value in arguments.items() if value is not None}


def register_pipeline() -> None:
    """Register the task with transformers' pipeline registry (done on `import hf_fsad`)."""
    from transformers import AutoModel

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ImageAnomalyDetectionPipeline, pt_model=AutoModel, type="image"
        )
