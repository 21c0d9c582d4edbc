"""What `hf_fsad.io` (the CLI, pipeline, Space and loaders) and the runner shipped beside an export
(`run_exported.py`) share, with numpy and Pillow alone, so both read every file by one rule and write one
record format: reading images (`read_image`, `--max-pixels`), expanding inputs, the JSON-lines records
(`json_line`, `LABEL_NAMES`, `score_error`) and their `--resume` parsing, atomic and interruptible writing.

It imports nothing of hf_fsad: `hf-fsad export` copies it beside `run_exported.py`. Every image is turned
upright by its EXIF orientation and converted to RGB by one rule (`to_upright_rgb`: transparency composited
on white as transformers' `CLIPImageProcessor` does); a file that cannot be used raises an `ImageReadError`
whose message says why, which the caller reports before going on with the other files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import numpy as np
from PIL import ExifTags, Image, ImageOps

T = TypeVar("T")
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"}
# 8192 pixels a side: a 67-megapixel image costs about 1 GB to score with a full-size heatmap.
DEFAULT_MAX_PIXELS = 8192 * 8192


class ImageReadError(ValueError):
    """A file that cannot be used as an image; the message says why (without the path)."""


def _check_pixel_count(width: int, height: int, max_pixels: int | None) -> None:
    if max_pixels is not None and width * height > max_pixels:
        raise ImageReadError(
            f"{width}x{height} pixels ({width * height / 1e6:.1f} Mpx) is above the limit of "
            f"{max_pixels / 1e6:.1f} Mpx (--max-pixels); downscale it or raise the limit"
        )


# The EXIF orientations that turn an image a quarter (width and height swap).
_QUARTER_TURNS = {5, 6, 7, 8}


def _orientation(image: Image.Image) -> int:
    return image.getexif().get(ExifTags.Base.Orientation, 1)


def upright(image: Image.Image) -> Image.Image:
    """`image` turned as its EXIF orientation tag says (a phone photo taken sideways), the way transformers'
    `load_image` and `datasets`' image decoding do; `image` itself when it has no such tag. The tag is removed
    from the turned image, so turning twice is harmless."""
    if _orientation(image) == 1:
        return image
    return ImageOps.exif_transpose(image)


def upright_size(image: Image.Image) -> tuple[int, int]:
    """(width, height) of `upright(image)` without turning it (a PNG is decoded, as its EXIF may follow its
    pixels)."""
    width, height = image.size
    return (height, width) if _orientation(image) in _QUARTER_TURNS else (width, height)


def has_transparency(image: Image.Image) -> bool:
    """Whether `image` has an alpha band (RGBA, LA, PA) or a transparent colour (a palette or PNG `tRNS`
    entry): transformers' `convert_to_rgb` test, so both read the same images as transparent."""
    return "A" in image.getbands() or image.info.get("transparency") is not None


def to_rgb(image: Image.Image) -> Image.Image:
    """`image` as 8-bit RGB with its full value range kept.

    16- and 32-bit integer images are scaled from 0..65535 (so 16-bit greyscale keeps its contrast instead of
    saturating at 255); float images are read as 0..1 when their maximum is at most 1 and as 0..255
    otherwise, and refused when values fall outside that range, since any mapping would be a guess.
    Transparency (`has_transparency`) is composited on white, as `CLIPImageProcessor` does
    (transformers' `convert_to_rgb`), so a bank built from `processor(Image.open(path))` and one built by the
    CLI see the same pixels.
    """
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        values = np.asarray(image, dtype=np.float64)
        if values.min() < 0 or values.max() > 65535:
            raise ImageReadError(
                f"{image.mode} image with values {values.min():g}..{values.max():g} outside 0..65535"
            )
        return Image.fromarray(np.round(values / 257.0).astype(np.uint8), mode="L").convert("RGB")
    if image.mode == "F":
        values = np.asarray(image, dtype=np.float64)
        if not np.isfinite(values).all():
            raise ImageReadError("float image with NaN or infinite values")
        low, high = float(values.min()), float(values.max())
        scale = 255.0 if high <= 1.0 else 1.0
        if low < 0 or high > 255:
            raise ImageReadError(f"float image with values {low:g}..{high:g} outside 0..1 and 0..255")
        return Image.fromarray(np.round(values * scale).astype(np.uint8), mode="L").convert("RGB")
    if has_transparency(image):
        white = Image.new("RGBA", image.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, image.convert("RGBA")).convert("RGB")
    return image.convert("RGB")


