"""The `image-anomaly-detection` pipeline: images in, scores, maps and heatmap overlays out."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image
from transformers import Pipeline
from transformers.image_utils import load_image
from transformers.pipelines import PIPELINE_REGISTRY

from .io import DEFAULT_MAX_PIXELS, ImageReadError, read_image, to_rgb
from .modeling_base import FsadPreTrainedModel, ReferenceBank
from .visualization import heatmap_overlay

TASK = "image-anomaly-detection"


def as_rgb_image(source: Any, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """A pipeline input (file path, URL, PIL image, array) as RGB; a file that cannot be used raises
    `ImageReadError` naming it, as the CLI's messages do."""
    if isinstance(source, (str, os.PathLike)) and not str(source).startswith(("http://", "https://", "data:")):
        try:
            return read_image(source, max_pixels)
        except ImageReadError as error:
            raise ImageReadError(f"{source}: {error}") from None
    image = source if isinstance(source, Image.Image) else load_image(source)
    return to_rgb(image)


class ImageAnomalyDetectionPipeline(Pipeline):
    """Score images for anomalies with any hf_fsad method.

    ```python
    pipe = pipeline("image-anomaly-detection", model="path/or/hub-id")
    results = pipe(["query.png"], reference_images=["good1.png", "good2.png"], class_name="screw")
    results[0]["score"], results[0]["anomaly_map"], results[0]["heatmap"]
    ```
    References are encoded once per call (or pass `reference_bank=` to reuse a saved bank). Each result has
    `score` (float), `anomaly_map` (float32 array at the image's own size, or None for image-level methods)
    and `heatmap` (PIL overlay, or None). `heatmap_range=(low, high)` fixes the colour scale.
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

    def build_reference_bank(
        self, reference_images: Sequence[Any] | None = None, class_name: str | None = None
    ) -> ReferenceBank:
        """Encode reference images (paths, URLs or PIL images) into the model's bank."""
        pixel_values = None
        if reference_images is not None:
            if isinstance(reference_images, (str, bytes)) or not isinstance(reference_images, Sequence):
                reference_images = [reference_images]
            if len(reference_images) == 0:
                raise ValueError(
                    "reference_images is empty: give at least one normal image, or leave it out."
                )
            images = [as_rgb_image(image) for image in reference_images]
            pixel_values = self.image_processor(images, return_tensors="pt").pixel_values
        return self.model.build_reference_bank(pixel_values, class_name=class_name)

    def _sanitize_parameters(
        self, reference_images=None, reference_bank=None, class_name=None, heatmap_range=None
    ):
        if reference_bank is not None and reference_images is not None:
            raise ValueError("Give either reference_images or reference_bank, not both.")
        forward_params = {}
        if reference_bank is None and (reference_images is not None or class_name is not None):
            reference_bank = self.build_reference_bank(reference_images, class_name)
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
        return {"output": output, "image": model_inputs["image"]}

    def postprocess(self, model_outputs: dict[str, Any], heatmap_range=None) -> dict[str, Any]:
        output, image = model_outputs["output"], model_outputs["image"]
        result = {
            "score": float(output.image_scores[0]),
            "branch_scores": {name: float(value[0]) for name, value in (output.branch_scores or {}).items()},
            "anomaly_map": None,
            "heatmap": None,
        }
        if output.anomaly_maps is not None:
            width, height = image.size
            anomaly_map = torch.nn.functional.interpolate(
                output.anomaly_maps[:1, None].float(),
                size=(height, width),
                mode="bilinear",
                align_corners=False,
            )[0, 0]
            result["anomaly_map"] = anomaly_map.cpu().numpy().astype(np.float32)
            result["heatmap"] = heatmap_overlay(image, result["anomaly_map"], heatmap_range)
        return result


def register_pipeline() -> None:
    """Register the task with transformers' pipeline registry (done on `import hf_fsad`)."""
    from transformers import AutoModel

    if TASK not in PIPELINE_REGISTRY.get_supported_tasks():
        PIPELINE_REGISTRY.register_pipeline(
            TASK, pipeline_class=ImageAnomalyDetectionPipeline, pt_model=AutoModel, type="image"
        )
