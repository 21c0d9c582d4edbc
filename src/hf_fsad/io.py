"""Reading images from files, whatever they hold, writing results atomically (as valid JSON: `json_safe`), and
the file handling of a scoring run (repeated inputs, masks matched to images by file stem, resuming, joining
the shares of several processes).

Every entry point (CLI, pipeline, Space, benchmark loaders) reads user files through `read_image`, so a
file that cannot be used fails the same way everywhere: an `ImageReadError` whose message says why, which
the caller reports before going on with the other files. Every image and mask is turned upright by its EXIF
orientation and converted to RGB by one rule (`to_upright_rgb`: transparency composited on white as
transformers' `CLIPImageProcessor` does), whatever path it comes in by.

The reading rule, the JSON lines and the input handling live in `hf_fsad.deploy.image_files`, which the
torch-free runner of an export ships with, so an exported model reads and reports files as the CLI does;
they are imported here under their usual names.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from PIL import Image

from .deploy.image_files import (
    DEFAULT_MAX_PIXELS,
    IMAGE_READING_RULE,
    IMAGE_SUFFIXES,
    ImageReadError,
    atomic_file,
    batched,
    distinct_paths,
    expand_inputs,
    has_transparency,
    json_line,
    json_safe,
    prepare_output_dir,
    prepare_output_file,
    previous_results,
    read_image,
    read_image_bytes,
    readable_images,
    to_rgb,
    to_upright_rgb,
    unique_name,
    upright,
    upright_size,
    with_open_image,
)

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "IMAGE_READING_RULE",
    "IMAGE_SUFFIXES",
    "ImageReadError",
    "atomic_directory",
    "atomic_file",
    "atomic_write_text",
    "batched",
    "check_image_file",
    "distinct_paths",
    "expand_inputs",
    "has_transparency",
    "join_results",
    "json_line",
    "json_safe",
    "masks_by_stem",
    "option_image_paths",
    "prepare_output_dir",
    "prepare_output_file",
    "previous_results",
    "read_anomalous_images",
    "read_image",
    "read_image_bytes",
    "read_mask",
    "read_option_images",
    "read_upright",
    "read_upright_size",
    "readable_images",
    "replace_directory",
    "result_shares",
    "save_image_atomically",
    "to_rgb",
    "to_upright_rgb",
    "unique_name",
    "upright",
    "upright_size",
]


def read_mask(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The mask at `path` as `read_image` reads images (upright, RGB, same errors), except that transparency
    is ignored rather than composited on white: a mask's colours mark the defect, and a transparent
    background made white would read as anomalous."""

    def decode(image: Image.Image) -> Image.Image:
        image = _loaded_upright(image)
        return image.convert("RGB") if has_transparency(image) else to_rgb(image)

    return with_open_image(path, max_pixels, decode)


def _loaded_upright(image: Image.Image) -> Image.Image:
    image.load()
    return upright(image)


def read_upright(path: str | os.PathLike, max_pixels: int | None = None) -> Image.Image:
    """The image at `path` decoded and upright (`upright`) in its own mode (alpha, palettes and 16-bit kept),
    as `datasets` decodes the files it stores: what the benchmark loaders keep, the conversion to RGB left to
    `to_upright_rgb` when a model reads it. Errors as `read_image`'s."""
    return with_open_image(path, max_pixels, _loaded_upright)


def read_upright_size(path: str | os.PathLike, max_pixels: int | None = None) -> tuple[int, int]:
    """(width, height) of `read_upright(path)`, from the header where the format allows (`upright_size`)."""
    return with_open_image(path, max_pixels, upright_size)


