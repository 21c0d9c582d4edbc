"""`hf-fsad score`: score images against normal references or a saved bank, with pass/fail verdicts when the
bank is calibrated."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hf_fsad.calibration_policy import DEFAULT_FALSE_ALARM_RATE
from hf_fsad.registry import METHODS

from ._bank_inputs import (
    check_defects,
    read_calibration_images,
    read_reference_images,
    saved_bank,
    threshold_rule,
)
from ._engine import add_engine, check_score_engine, score_on_ray
from ._errors import CliError
from ._options import (
    add_allow_untrained,
    add_batch_size,
    add_device,
    add_max_pixels,
    add_precision,
    add_runtime,
    add_tiling,
    finite_float,
    rate,
    review_band,
    tiling_of,
)

if TYPE_CHECKING:
    from PIL import Image

    from hf_fsad.bank import ReferenceBank
    from hf_fsad.batch_scoring import RecordOptions
    from hf_fsad.calibration_policy import CalibratedBank


def register(commands: argparse._SubParsersAction) -> None:
    methods = ", ".join(sorted(METHODS))
    learn_defects = [name for name, spec in sorted(METHODS.items()) if spec.needs_anomalous_references]
    parser = commands.add_parser(
        "score",
        help="score images for anomalies",
        description="Score images against normal references (--reference) or a saved bank (--bank); with a "
        "calibrated bank each image also gets a pass/fail verdict. Exit status: 0 scored, 1 no input could "
        "be scored, 2 the run could not start, 130 interrupted (results so far kept).",
    )
    parser.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    parser.add_argument(
        "--model",
        required=True,
        help="a saved model directory, a Hub id, or METHOD@CLIP: a fresh method on a CLIP checkpoint (Hub id "
        f"or local CLIPModel directory), e.g. winclip@openai/clip-vit-base-patch16; methods: {methods}",
    )
    bank_source = parser.add_mutually_exclusive_group()
    bank_source.add_argument(
        "--reference",
        nargs="+",
        metavar="PATH",
        help="normal reference images or directories to build the bank from (default: none, zero-shot)",
    )
    bank_source.add_argument(
        "--bank",
        help="a reference bank saved with --save-bank, instead of --reference (its class and calibration "
        "come with it)",
    )
    parser.add_argument(
        "--defect",
        nargs="+",
        metavar="PATH",
        help="defective images or directories for the bank of a method that learns from them "
        f"({', '.join(learn_defects)}); not with --bank",
    )
    parser.add_argument(
        "--defect-mask",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --defect image, matched by file stem (000.png or 000_mask.png for "
        "000.png); without masks each defective image goes wholly to the anomalous memory",
    )
    parser.add_argument(
        "--no-weight-search",
        action="store_true",
        help="with --defect: keep the anomalous memory's baseline score weights instead of choosing them on "
        "augmented views of the defects and of the --calibration-normal (else --reference) images, whose "
        "leave-one-out calibration that choice rules out (paper Sec. 4.3; the output says whether it ran)",
    )
    parser.add_argument(
        "--class-name",
        help="object name for the text prompts of a built bank (default: the model's); with --bank only "
        "the bank's own class is accepted",
    )
    parser.add_argument("--save-bank", help="save the reference bank (.safetensors) for later runs (--bank)")
    parser.add_argument(
        "--output",
        required=True,
        help="results file, replaced atomically at the end: JSON lines; with --engine ray Parquet, or JSON "
        "lines when the name ends in .jsonl",
    )
    parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --output and score only the inputs not in it",
    )
    parser.add_argument("--heatmaps", help="directory for heatmap overlays (PNG; default: none)")
    parser.add_argument(
        "--heatmap-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="scores at the ends of the colour scale (default: each map's own min and max)",
    )
    calibration = parser.add_argument_group(
        "calibration",
        "pass/fail decisions: a bank built from 2 or more --reference images is calibrated by scoring each "
        "against the others (leave-one-out); the JSON lines then hold label, normalized_score and threshold",
    )
    calibration.add_argument(
        "--false-alarm-rate",
        type=rate,
        help=f"share of normal images allowed to fail (default {DEFAULT_FALSE_ALARM_RATE}; giving it asks "
        "for a calibration)",
    )
    calibration.add_argument(
        "--confidence",
        type=rate,
        help="probability that the false-alarm rate holds for this calibration, not only on average over "
        "calibrations (e.g. 0.9; needs more normal images, and says how many when there are too few)",
    )
    calibration.add_argument(
        "--calibration-normal",
        nargs="+",
        metavar="PATH",
        help="held-out normal images or directories to calibrate on (also calibrates a --bank)",
    )
    calibration.add_argument(
        "--calibration-anomalous",
        nargs="+",
        metavar="PATH",
        help="defective images: their miss rate at the threshold is reported (with --threshold-rule "
        "best-f1 they set it)",
    )
    calibration.add_argument(
        "--calibration-masks",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --calibration-anomalous image, matched by file stem (000.png or "
        "000_mask.png for 000.png): the pixel threshold with the best F1 (needs --threshold-rule best-f1)",
    )
    calibration.add_argument(
        "--threshold-rule",
        choices=("false-alarm-rate", "best-f1"),
        help="false-alarm-rate (default): the threshold that keeps --false-alarm-rate on normal images, "
        "whatever defects are given; best-f1: the best F1 on the normal and --calibration-anomalous images, "
        "with no false-alarm guarantee (it moves with the share of defects among them)",
    )
    calibration.add_argument(
        "--review-band",
        type=review_band,
        metavar="HALF_WIDTH",
        help="parts whose normalized_score lies within HALF_WIDTH of 0.5 (ends included; e.g. 0.1: 0.4 to "
        "0.6) get the label review instead of normal or anomalous",
    )
    calibration.add_argument(
        "--threshold",
        type=finite_float,
        metavar="SCORE",
        help="a manual threshold on the raw score, instead of the calibrated one, for the verdicts (anomalib's "
        "ManualThreshold): anomalous above it; records say threshold_source manual, and normalized_score is "
        "0.5 at it on the calibration's scale (null without a calibration); the pixel threshold stays "
        "calibrated",
    )
    calibration.add_argument(
        "--no-calibration",
        action="store_true",
        help="no decisions, only scores (a calibrated --bank's calibration is left out)",
    )
    add_batch_size(parser)
    add_device(
        parser,
        help="torch device of a single process, e.g. cuda, cuda:1 or cpu (default %(default)s: CUDA, then MPS, "
        "then the CPU, and the CPU for an exported --runtime; several processes "
        "take one each)",
    )
    add_precision(parser, exported=True)
    add_allow_untrained(parser)
    parser.add_argument(
        "--compile", action="store_true", help="compile the backbone with torch.compile (slow first batch)"
    )
    add_runtime(
        parser,
        help="score with PyTorch (default, the reference) or the model and bank exported to ONNX Runtime or "
        "OpenVINO (CPU, float32; needs the export extra; exported once into ~/.cache/hf_fsad/exports); "
        "branch_scores are then empty",
    )
    add_max_pixels(parser)
    add_tiling(parser)
    add_engine(
        parser,
        "where the images are scored: in this process (or under torchrun / accelerate launch), or on a Ray "
        "cluster (the ray extra; docs/scale.md): read and preprocessed in CPU tasks, scored by a pool of "
        "actors, unreadable inputs written as records with their error",
        "local (default) or ray; ray also reads Parquet inputs (a .parquet file or folder, or "
        "hf://datasets/...: a path, bytes or image column)",
        pool=True,
    )
    parser.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    """Score images; under `accelerate launch` or `torchrun` the processes split the inputs in order, each
    writes its share, and the main process joins the shares into one ordered results file.

    The results file is replaced atomically, at the end or when the run is interrupted (Ctrl-C, SIGTERM;
    single process) with the images scored so far: it is always the previous file or a complete new one.
    Exit status: 0 scored (unreadable inputs are reported and skipped), 1 no input could be scored, 2 the
    run could not start (arguments, model, bank, calibration, output location), 130 interrupted (results so
    far kept). A calibrated bank adds each image's verdict to its record and a count of them at the end.
    """
    from accelerate import PartialState

    from hf_fsad.batch_scoring import verdict_summary
    from hf_fsad.deploy.image_files import sigterm_interrupts
    from hf_fsad.distributed import multi_process_cpu
    from hf_fsad.io import (
        distinct_paths,
        expand_inputs,
        join_results,
        prepare_output_dir,
        prepare_output_file,
        previous_results,
        read_anomalous_images,
        result_shares,
        unique_name,
    )
    from hf_fsad.loading import ModelLoadError, load_method, take_untrained_warning

    _check_options(args)
    try:
        output = prepare_output_file(args.output, "--output")
        heatmap_dir = prepare_output_dir(args.heatmaps, "--heatmaps") if args.heatmaps else None
        if args.save_bank:
            prepare_output_file(args.save_bank, "--save-bank")
        previous = previous_results(output) if args.resume and args.engine == "local" else []
        held_out_normals, anomalous, anomalous_masks = read_calibration_images(args)
        defects, defect_masks = read_anomalous_images(
            "--defect", args.defect, "--defect-mask", args.defect_mask, args.max_pixels
        )
    except ValueError as error:
        raise CliError(str(error)) from None
    references = read_reference_images(args)
    state = PartialState(cpu=multi_process_cpu())
    device = args.device if state.num_processes == 1 else state.device
    try:
        model = load_method(args.model, allow_untrained=args.allow_untrained).to(device).eval()
    except ModelLoadError as error:
        raise CliError(f"--model: {error}") from None
    untrained = take_untrained_warning(model)  # --allow-untrained, or saved before training was recorded
    if untrained is not None and state.is_main_process:
        print(f"warning: {untrained}", file=sys.stderr)
    check_defects(model, args, defects)
    if args.compile:
        model.compile_backbone()
    processor = model.image_processor()
    scorer, made = _calibrated_scorer(
        model,
        saved_bank(model, args),
        references,
        {
            "defects": defects,
            "defect_masks": defect_masks,
            "held_out_normals": held_out_normals,
            "anomalous": anomalous,
            "anomalous_masks": anomalous_masks,
        },
        args,
        state,
    )
    bank = made.bank
    if args.review_band is not None and bank.calibration is None:
        raise CliError(
            f"--review-band lies around a calibrated threshold, and the bank has none: {made.refusal}"
        )
    if state.is_main_process:
        for note in made.notes:
            print(f"note: {note}", file=sys.stderr)
        for warning in made.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        if bank.tiling is not None:
            print(f"tiling: {bank.tiling.describe()}", file=sys.stderr)
        if bank.calibration is not None:
            print(f"calibration: {bank.calibration.describe()}", file=sys.stderr)
        if args.threshold is not None:
            print(
                f"threshold: manual {args.threshold:.6g} (--threshold) decides the verdicts", file=sys.stderr
            )
        elif made.refusal is not None:
            print(
                f"not calibrated: {made.refusal}; --calibration-normal gives held-out normal images",
                file=sys.stderr,
            )
    if args.save_bank and state.is_main_process:
        bank.save(args.save_bank)
    if args.engine == "ray":
        return score_on_ray(model, bank, output, heatmap_dir, args, record_options(args))

    all_paths = distinct_paths(expand_inputs(args.inputs), report=state.is_main_process)
    used_names: set[str] = set()
    heatmap_names = {path: unique_name(path.stem, used_names) for path in all_paths}
    done = {str(record["path"]) for record in previous}
    paths = [path for path in all_paths if str(path) not in done]
    if done and state.is_main_process:
        print(f"resuming: {len(all_paths) - len(paths)} inputs already in {output}", file=sys.stderr)
    shares = result_shares(output, state.num_processes)
    share = shares[state.process_index]
    interrupted = False
    try:
        with sigterm_interrupts():
            try:
                with state.split_between_processes(paths) as own_paths:
                    _score_paths(
                        scorer, processor, bank, own_paths, share, args, heatmap_dir, heatmap_names, state
                    )
            except KeyboardInterrupt:
                if state.num_processes > 1:
                    raise
                interrupted = True
            state.wait_for_everyone()
            if state.is_main_process:
                joined = join_results(output, previous, shares)
            state.wait_for_everyone()  # the shares stay until the main process has read them
    finally:
        share.unlink(missing_ok=True)
    # A process group left to the interpreter's exit can abort a rank in gloo's destructor.
    state.destroy_process_group()
    if not state.is_main_process:
        return 0
    scored = joined.count("\n")
    if interrupted:
        print(
            f"interrupted: {scored} images scored -> {output}; run again with --resume to go on",
            file=sys.stderr,
        )
        return 130
    print(f"scored {scored} of {len(paths)} images -> {output}", file=sys.stderr)
    if bank.calibration is not None or args.threshold is not None:
        print(verdict_summary([*previous, *map(json.loads, joined.splitlines())]), file=sys.stderr)
    return 0 if scored or not paths else 1


def _check_options(args: argparse.Namespace) -> None:
    """Refuse options that do not go together, before anything is read or loaded."""
    if args.bank and args.defect:
        raise CliError("--defect builds a bank from defective images, --bank reuses a built one: give one")
    if args.no_weight_search and not args.defect:
        raise CliError("--no-weight-search goes with --defect: the weight search runs on the defects")
    calibration_options = (
        args.calibration_normal,
        args.calibration_anomalous,
        args.calibration_masks,
        args.false_alarm_rate,
        args.confidence,
        args.threshold_rule,
        args.review_band,
    )
    if args.no_calibration and any(option is not None for option in calibration_options):
        raise CliError("--no-calibration goes with no other calibration option")
    if args.threshold_rule == "best-f1" and not args.calibration_anomalous:
        raise CliError("--threshold-rule best-f1 needs --calibration-anomalous: F1 counts the defects caught")
    if args.review_band is not None and args.threshold is not None:
        raise CliError(
            "--review-band lies around the calibrated threshold: leave out --threshold, or the band"
        )
    if args.calibration_masks and args.calibration_anomalous and args.threshold_rule != "best-f1":
        raise CliError(
            "--calibration-masks set the pixel threshold by best pixel F1: add --threshold-rule best-f1 (by "
            "default the pixel threshold keeps --false-alarm-rate on the normal images' maps)"
        )
    tiling = tiling_of(args)  # a bad tiling is refused before anything is read
    check_score_engine(args, tiling is not None)
    runtime_conflict = _runtime_conflict(args, args.tile_size is not None)
    if runtime_conflict:
        raise CliError(f"--runtime {args.runtime}: {runtime_conflict}")


def _calibrated_scorer(
    model,
    saved: ReferenceBank | None,
    references: list[Image.Image],
    images: dict,
    args: argparse.Namespace,
    state,
) -> tuple[Callable, CalibratedBank]:
    """(scorer, the bank made by `hf_fsad.calibration_policy.calibrated_bank` from the `--bank` or the
    `references`, the defect and calibration `images`, and the calibration options).

    A calibration holds only for scores of the runtime and precision it was fitted at: with held-out
    `--calibration-normal` images on an exported `--runtime`, they are scored by it; a calibration fitted
    elsewhere is refused, naming both."""
    from hf_fsad.calibration_inputs import calibration_mismatch
    from hf_fsad.calibration_policy import BankBuildError, calibrated_bank

    tiled_runtime = saved is not None and saved.tiling is not None and _runtime_conflict(args, tiled=True)
    if tiled_runtime:
        raise CliError(f"--runtime {args.runtime}: {tiled_runtime}")
    asked = bool(images["held_out_normals"] or images["anomalous"])
    asked = asked or args.false_alarm_rate is not None or args.confidence is not None
    exported = []
    quantization_images = references or images["held_out_normals"]
    if args.precision == "int8" and not quantization_images:
        raise CliError(
            "--precision int8 calibrates the int8 export's quantiser on images: give --reference images (or "
            "--calibration-normal ones with a --bank)"
        )

    def runtime_scorer(bank: ReferenceBank):
        exported.append(_scorer(model, bank, args, state, quantization_images))
        return exported[-1]

    try:
        made = calibrated_bank(
            model,
            references,
            class_name=args.class_name,
            bank=saved,
            calibrate=False if args.no_calibration else True if asked else "auto",
            false_alarm_rate=args.false_alarm_rate,
            confidence=args.confidence,
            rule=threshold_rule(args),
            weight_search=not args.no_weight_search,
            precision=args.precision,
            batch_size=args.batch_size,
            runtime=args.runtime,
            runtime_scorer=None if args.runtime == "torch" else runtime_scorer,
            tiling=tiling_of(args),
            **images,
        )
    except BankBuildError as error:
        raise CliError(str(error)) from None
    except ValueError as error:
        raise CliError(f"calibration: {error}") from None
    if exported:  # the same graph, its outputs now judged by the calibration fitted on them
        exported[0].bank = made.bank
        return exported[0], made
    calibration = made.bank.calibration
    mismatch = calibration and calibration_mismatch(calibration, args.runtime, args.precision)
    if mismatch:
        remedy = f"give held-out --calibration-normal images to calibrate at {args.precision}"
        if args.runtime != "torch":
            remedy = (
                f"give held-out --calibration-normal images to calibrate on {args.runtime} (its graph has the "
                "bank built in: leave-one-out would take one export per reference)"
            )
        raise CliError(f"calibration: {mismatch}; {remedy}, or --no-calibration")
    return _scorer(model, made.bank, args, state, quantization_images), made


def record_options(args: argparse.Namespace) -> RecordOptions:
    """How the records of this run decide and draw (`--threshold`, `--review-band`, `--heatmap-range`)."""
    from hf_fsad.batch_scoring import RecordOptions

    return RecordOptions(args.threshold, args.review_band, args.heatmap_range and tuple(args.heatmap_range))


def _runtime_conflict(args: argparse.Namespace, tiled: bool) -> str | None:
    """Why the score options cannot run on `--runtime`, or None: the exported runtimes run on the CPU, in
    float32 or int8 (OpenVINO also in bfloat16), with their own graph compiler, and score whole images
    (`tiled`: tile options or a tiled bank); int8 is for them only."""
    if args.runtime == "torch":
        if args.precision == "int8":
            return "--precision int8 scores an int8 export: choose --runtime onnxruntime or openvino"
        return None
    if tiled:
        return (
            "hf-fsad score runs tiled banks on --runtime torch; a tiled bank runs exported through "
            "hf-fsad export and the runner beside the graph (docs/export.md)"
        )
    if args.device != "cpu":
        return f"the exported graph runs on the CPU; --device {args.device} is for --runtime torch"
    if args.compile:
        return "--compile compiles the PyTorch model; the exported graph is compiled by its runtime"
    if args.precision == "float16" or (args.precision == "bfloat16" and args.runtime == "onnxruntime"):
        return f"--precision {args.precision} is not available (float32 or int8; bfloat16 with openvino)"
    return None


def _scorer(model, bank, args: argparse.Namespace, state, quantization_images=()):
    """pixel values -> calibrated AnomalyDetectionOutput: the model in PyTorch, or its export on `--runtime`
    (exported once, by the main process, into the export cache; at int8 calibrated on `quantization_images`);
    a CliError when it cannot be exported."""
    try:
        return _runtime_scorer(model, bank, args, state, quantization_images)
    except (ValueError, ImportError) as error:
        raise CliError(f"--runtime {args.runtime}: {error}") from None


def _runtime_scorer(model, bank, args: argparse.Namespace, state, quantization_images):
    from hf_fsad.batch_scoring import batch_scorer

    if args.runtime != "torch" and bank.tiling is None:
        from hf_fsad.export import cached_export

        export_precision = "int8" if args.precision == "int8" else "float32"
        if state.is_main_process:  # the other processes wait, then find it in the cache
            folder = cached_export(model, bank, args.runtime, None, export_precision, quantization_images)
            print(f"{args.runtime} {export_precision} export (made on first use): {folder}", file=sys.stderr)
        state.wait_for_everyone()
    return batch_scorer(model, bank, args.runtime, args.precision, args.batch_size, quantization_images)


def _score_paths(
    scorer, processor, bank, paths, share: Path, args, heatmap_dir, heatmap_names, state
) -> None:
    """Score `paths` in batches with `scorer` (`_scorer`: batches of pixel values, or one image at a time with
    a tiled bank) into the JSON-lines file `share` (heatmaps beside, if asked); each line is written whole, so
    an interrupted share holds complete records only."""
    from hf_fsad.batch_scoring import image_record
    from hf_fsad.io import batched, json_line, readable_images
    from hf_fsad.progress import progress_bar

    options = record_options(args)

    with (
        open(share, "w") as sink,
        progress_bar(
            total=len(paths), desc="scoring", unit="img", disable=not state.is_main_process
        ) as progress,
    ):
        readable = readable_images(paths, "input", args.max_pixels, on_skip=lambda: progress.update(1))
        for batch in batched(readable, args.batch_size):
            images = [image for _, image in batch]
            if bank.tiling is None:
                result = scorer(processor(images, return_tensors="pt").pixel_values)
                results = [(result, index) for index in range(len(batch))]
            else:
                results = [(scorer(image), 0) for image in images]
            for (path, image), (result, index) in zip(batch, results):
                target = heatmap_dir / f"{heatmap_names[path]}.heatmap.png" if heatmap_dir else None
                record = image_record(path, image, result, index, bank.calibration, options, target)
                sink.write(json_line(record))
                sink.flush()
            progress.update(len(batch))
