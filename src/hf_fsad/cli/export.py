"""`hf-fsad export`: a model and its bank to ONNX or OpenVINO, with a torch-free runner."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ._errors import CliError
from ._options import add_allow_untrained


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
    add_allow_untrained(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Export a model and its bank to ONNX or OpenVINO (`hf_fsad.export`); exit 2 when the model, the bank or
    the output folder cannot be used, or the method does not export."""
    from hf_fsad.bank import ReferenceBank
    from hf_fsad.export import export_model
    from hf_fsad.io import prepare_output_dir
    from hf_fsad.loading import ModelLoadError, load_method

    try:
        output = prepare_output_dir(Path(args.out).resolve().parent, "--out") / Path(args.out).name
        model = load_method(args.model, allow_untrained=args.allow_untrained)
        bank = ReferenceBank.load(args.bank) if args.bank else None
        export_model(model, bank, output, args.format)
    except (ModelLoadError, ValueError) as error:
        raise CliError(str(error)) from None
    print(f"exported {model.config.model_type} ({args.format}) -> {output}", file=sys.stderr)
    return 0
