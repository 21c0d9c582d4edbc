"""Tiles of large images: where they lie, how they are cut, and how their maps are stitched back.

Every method squashes a whole image to its input size (224-518 px), so a small defect on a 20 Mpx frame
becomes a speck. Tiling scores the image tile by tile at the resolution the defect lives at; this module is
the geometry, without any model (scoring with a model is `hf_fsad.tiled_scoring`). It imports numpy and Pillow
only, not torch nor anything of hf_fsad, so `hf-fsad export` ships it beside the exported runner
(`hf_fsad.deploy.run_exported`), which tiles and stitches as `hf_fsad.tiled_scoring` does.

- `Tiling`: `tile_size` and `tile_stride` in source pixels (anomalib's names; an int or (height, width)),
  the `mode` that compares tiles ("pooled": any tile against all reference tiles, for textures; "position":
  each tile against the references' tiles at the same place, for a fixed part under a fixed camera) and the
  rule that makes one image score of the tiles' (`image_score`, "max" by default).
- `Tiling.boxes`: tiles in row-major order covering the whole image; the last row and column lie flush with
  the image's border (as anomalib's `Tiler`), so they overlap their neighbours more when the stride does not
  divide the image. A stride larger than the tile would leave gaps and is refused; a tile larger than the
  image is refused (there is nothing to tile: score the image untiled, or pick a smaller tile).
- `MapStitcher`: tile maps, each resized to its tile's source size, averaged where tiles overlap (every
  covering tile weighs the same, as anomalib's `Tiler.untile`), so equal tile maps stitch to the same map
  without seams. It keeps only one band of tile rows in float64 while the final map fills in, so the extra
  memory is a tile row, not a second copy of the image.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image

TILE_MODES = ("pooled", "position")
# How a tiled image's score (and each branch score) is made of its tiles' scores.
IMAGE_SCORE_RULES = ("max", "mean")


class TileBox(NamedTuple):
    """A tile's place in its image, in source pixels: rows [top, bottom), columns [left, right)."""

    top: int
    left: int
    bottom: int
    right: int

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def pil_box(self) -> tuple[int, int, int, int]:
        """(left, upper, right, lower), as `PIL.Image.crop` takes it."""
        return self.left, self.top, self.right, self.bottom


def _pair(value, name: str) -> tuple[int, int]:
    """An int or a (height, width) pair of positive ints as a (height, width) tuple."""
    pair = (value, value) if isinstance(value, (int, np.integer)) else tuple(value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in pair):
        raise ValueError(f"{name} must be an int or a (height, width) pair of ints, got {value!r}.")
    if min(pair) < 1:
        raise ValueError(f"{name} must be positive, got {value!r}.")
    return int(pair[0]), int(pair[1])


def parse_pixels(text: str) -> tuple[int, int]:
    """A tile size or stride written as text, N (a square) or HxW (e.g. 480x640), in positive source pixels,
    as (height, width); a ValueError says the form (the CLI's and the Space's tile options)."""
    parts = str(text).lower().split("x")
    if len(parts) > 2 or not all(part.strip().isdigit() and int(part) > 0 for part in parts):
        raise ValueError(f"must be N or HEIGHTxWIDTH in positive pixels (e.g. 512 or 480x640), got {text!r}")
    return int(parts[0]), int(parts[-1])


def _describe(pair: tuple[int, int]) -> str:
    return f"{pair[0]}x{pair[1]}"


def tile_starts(length: int, tile: int, stride: int) -> list[int]:
    """Start offsets of tiles of `tile` pixels every `stride` pixels along a side of `length` pixels, the
    last one moved flush with the end when the stride does not reach it exactly."""
    if tile > length:
        raise ValueError(f"A {tile} px tile does not fit in {length} px.")
    starts = list(range(0, length - tile + 1, stride))
    if starts[-1] + tile < length:
        starts.append(length - tile)
    return starts


