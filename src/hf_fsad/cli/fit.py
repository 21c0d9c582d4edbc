"""`hf-fsad fit`: fit a method that is fitted per category (VTFusion, One-to-Normal) on one part's normal
images and save it."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from hf_fsad.registry import METHODS

from ._errors import CliError
from ._options import add_device, add_max_pixels


def register(commands: argparse._SubParsersAction) -> None:
    fitted = [name for name, spec in sorted(METHODS.items()) if spec.fits_per_category]
    parser = commands.add_parser(
        "fit",
        help=f"fit a method fitted per category ({', '.join(fitted)}) on normal images",
        description=f"Fit a method that is fitted per category ({', '.join(fitted)}) on one part's normal "
        "images and save it (save_pretrained); `hf-fsad score --model OUT` then scores without references. "
        "Exit status: 0 fitted, 1 no normal image could be read, 2 it could not start.",
    )
    parser.add_argument(
        "--method", default="vtfusion", help=f"the method to fit: {' or '.join(fitted)} (default %(default)s)"
    )
    parser.add_argument(
        "--normal", nargs="+", required=True, help="normal images or directories (k <= 8 in the papers)"
    )
    parser.add_argument("--out", required=True, help="directory for the fitted model (save_pretrained)")
    parser.add_argument("--clip", help="CLIP Hub id or local CLIPModel directory for a fresh model")
    parser.add_argument("--model", help="a saved model of the method to refit instead")
    parser.add_argument(
        "--class-name",
        help="object word of the text prompts (default: object; One-to-Normal needs one, e.g. bottle)",
    )
    parser.add_argument(
        "--steps",
        type=int,
        help="optimiser updates (default: the method's, VTFusion 1000, One-to-Normal 400)",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the training draws (default %(default)s)"
    )
    parser.add_argument(
        "--kinds", nargs="+", help="VTFusion: synthetic anomaly types to draw from (default: all DAS types)"
    )
    parser.add_argument(
        "--diffusion-model",
        help="One-to-Normal: the Stable Diffusion it personalises, a Hub id or a local diffusers folder "
        "(default: the model's config, stable-diffusion-v1-5/stable-diffusion-v1-5 for a fresh one); kept in "
        "the saved config, so scoring loads it from there",
    )
    add_device(parser)
    add_max_pixels(parser)
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Fit a method that is fitted per category on normal images and save it. Exit status: 0 fitted, 1 no
    normal image could be read, 2 it could not start (arguments, models, output location)."""
    from dataclasses import asdict, fields

    from hf_fsad.hub import save_trained_model
    from hf_fsad.io import atomic_directory, expand_inputs, prepare_output_dir, readable_images
    from hf_fsad.loading import ModelLoadError, load_method
    from hf_fsad.registry import method_spec

    if bool(args.clip) == bool(args.model):
        raise CliError("give either --clip (a fresh model) or --model (a saved one to refit)")
    try:
        spec = method_spec(args.method)
    except ValueError as error:
        raise CliError(f"--method: {error}") from None
    if not spec.model.fits_per_category:
        how = (
            f"train it with training/train_{args.method}.py"
            if spec.recipe
            else "it needs no fitting: give `hf-fsad score` its --reference images"
        )
        raise CliError(f"{args.method} is not fitted per category; {how}")
    if args.kinds and "anomaly_kinds" not in {field.name for field in fields(spec.training_arguments)}:
        raise CliError(f"--kinds: {args.method} is not fitted on synthetic anomalies")
    if args.diffusion_model and not hasattr(spec.config, "diffusion_model"):
        raise CliError(f"--diffusion-model: {args.method} uses no diffusion model")
    try:
        output = prepare_output_dir(Path(args.out).parent, "--out") / Path(args.out).name
    except ValueError as error:
        raise CliError(str(error)) from None
    readable = readable_images(expand_inputs(args.normal, "normal image"), "normal image", args.max_pixels)
    normals = [image for _, image in readable]
    if not normals:
        raise CliError("none of the --normal images could be read", exit_status=1)
    source = f"{args.method}@{args.clip}" if args.clip else args.model
    try:
        model = load_method(source)
    except ModelLoadError as error:
        raise CliError(f"{'--clip' if args.clip else '--model'}: {error}") from None
    if model.config.model_type != args.method:
        raise CliError(f"--model {args.model} is a {model.config.model_type} model, not {args.method}")
    if args.diffusion_model:
        model.config.diffusion_model = args.diffusion_model
    model = model.to(args.device)
    arguments = {"seed": args.seed}
    if args.steps is not None:
        arguments["steps"] = args.steps
    if args.kinds:
        arguments["anomaly_kinds"] = args.kinds
    try:
        result = model.fit(normals, class_name=args.class_name, **arguments)
    except ValueError as error:  # what stops a fit: a diffusion model, a missing class name, image sizes
        raise CliError(str(error)) from None
    losses = [entry["loss"] for entry in result.history]
    text = f"Fitted on {len(normals)} normal images of `{model.config.fitted_class_name}` for {result.steps} steps"
    text += f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}." if losses else "."
    summary = {"arguments": arguments | {"steps": result.steps}, "result": asdict(result)}
    with atomic_directory(output) as folder:
        save_trained_model(model, folder, args.clip or args.model, None, text, summary, "fit_summary.json")
    print(f"fitted {args.method} on {len(normals)} normal images -> {output}", file=sys.stderr)
    return 0
