"""`hf-fsad export`: a model and its bank to ONNX or OpenVINO, with a torch-free runner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._errors import CliError
from ._options import add_allow_untrained, add_max_pixels


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "export", help="export a model and its bank to ONNX or OpenVINO, with a torch-free runner"
    )
    parser.add_argument("--model", required=True, help="saved model dir, Hub id, or METHOD@CLIP")
    parser.add_argument(
        "--bank", help="reference bank (.safetensors); default: the method's own (zero-shot) bank"
    )
    parser.add_argument(
        "--format", choices=["onnx", "openvino"], default="onnx", help="runtime format (default %(default)s)"
    )
    parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    parser.add_argument(
        "--precision",
        choices=["float32", "int8"],
        default="float32",
        help="float32 (default; OpenVINO may run it in bfloat16) or int8: the image encoder's matrix products "
        "quantised (NNCF for openvino, ONNX Runtime's quantiser for onnx), calibrated on --reference",
    )
    parser.add_argument(
        "--reference",
        nargs="+",
        metavar="PATH",
        help="with --precision int8: the bank's reference images (files or folders) the quantiser is calibrated "
        "on, topped up with views generated from them",
    )
    parser.add_argument(
        "--max-int8-error",
        type=float,
        metavar="SHARE",
        help="largest int8 score or map error accepted, as a share of the float32 outputs' spread on the "
        "calibration images (default: hf_fsad.quantization.DEFAULT_MAX_INT8_ERROR, 0.05); above it the export is float32, with a warning",
    )
    parser.add_argument(
        "--strict-precision",
        action="store_true",
        help="with --precision int8: refuse (exit 2) instead of falling back to float32 above --max-int8-error",
    )
    add_max_pixels(parser)
    add_allow_untrained(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Export a model and its bank to ONNX or OpenVINO (`hf_fsad.export`); exit 2 when the model, the bank or
    the output folder cannot be used, or the method does not export."""
    from hf_fsad.bank import ReferenceBank
    from hf_fsad.deploy.run_exported import read_manifest
    from hf_fsad.export import export_model
    from hf_fsad.io import expand_inputs, prepare_output_dir, readable_images
    from hf_fsad.loading import ModelLoadError, load_method

    if args.precision == "int8" and not args.reference:
        raise CliError(
            "--precision int8 calibrates its quantiser on the bank's reference images: give --reference"
        )
    if args.reference and args.precision != "int8":
        raise CliError("--reference calibrates the int8 quantiser: it goes with --precision int8")
    try:
        output = prepare_output_dir(Path(args.out).resolve().parent, "--out") / Path(args.out).name
        references = []
        if args.reference:
            paths = expand_inputs(args.reference, "reference")
            references = [image for _, image in readable_images(paths, "reference", args.max_pixels)]
            if not references:
                raise CliError("none of the --reference images could be read", exit_status=1)
        model = load_method(args.model, allow_untrained=args.allow_untrained)
        bank = ReferenceBank.load(args.bank) if args.bank else None
        export_model(
            model,
            bank,
            output,
            args.format,
            args.precision,
            references,
            args.max_int8_error,
            args.strict_precision,
        )
    except (ModelLoadError, ValueError) as error:
        raise CliError(str(error)) from None
    manifest = read_manifest(output)
    int8 = manifest["int8"]
    measured = (
        "" if int8 is None else f"; int8 error {max(int8['errors'].values()):.3g} (bound {int8['max_error']})"
    )
    print(
        f"exported {model.config.model_type} ({args.format}, {manifest['precision']}{measured}) -> {output}",
        file=sys.stderr,
    )
    return 0