def check_image_file(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> None:
    """Raise `ImageReadError` when `path` is not a usable image, reading its structure without decoding the
    pixels (PIL's `verify`: headers and checksums), so a whole dataset folder can be checked cheaply."""
    with_open_image(path, max_pixels, lambda image: image.verify())


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` to `path` atomically (`atomic_file`)."""
    with atomic_file(path) as temporary:
        temporary.write_text(text)


def save_image_atomically(image: Image.Image, path: str | os.PathLike) -> None:
    """Save `image` as PNG at `path` atomically (`atomic_file`)."""
    with atomic_file(path) as temporary:
        image.save(temporary, format="PNG")


def replace_directory(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """Move the folder `source` to `target`, removing a previous `target` first."""
    target = Path(target)
    if target.exists():
        shutil.rmtree(target)
    os.replace(source, target)


@contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """An empty temporary folder beside `path` to fill (e.g. by `save_pretrained`); it replaces `path` when
    the block ends without an error and is removed when it raises, so `path` never holds half a save."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    try:
        yield temporary
        replace_directory(temporary, path)
    finally:
        shutil.rmtree(temporary, ignore_errors=True)


def option_image_paths(option: str, inputs: Sequence[str]) -> list[Path]:
    """The distinct image files an option names (directories expanded); a ValueError when there is none."""
    what = f"{option} image"
    paths = distinct_paths(expand_inputs(inputs, what), what=what)
    if not paths:
        raise ValueError(f"{option} holds no image files")
    return paths


def read_option_images(
    option: str,
    paths: Sequence[Path],
    max_pixels: int | None,
    read: Callable[[Path, int | None], Image.Image] = read_image,
) -> list[Image.Image]:
    """The images of an option (`read`: `read_image`, or `read_mask` for masks); a ValueError names the
    option and the file that cannot be used. Unlike inputs, none is skipped: what they set (a threshold, a
    bank) would silently rest on other images."""
    images = []
    for path in paths:
        try:
            images.append(read(path, max_pixels))
        except ImageReadError as error:
            raise ValueError(f"{option} {path}: {error}") from None
    return images


def masks_by_stem(
    images: Sequence[Path], masks: Sequence[Path], image_option: str, mask_option: str
) -> list[Path]:
    """The mask of each image: the one with the image's file stem, alone or followed by `_mask` (MVTec AD's
    `000_mask.png` for `000.png`). A ValueError names the options when a mask is missing, unused or
    ambiguous."""
    by_stem: dict[str, Path] = {}
    for mask in masks:
        stem = mask.stem.removesuffix("_mask")
        if stem in by_stem:
            raise ValueError(f"{mask_option} {by_stem[stem]} and {mask} both match the image stem {stem!r}")
        by_stem[stem] = mask
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ValueError(
                f"{image_option} {stems[image.stem]} and {image} share the file stem "
                f"{image.stem!r}, so masks cannot be matched to them; rename one"
            )
        stems[image.stem] = image
    unmatched = [str(image) for image in images if image.stem not in by_stem]
    if unmatched:
        raise ValueError(
            f"{mask_option} has no mask for {', '.join(unmatched)} (a mask is matched by file stem: "
            "000.png or 000_mask.png for 000.png)"
        )
    unused = [str(mask) for stem, mask in by_stem.items() if stem not in stems]
    if unused:
        raise ValueError(f"{mask_option} {', '.join(unused)} match no {image_option} image")
    return [by_stem[image.stem] for image in images]


def read_anomalous_images(
    image_option: str,
    image_inputs: Sequence[str] | None,
    mask_option: str,
    mask_inputs: Sequence[str] | None,
    max_pixels: int | None,
) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """The anomalous images an option gives and their masks (matched by file stem, in the images' order),
    or None without masks; a ValueError names the option and the problem."""
    if mask_inputs and not image_inputs:
        raise ValueError(f"{mask_option} needs {image_option} (the images they mark)")
    if not image_inputs:
        return [], None
    paths = option_image_paths(image_option, image_inputs)
    masks = None
    if mask_inputs:
        mask_paths = masks_by_stem(
            paths, option_image_paths(mask_option, mask_inputs), image_option, mask_option
        )
        masks = read_option_images(mask_option, mask_paths, max_pixels, read_mask)
    return read_option_images(image_option, paths, max_pixels), masks


def result_shares(output: Path, num_processes: int) -> list[Path]:
    """The file each process of a multi-process run writes its share of `output`'s records to."""
    return [output.with_name(f"{output.name}.part{rank}.tmp") for rank in range(num_processes)]


def join_results(output: Path, previous: Sequence[dict], shares: Sequence[Path]) -> str:
    """Replace `output` atomically with the `previous` records followed by the shares' JSON lines, in rank
    order; returns the shares' lines."""
    joined = "".join(share.read_text() for share in shares)
    atomic_write_text(output, "".join(json_line(record) for record in previous) + joined)
    return joined
