"""`hf-fsad calibrate`: calibrate a bank on held-out normal images (and defects), or add normal images to a
saved calibration, and write the calibrated bank with a report a quality engineer reads
(`hf_fsad.calibration_report`)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_fsad.calibration_policy import DEFAULT_FALSE_ALARM_RATE

from ._bank_inputs import (
    check_defects,
    read_calibration_images,
    read_reference_images,
    saved_bank,
    threshold_rule,
)
from ._errors import CliError
from ._options import (
    add_allow_untrained,
    add_batch_size,
    add_device,
    add_max_pixels,
    add_precision,
    add_tiling,
    rate,
    tiling_of,
)


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "calibrate",
        help="calibrate a bank and write a report of what its threshold promises",
        description="Calibrate a reference bank (--bank, or built from --reference) on held-out normal "
        "images (--calibration-normal; without them the references are scored leave-one-out), or pool more "
        "normal images into a saved bank's held-out calibration (--add-normal), and write the calibrated "
        "bank (--save-bank) and a report folder (--report): the guarantee in one sentence, a score "
        "histogram with the threshold, ROC and precision-recall curves with defects, and the false-alarm and "
        "miss rates per threshold. Exit status: 0 calibrated, 2 it could not (arguments, an image that "
        "cannot be read, model, bank, calibration, output location).",
    )
    parser.add_argument(
        "--model",
        required=True,
        help="a saved model directory, a Hub id, or METHOD@CLIP (as `hf-fsad score --model`)",
    )
    bank_source = parser.add_mutually_exclusive_group()
    bank_source.add_argument(
        "--reference",
        nargs="+",
        metavar="PATH",
        help="normal reference images or directories to build the bank",
    )
    bank_source.add_argument("--bank", help="a saved reference bank (.safetensors) to calibrate")
    parser.add_argument(
        "--defect",
        nargs="+",
        metavar="PATH",
        help="defective images for the bank of a method that learns from them (as `hf-fsad score`)",
    )
    parser.add_argument(
        "--defect-mask",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --defect image, matched by file stem",
    )
    parser.add_argument(
        "--no-weight-search",
        action="store_true",
        help="with --defect: keep the anomalous memory's baseline score weights (as `hf-fsad score`)",
    )
    parser.add_argument("--class-name", help="object name for the text prompts of a built bank")
    parser.add_argument(
        "--calibration-normal",
        nargs="+",
        metavar="PATH",
        help="held-out normal images or directories (not references): the exact conformal guarantee",
    )
    parser.add_argument(
        "--calibration-anomalous",
        nargs="+",
        metavar="PATH",
        help="defective images: their miss rate per threshold and the ROC and precision-recall curves",
    )
    parser.add_argument(
        "--calibration-masks",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --calibration-anomalous image, matched by file stem (needs --threshold-rule "
        "best-f1)",
    )
    parser.add_argument(
        "--add-normal",
        nargs="+",
        metavar="PATH",
        help="more held-out normal images for the --bank's held-out calibration: scored against the bank and "
        "pooled with the scores it keeps (the threshold calibrating on all of them at once gives)",
    )
    parser.add_argument(
        "--false-alarm-rate",
        type=rate,
        help=f"share of normal images allowed to fail (default {DEFAULT_FALSE_ALARM_RATE}; with "
        "--add-normal: the calibration's own)",
    )
    parser.add_argument(
        "--confidence",
        type=rate,
        help="probability that the false-alarm rate holds for this calibration, not only on average (with "
        "--add-normal: the calibration's own by default)",
    )
    parser.add_argument(
        "--threshold-rule",
        choices=("false-alarm-rate", "best-f1"),
        help="false-alarm-rate (default) or best-f1 (needs --calibration-anomalous; no guarantee)",
    )
    parser.add_argument("--save-bank", required=True, help="the calibrated bank (.safetensors) to write")
    parser.add_argument(
        "--report", required=True, help="the report folder to write (replaced atomically; report.md first)"
    )
    add_batch_size(parser)
    add_device(parser)
    add_precision(parser)
    add_max_pixels(parser)
    add_allow_untrained(parser)
    add_tiling(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Calibrate the bank, save it and write the report. Exit status: 0 calibrated, 2 it could not (arguments,
    a calibration image that cannot be read: none is skipped, model, bank, calibration, output location)."""
    import dataclasses

    from hf_fsad.calibration_inputs import calibration_mismatch
    from hf_fsad.calibration_policy import BankBuildError, calibrated_bank
    from hf_fsad.calibration_report import pooled_calibration, pooling_refusal, write_calibration_report
    from hf_fsad.io import (
        option_image_paths,
        prepare_output_dir,
        prepare_output_file,
        read_anomalous_images,
        read_option_images,
    )
    from hf_fsad.loading import ModelLoadError, load_method, take_untrained_warning

    _check_calibrate_options(args)
    tiling_of(args)  # a bad tiling is refused before anything is read
    try:
        prepare_output_file(args.save_bank, "--save-bank")
        report = prepare_output_dir(Path(args.report).parent, "--report") / Path(args.report).name
        held_out_normals, anomalous, anomalous_masks = read_calibration_images(args)
        if args.add_normal:
            paths = option_image_paths("--add-normal", args.add_normal)
            held_out_normals = read_option_images("--add-normal", paths, args.max_pixels)
        defects, defect_masks = read_anomalous_images(
            "--defect", args.defect, "--defect-mask", args.defect_mask, args.max_pixels
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    references = read_reference_images(args)
    try:
        model = load_method(args.model, allow_untrained=args.allow_untrained).to(args.device).eval()
    except ModelLoadError as error:
        raise CliError(f"--model: {error}") from None
    untrained = take_untrained_warning(model)  # --allow-untrained, or saved before training was recorded
    if untrained is not None:
        print(f"warning: {untrained}", file=sys.stderr)
    check_defects(model, args, defects)
    bank = saved_bank(model, args)
    stored = bank.calibration if bank is not None else None
    if args.add_normal:
        if stored is None:
            raise CliError(f"--add-normal: the --bank {args.bank} has no calibration to add normal images to")
        refusal = pooling_refusal(stored) or calibration_mismatch(stored, "torch", args.precision)
        if refusal is not None:  # said before the images are scored
            raise CliError(f"--add-normal: the --bank's calibration {refusal}")
    try:
        made = calibrated_bank(
            model,
            references,
            class_name=args.class_name,
            defects=defects,
            defect_masks=defect_masks,
            held_out_normals=held_out_normals,
            anomalous=anomalous,
            anomalous_masks=anomalous_masks,
            bank=bank,
            calibrate=True,
            false_alarm_rate=args.false_alarm_rate,
            confidence=args.confidence,
            rule=threshold_rule(args),
            weight_search=not args.no_weight_search,
            precision=args.precision,
            batch_size=args.batch_size,
            tiling=tiling_of(args),
        )
        calibrated, warnings = made.bank, made.warnings
        if args.add_normal:  # the added normals' calibration is only the way to score them as calibrate does
            settings = {"false_alarm_rate": args.false_alarm_rate, "confidence": args.confidence}
            given = {name: value for name, value in settings.items() if value is not None}
            pooled = pooled_calibration(stored, calibrated.calibration, **given)
            calibrated = dataclasses.replace(calibrated, calibration=pooled)
            warnings = [] if pooled.shortfall() is None else [pooled.shortfall()]
    except BankBuildError as error:
        raise CliError(str(error)) from None
    except ValueError as error:
        raise CliError(f"calibration: {error}") from None
    for note in made.notes:
        print(f"note: {note}", file=sys.stderr)
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    calibration = calibrated.calibration
    write_calibration_report(calibration, report, title=f"Calibration report: {calibrated.class_name}")
    calibrated.save(args.save_bank)
    pooled_note = f" ({len(held_out_normals)} added to {stored.num_normal})" if args.add_normal else ""
    print(f"calibration: {calibration.describe()}{pooled_note}", file=sys.stderr)
    print(f"calibrated bank -> {args.save_bank}; report -> {report / 'report.md'}", file=sys.stderr)
    return 0


def _check_calibrate_options(args: argparse.Namespace) -> None:
    """Refuse what calibrate cannot do before anything is read: --add-normal pools into a saved bank's
    calibration alone, a calibration needs normal images, and best F1 needs defects (masks need best F1)."""
    if args.bank and args.defect:
        raise CliError("--defect builds a bank from defective images, --bank is a built one: give one")
    if args.threshold_rule == "best-f1" and not args.calibration_anomalous:
        raise CliError("--threshold-rule best-f1 needs --calibration-anomalous: F1 counts the defects caught")
    if args.calibration_masks and args.threshold_rule != "best-f1":
        raise CliError(
            "--calibration-masks set the pixel threshold by best pixel F1: add --threshold-rule best-f1"
        )
    if args.add_normal:
        if not args.bank:
            raise CliError("--add-normal adds normal images to the calibration of a saved --bank: give one")
        others = {
            "--calibration-normal": args.calibration_normal,
            "--calibration-anomalous": args.calibration_anomalous,
            "--calibration-masks": args.calibration_masks,
            "--threshold-rule": args.threshold_rule,
        }
        given = [name for name, value in others.items() if value]
        if given:
            raise CliError(
                "--add-normal keeps the --bank's calibration images and rule: leave out "
                f"{', '.join(given)} (or calibrate afresh on all the images without --add-normal)"
            )
    elif args.bank and not args.calibration_normal:
        raise CliError(
            "a saved --bank has no references to leave out: give held-out --calibration-normal images, or "
            "--add-normal to add to its calibration"
        )
    elif not args.reference and not args.calibration_normal:
        raise CliError("give --calibration-normal images, or --reference images to score leave-one-out")
