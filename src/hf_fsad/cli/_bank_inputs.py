"""The bank and calibration images that `hf-fsad score` and `hf-fsad calibrate` read from the same options:
--reference or --bank, --defect and --defect-mask, --class-name, --calibration-normal,
--calibration-anomalous and --calibration-masks, --threshold-rule, and the tile options a --bank must agree
with."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from ._errors import CliError
from ._options import tiling_of

if TYPE_CHECKING:
    from PIL import Image

    from hf_fsad.bank import ReferenceBank


def check_defects(model, args: argparse.Namespace, defects: list) -> None:
    """Refuse defective images for a method that builds its bank from normal references only, and a bank
    built without them for a method that needs them."""
    method = model.config.model_type
    if defects and not model.needs_anomalous_references:
        raise CliError(
            f"--defect: {method} builds its bank from normal references only (defective images can "
            "calibrate its threshold: --calibration-anomalous)"
        )
    if model.needs_anomalous_references and not defects and not args.bank:
        raise CliError(
            f"{method} builds its bank from defective images too: give --defect IMAGE (and "
            "--defect-mask MASK), or a --bank"
        )


def threshold_rule(args: argparse.Namespace) -> str:
    """The `--threshold-rule` as `fit_calibration` names it (false-alarm-rate -> false_alarm_rate)."""
    return (args.threshold_rule or "false-alarm-rate").replace("-", "_")


def read_reference_images(args: argparse.Namespace) -> list[Image.Image]:
    """The readable `--reference` images (none without it, or with a --bank); a CliError when none is."""
    from hf_fsad.io import expand_inputs, readable_images

    if not args.reference or args.bank:
        return []
    readable = list(readable_images(expand_inputs(args.reference, "reference"), "reference", args.max_pixels))
    if not readable:
        raise CliError("none of the --reference images could be read", exit_status=1)
    return [image for _, image in readable]


def saved_bank(model, args: argparse.Namespace) -> ReferenceBank | None:
    """The `--bank`, checked against the model, `--class-name` and the tile options (a tiled bank scores as it
    was tiled); None without it."""
    from hf_fsad.bank import ReferenceBank
    from hf_fsad.calibration_policy import checked_saved_bank, tiling_conflict

    if not args.bank:
        return None
    try:
        bank = checked_saved_bank(model, ReferenceBank.load(args.bank))
    except ValueError as error:
        raise CliError(f"--bank {args.bank}: {error}") from None
    if args.class_name is not None and args.class_name != bank.class_name:
        raise CliError(
            f"--class-name {args.class_name}: the --bank holds class {bank.class_name!r}, fixed "
            "when it was built (build a bank of another class from --reference)"
        )
    conflict = tiling_conflict(bank, tiling_of(args))
    if conflict is not None:
        raise CliError(f"--bank {args.bank}: {conflict}")
    return bank


def read_calibration_images(
    args: argparse.Namespace,
) -> tuple[list[Image.Image], list[Image.Image], list[Image.Image] | None]:
    """(held-out normal, anomalous images, their masks or None) of the calibration options; a ValueError names
    the option and the file that cannot be used."""
    from hf_fsad.io import option_image_paths, read_anomalous_images, read_option_images

    normal = []
    if args.calibration_normal:
        normal_paths = option_image_paths("--calibration-normal", args.calibration_normal)
        normal = read_option_images("--calibration-normal", normal_paths, args.max_pixels)
    anomalous, masks = read_anomalous_images(
        "--calibration-anomalous",
        args.calibration_anomalous,
        "--calibration-masks",
        args.calibration_masks,
        args.max_pixels,
    )
    return normal, anomalous, masks
