"""Pixels a method takes: the image processor that makes them from a config, and the checks of a batch.

`FsadPreTrainedModel.image_processor()` and `check_pixels` are the model's doors to these; they sit here,
apart from the model, as transformers keeps a model's `image_processing_*` module.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import CLIPImageProcessorPil

if TYPE_CHECKING:
    from .configuration_base import FsadConfig


def build_image_processor(config: FsadConfig, crop: bool = False) -> CLIPImageProcessorPil:
    """The preprocessing a model of `config` expects: RGB, bicubic resize to a square of `config.image_size`,
    CLIP normalisation with `config.image_mean` / `config.image_std`.

    crop=False: the whole image is resized to the square, so maps cover all of it. crop=True: the short side is
    resized to `config.image_size` and the centre square kept, as the papers' evaluation code does. The
    processor's saved config records which.
    """
    size = config.image_size
    geometry = (
        {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}
        if crop
        else {"size": {"height": size, "width": size}}
    )
    return CLIPImageProcessorPil(
        **geometry,
        do_center_crop=crop,
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def validate_pixel_values(pixel_values: torch.Tensor, patch_size: int, name: str = "pixel_values") -> None:
    """Raise an error naming the problem when `pixel_values` cannot be a batch of RGB images."""
    if not isinstance(pixel_values, torch.Tensor):
        raise TypeError(
            f"{name} must be a torch.Tensor of shape (B, 3, H, W), got {type(pixel_values).__name__}."
        )
    if not pixel_values.is_floating_point():
        raise ValueError(
            f"{name} must be a floating-point tensor (normalised pixels from `model.image_processor()`), "
            f"got dtype {pixel_values.dtype}."
        )
    if pixel_values.ndim != 4:
        raise ValueError(f"{name} must have shape (B, 3, H, W), got {tuple(pixel_values.shape)}.")
    if pixel_values.shape[0] == 0:
        raise ValueError(f"{name} holds no images (batch size 0).")
    if pixel_values.shape[1] != 3:
        raise ValueError(f"{name} must have 3 (RGB) channels, got {pixel_values.shape[1]}.")
    height, width = pixel_values.shape[-2:]
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"{name} images are {height}x{width}, smaller than the {patch_size}-pixel patch size."
        )
    if torch.compiler.is_exporting():
        return  # the values are symbolic while a graph is exported; the exported graph does not check them
    if torch.isnan(pixel_values).any():
        raise ValueError(f"{name} contains NaN values ({int(torch.isnan(pixel_values).sum())} of them).")
    if torch.isinf(pixel_values).any():
        raise ValueError(f"{name} contains infinite values ({int(torch.isinf(pixel_values).sum())} of them).")
