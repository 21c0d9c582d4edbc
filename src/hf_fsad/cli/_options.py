"""Options that several commands take, declared once: pixel limit, batch size, device, precision, runtime,
untrained models, tiling."""

from __future__ import annotations

import argparse
import math
from typing import TYPE_CHECKING

from hf_fsad.deploy.image_files import add_max_pixels  # noqa: F401  (the exported runner takes it too)
from hf_fsad.deploy.run_exported import RUNTIMES

from ._errors import CliError

if TYPE_CHECKING:
    from hf_fsad.tiling import Tiling


def rate(text: str) -> float:
    """A rate strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (e.g. 0.05 for 5 %), got {value}")
    return value


def review_band(text: str) -> float:
    """`--review-band`: a half-width in normalised-score units, strictly between 0 and 0.5."""
    value = float(text)
    if not 0 < value < 0.5:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 0.5 (e.g. 0.1: 0.4 to 0.6), got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (not nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def positive_int(text: str) -> int:
    """A whole number of at least 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number of at least 0 (e.g. a share of GPUs or CPUs)."""
    value = finite_float(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_batch_size(parser: argparse.ArgumentParser) -> None:
    """`--batch-size`; `hf_fsad.cli.main` refuses values below 1."""
    parser.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)"
    )


def add_device(
    parser: argparse.ArgumentParser,
    help: str = "torch device, e.g. cuda or cpu (default %(default)s: CUDA, then MPS, then the CPU)",
) -> None:
    parser.add_argument("--device", default="auto", help=help)


def add_precision(parser: argparse.ArgumentParser, exported: bool = False) -> None:
    """`--precision`: PyTorch's autocast precisions and, where the command scores on exported runtimes
    (`exported`), int8 (an int8 export of the model and bank)."""
    choices = ["float32", "bfloat16", "float16"] + (["int8"] if exported else [])
    help = "compute in half precision under torch.autocast (GPU; see docs/performance.md)"
    if exported:
        help += (
            "; with an exported --runtime: float32, bfloat16 (openvino) or int8 (an int8 export calibrated on "
            "the --reference images, or the --calibration-normal ones; docs/export.md)"
        )
    parser.add_argument(
        "--precision", choices=choices, default="float32", help=help + "; default %(default)s"
    )


def add_runtime(parser: argparse.ArgumentParser, help: str) -> None:
    """`--runtime`: PyTorch, or one of the runtimes `hf-fsad export` targets."""
    parser.add_argument("--runtime", choices=["torch", *RUNTIMES], default="torch", help=help)


def add_allow_untrained(parser: argparse.ArgumentParser) -> None:
    """`--allow-untrained`: load a model whose trained parts were never trained (`hf_fsad.loading`)."""
    parser.add_argument(
        "--allow-untrained",
        action="store_true",
        help="score a method whose own parts must be trained (MetaCAN, AF-CLIP) with random weights, as "
        "METHOD@CLIP builds them (demos, tests); without it such a model is refused with how to get weights",
    )


def tile_pixels(text: str) -> tuple[int, int]:
    """`--tile-size` / `--tile-stride`: N (a square) or HxW, in source pixels, as (height, width)."""
    from hf_fsad.tiling import parse_pixels

    try:
        return parse_pixels(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_tiling(
    parser: argparse.ArgumentParser,
    description: str = "score large images tile by tile at the model's input size, the maps stitched at the "
    "image's full size (docs/scoring.md); a tiled --bank scores tiled without these options",
) -> None:
    """`--tile-size`, `--tile-stride`, `--tile-mode`: build a tiled bank (`hf_fsad.tiling.Tiling`)."""
    group = parser.add_argument_group("tiling", description)
    group.add_argument(
        "--tile-size",
        type=tile_pixels,
        metavar="N|HxW",
        help="tile size in source pixels (default: no tiling, each image squashed to the model's input)",
    )
    group.add_argument(
        "--tile-stride",
        type=tile_pixels,
        metavar="N|HxW",
        help="distance between tiles in source pixels, at most the tile size (default: the tile size); "
        "smaller strides overlap the tiles, their maps averaged",
    )
    group.add_argument(
        "--tile-mode",
        choices=("pooled", "position"),
        help="pooled (default): each tile against all reference tiles (textures); position: against the "
        "references' tile at its place (a fixed part under a fixed camera; every image of one size)",
    )


def tiling_of(args: argparse.Namespace) -> Tiling | None:
    """The `Tiling` the tile options ask for, or None without `--tile-size`; a CliError names a bad one."""
    if args.tile_size is None:
        given = [
            name
            for name, value in (("--tile-stride", args.tile_stride), ("--tile-mode", args.tile_mode))
            if value
        ]
        if given:
            raise CliError(f"{' and '.join(given)} tile only with --tile-size: give the tile size too")
        return None
    from hf_fsad.tiling import Tiling

    try:
        return Tiling(args.tile_size, args.tile_stride, args.tile_mode or "pooled")
    except ValueError as error:
        raise CliError(f"--tile-size/--tile-stride: {error}") from None