@dataclass(frozen=True)
class Tiling:
    """How a bank's references and its queries are cut into tiles (see the module docstring).

    tile_size / tile_stride: source pixels, an int or (height, width); the stride defaults to the tile size
    (tiles side by side) and may be smaller (tiles overlap, maps blended). mode: "pooled" or "position".
    image_size: (height, width) of the images a position bank was built on, which every query must have
    (set by `hf_fsad.tiled_scoring.build_tiled_bank`; None in pooled mode, where any size of at least a tile
    is tiled). image_score: "max" (an image is as anomalous as its worst tile) or "mean".
    """

    tile_size: int | tuple[int, int]
    tile_stride: int | tuple[int, int] | None = None
    mode: str = "pooled"
    image_size: tuple[int, int] | None = None
    image_score: str = "max"

    def __post_init__(self):
        size = _pair(self.tile_size, "tile_size")
        stride = size if self.tile_stride is None else _pair(self.tile_stride, "tile_stride")
        object.__setattr__(self, "tile_size", size)
        object.__setattr__(self, "tile_stride", stride)
        if stride[0] > size[0] or stride[1] > size[1]:
            raise ValueError(
                f"tile_stride {_describe(stride)} is larger than tile_size {_describe(size)} (height x width): "
                "the tiles would leave gaps no tile scores; use a stride of at most the tile size."
            )
        if self.mode not in TILE_MODES:
            raise ValueError(f"Tiling mode must be one of {TILE_MODES}, got {self.mode!r}.")
        if self.image_score not in IMAGE_SCORE_RULES:
            raise ValueError(f"image_score must be one of {IMAGE_SCORE_RULES}, got {self.image_score!r}.")
        if self.image_size is not None:
            if self.mode != "position":
                raise ValueError(
                    "image_size is recorded for position tiling only; pooled tiling takes any size."
                )
            object.__setattr__(self, "image_size", _pair(self.image_size, "image_size"))
            self.check_fits(*self.image_size)

    def check_fits(self, height: int, width: int) -> None:
        """Raise unless a tile fits in a `height` x `width` image."""
        if self.tile_size[0] > height or self.tile_size[1] > width:
            raise ValueError(
                f"tile_size {_describe(self.tile_size)} is larger than the {height}x{width} image (height x "
                "width): there is nothing to tile; use a tile_size at most the image's size, or score the image "
                "untiled."
            )

    def boxes(self, height: int, width: int) -> list[TileBox]:
        """The tiles of a `height` x `width` image in row-major order, covering it whole (`tile_starts`); in
        position mode the image must have the size the bank was built on."""
        if self.image_size is not None and (height, width) != self.image_size:
            built = _describe(self.image_size)
            raise ValueError(
                f"This position-tiled bank was built on {built} images (height x width), but the image is "
                f"{height}x{width}: each tile is compared with the references' tile at its place, so resize the "
                f"image to {built} first or build a pooled bank."
            )
        self.check_fits(height, width)
        (tile_height, tile_width), (stride_height, stride_width) = self.tile_size, self.tile_stride
        return [
            TileBox(top, left, top + tile_height, left + tile_width)
            for top in tile_starts(height, tile_height, stride_height)
            for left in tile_starts(width, tile_width, stride_width)
        ]

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Tiling:
        fields = json.loads(text)
        if not isinstance(fields, dict) or set(fields) - set(cls.__dataclass_fields__):
            raise ValueError(f"Invalid tiling: {text!r}.")
        return cls(**fields)

    def describe(self) -> str:
        """One line for logs: tile, stride, mode and score rule."""
        place = "" if self.image_size is None else f" on {_describe(self.image_size)} images"
        return (
            f"{self.mode} tiling{place}: {_describe(self.tile_size)} tiles every {_describe(self.tile_stride)} px "
            f"(height x width), image score = {self.image_score} over tiles"
        )


def crop_tiles(image: Image.Image, boxes: Sequence[TileBox]) -> list[Image.Image]:
    """The tiles of `image` at `boxes` (PIL crops)."""
    return [image.crop(box.pil_box) for box in boxes]


def combine_tile_scores(tile_scores, rule: str):
    """One score of a tiled image's (T,) tile scores (a torch tensor or a numpy array, kept as such): "max" or
    "mean" (`IMAGE_SCORE_RULES`)."""
    if rule == "max":
        return tile_scores.max()
    if rule == "mean":
        return tile_scores.mean()
    raise ValueError(f"image_score must be one of {IMAGE_SCORE_RULES}, got {rule!r}.")


class MapStitcher:
    """One full-resolution map from tile maps added in row-major order (`Tiling.boxes`): each pixel is the
    mean of the maps of the tiles covering it, computed in float64.

    Tiles form a grid, so a pixel's tile count is the product of its row's and its column's; rows above the
    top of the tile being added receive nothing more, so they are divided out into the float32 result and
    leave the float64 band, which never holds more than one tile's height.
    """

    def __init__(self, height: int, width: int, boxes: Sequence[TileBox]):
        self.map = np.empty((height, width), dtype=np.float32)
        tops = sorted({box.top for box in boxes})
        lefts = sorted({box.left for box in boxes})
        self._row_counts = np.zeros(height)
        self._column_counts = np.zeros(width)
        tile_height, tile_width = boxes[0].height, boxes[0].width
        for top in tops:
            self._row_counts[top : top + tile_height] += 1
        for left in lefts:
            self._column_counts[left : left + tile_width] += 1
        if (self._row_counts == 0).any() or (self._column_counts == 0).any():
            raise ValueError("The tile boxes do not cover the whole image.")
        self._band = np.zeros((0, width))
        self._band_top = 0

    def add(self, box: TileBox, tile_map) -> None:
        """Add one tile's (box.height, box.width) map (a numpy array or a CPU tensor); boxes come in row-major
        order."""
        if box.top < self._band_top:
            raise ValueError("Tiles must be added in row-major order (Tiling.boxes).")
        self._finish_rows(box.top)
        missing = box.bottom - (self._band_top + len(self._band))
        if missing > 0:
            self._band = np.concatenate([self._band, np.zeros((missing, self._band.shape[1]))])
        rows = slice(box.top - self._band_top, box.bottom - self._band_top)
        self._band[rows, box.left : box.right] += np.asarray(tile_map, dtype=np.float64)

    def _finish_rows(self, end: int) -> None:
        """Divide rows [band top, end) by their tile counts into the result and drop them from the band."""
        count = end - self._band_top
        if count <= 0:
            return
        counts = self._row_counts[self._band_top : end, None] * self._column_counts[None, :]
        self.map[self._band_top : end] = self._band[:count] / counts
        self._band = self._band[count:]
        self._band_top = end

    def result(self) -> np.ndarray:
        """The stitched (height, width) float32 map, once every tile was added."""
        self._finish_rows(self.map.shape[0])
        return self.map