# Which rule turns a file into the RGB pixels a model sees; features cached under another rule are not reused
# (2: EXIF orientation applied, transparency composited on white).
IMAGE_READING_RULE = 2


def to_upright_rgb(image: Image.Image) -> Image.Image:
    """`image` as every path reads it: turned upright (`upright`), then converted to RGB (`to_rgb`)."""
    return to_rgb(upright(image))


def with_open_image(path: str | os.PathLike, max_pixels: int | None, use: Callable[[Image.Image], T]) -> T:
    """`use(image)` on the opened image at `path`, after the file and its header's pixel count are checked;
    every failure becomes an `ImageReadError` saying why."""
    path = Path(path)
    if path.is_dir():
        raise ImageReadError("is a directory, not an image file")
    if not path.exists():
        raise ImageReadError("file not found")
    if path.stat().st_size == 0:
        raise ImageReadError("empty file")
    return _with_decoded(path, max_pixels, use)


def _with_decoded(source: Path | BinaryIO, max_pixels: int | None, use: Callable[[Image.Image], T]) -> T:
    """`use(image)` on the image PIL opens from `source` once its header's pixel count is checked; every
    failure becomes an `ImageReadError` saying why."""
    try:
        with warnings.catch_warnings():
            # Size is checked against `max_pixels`; PIL's warning would only repeat it.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(source) as image:
                _check_pixel_count(*image.size, max_pixels)
                return use(image)
    except ImageReadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageReadError(f"refused as a decompression bomb ({error})") from None
    except Image.UnidentifiedImageError:
        raise ImageReadError("not an image PIL can read (unknown or corrupt format)") from None
    except MemoryError:
        raise ImageReadError("too large to decode in the memory available") from None
    except Exception as error:  # noqa: BLE001  (PIL's decoders raise OSError, SyntaxError, ValueError, struct.error, ...)
        raise ImageReadError(f"cannot decode the image ({type(error).__name__}: {error})") from None


def read_image(path: str | os.PathLike, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image at `path`, upright (`upright`) and as RGB (`to_rgb`), or an `ImageReadError` saying why it
    cannot be used.

    The pixel count is checked from the header before anything is decoded, so a decompression bomb or a
    huge image is refused without allocating it. `max_pixels` None lifts the limit (PIL's own
    decompression-bomb limit still applies).
    """
    return with_open_image(path, max_pixels, _loaded_upright_rgb)


def read_image_bytes(data: bytes, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> Image.Image:
    """The image encoded in `data` (a downloaded file) read as `read_image` reads files: same checks, same
    rule, same errors."""
    if not data:
        raise ImageReadError("empty file")
    return _with_decoded(BytesIO(data), max_pixels, _loaded_upright_rgb)


def _loaded_upright_rgb(image: Image.Image) -> Image.Image:
    image.load()
    return to_upright_rgb(image)


def expand_inputs(inputs: Sequence[str | os.PathLike], what: str = "input") -> list[Path]:
    """Files as given (any suffix, so a bad one gets reported), directories expanded to their images; a
    directory holding none is reported on stderr as `skipped WHAT PATH: ...`."""
    paths: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                print(f"skipped {what} {path}: a directory with no image files", file=sys.stderr)
            paths += found
        else:
            paths.append(path)
    return paths


def readable_images(
    paths: Sequence[Path],
    what: str,
    max_pixels: int | None = DEFAULT_MAX_PIXELS,
    on_skip: Callable[[], None] | None = None,
) -> Iterator[tuple[Path, Image.Image]]:
    """(path, RGB image) for each usable file; each other one is reported on stderr as
    `skipped WHAT PATH: reason` and skipped (then `on_skip()` is called, e.g. to move a progress bar)."""
    for path in paths:
        try:
            yield path, read_image(path, max_pixels)
        except ImageReadError as error:
            print(f"skipped {what} {path}: {error}", file=sys.stderr)
            if on_skip is not None:
                on_skip()


@contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside `path` to write to; it replaces `path` when the block ends without an error
    and is removed when it raises, so readers see the old file or the complete new one."""
    path = Path(path)
    temporary = path.with_name(path.name + ".tmp")
    try:
        yield temporary
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def json_safe(value: Any) -> Any:
    """`value` with every NaN or infinite float, in nested dicts, lists and tuples too, replaced by None, so
    `json.dumps(json_safe(record), allow_nan=False)` writes valid JSON (null, never `NaN`)."""
    if isinstance(value, dict):
        return {key: json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(item) for item in value]
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def json_line(record: dict) -> str:
    """`record` as one line of valid JSON (a non-finite number as null, `json_safe`), newline included."""
    return json.dumps(json_safe(record), allow_nan=False) + "\n"


def batched(items: Iterable[T], size: int) -> Iterator[list[T]]:
    """`items` in lists of `size` (the last one shorter), consumed lazily."""
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def distinct_paths(paths: Sequence[Path], report: bool = True, what: str = "input") -> list[Path]:
    """`paths` without repeats of a file (first occurrence kept; each repeat reported on stderr as
    `skipped WHAT PATH: listed more than once` if `report`)."""
    seen: set[Path] = set()
    distinct = []
    for path in paths:
        key = path.resolve()
        if key in seen:
            if report:
                print(f"skipped {what} {path}: listed more than once", file=sys.stderr)
            continue
        seen.add(key)
        distinct.append(path)
    return distinct


def unique_name(stem: str, used: set[str]) -> str:
    """`stem`, or `stem-2`, `stem-3` ... when taken: the first name not in `used` (then added to it)."""
    name, counter = stem, 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}"
    used.add(name)
    return name


