"""Options that several commands take, declared once: pixel limit, batch size, device, precision, runtime."""

from __future__ import annotations

import argparse
import math

from hf_fsad.deploy.run_exported import RUNTIMES
from hf_fsad.io import DEFAULT_MAX_PIXELS


def pixel_limit(text: str) -> int | None:
    """`--max-pixels`: a positive pixel count, or 0 for no limit (None)."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive pixel count, got {value}")
    return value or None


def rate(text: str) -> float:
    """A rate strictly between 0 and 1."""
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (e.g. 0.05 for 5 %), got {value}")
    return value


def finite_float(text: str) -> float:
    """A finite number (not nan or inf)."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def add_max_pixels(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--max-pixels",
        type=pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS}: 8192 x 8192; 0: no limit)",
    )


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


def add_precision(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--precision",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="compute in half precision under torch.autocast (GPU; see docs/performance.md; default "
        "%(default)s)",
    )


def add_runtime(parser: argparse.ArgumentParser, help: str) -> None:
    """`--runtime`: PyTorch, or one of the runtimes `hf-fsad export` targets."""
    parser.add_argument("--runtime", choices=["torch", *RUNTIMES], default="torch", help=help)