def previous_results(output: Path) -> list[dict]:
    """The records of a results file written by an earlier `hf-fsad score` or `run_exported.py` (for
    --resume); [] when there is none, a ValueError when the file holds anything else."""
    if not output.exists():
        return []
    records = []
    for number, line in enumerate(output.read_text(encoding="utf-8").splitlines(), start=1):
        try:
            record = json.loads(line)
            record["path"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise ValueError(
                f"--output {output} is not a results file of hf-fsad score (line {number}); move it away "
                "or run without --resume"
            ) from None
        records.append(record)
    return records


# The verdict of a calibrated record's `label`: index 1 is anomalous (score above the threshold).
LABEL_NAMES = ("normal", "anomalous")


def score_error(image_score: float) -> str | None:
    """Why an image score cannot be trusted, or None for a finite one; a part with such a score fails."""
    if math.isfinite(image_score):
        return None
    return (
        f"the image score is {image_score}: the model's output cannot be trusted, so the part fails (check "
        "the image and the model's precision)"
    )


def pixel_limit(text: str) -> int | None:
    """`--max-pixels`: a positive pixel count, or 0 for no limit (None)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive pixel count, got {value}")
    return value or None


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    """`--max-pixels` (`pixel_limit`), as `hf-fsad score` and the exported runner take it."""
    parser.add_argument(
        "--max-pixels",
        type=pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS}: 8192 x 8192; 0: no limit)",
    )


@contextmanager
def sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so a terminated run ends like Ctrl-C: results saved."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def prepare_output_file(path: str | os.PathLike, what: str) -> Path:
    """Create `path`'s folder if needed and check a file can be written there, before any work is done;
    a `ValueError` names `what` (e.g. "--output") and the problem."""
    return _prepare(Path(path), what, directory=False)


def prepare_output_dir(path: str | os.PathLike, what: str) -> Path:
    """Create the folder `path` if needed and check files can be written in it, before any work is done."""
    return _prepare(Path(path), what, directory=True)


def _prepare(path: Path, what: str, directory: bool) -> Path:
    folder = path if directory else path.parent
    if not directory and path.is_dir():
        raise ValueError(f"{what} {path} is a directory; give a file name")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".hf_fsad-write-check-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise ValueError(f"{what} {path} cannot be written: {reason} ({folder})") from None
    return path
