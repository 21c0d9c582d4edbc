"""`hf-fsad` command line: score, fit, benchmark, convert, export, demo, push, push-bank, push-space."""

from __future__ import annotations

import argparse
import contextlib
import json
import signal
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image

from hf_fsad.deploy.run_exported import RUNTIMES
from hf_fsad.io import ImageReadError, expand_inputs, read_image, readable_images

if TYPE_CHECKING:
    import torch

    from hf_fsad.modeling_base import ReferenceBank

DEFAULT_FALSE_ALARM_RATE = 0.05


def _batches(items: Iterator, size: int) -> Iterator[list]:
    batch = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def _unique_name(stem: str, used: set[str]) -> str:
    name, counter = stem, 1
    while name in used:
        counter += 1
        name = f"{stem}-{counter}"
    used.add(name)
    return name


def _distinct(paths: Sequence[Path], report: bool = True, what: str = "input") -> list[Path]:
    """`paths` without repeats of a file (first occurrence kept; each repeat reported if `report`)."""
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


def _previous_results(output: Path) -> list[dict]:
    """The records of a results file written by an earlier run (for --resume); [] when there is none."""
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


@contextlib.contextmanager
def _sigterm_interrupts() -> Iterator[None]:
    """SIGTERM raises KeyboardInterrupt meanwhile, so a terminated run ends like Ctrl-C: results saved."""

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@dataclass
class _CalibrationFiles:
    """The images `score` calibrates with, read before the model loads: held-out normals, anomalous images
    and their masks (one per anomalous image, in the same order, or None)."""

    normal: list[Image.Image]
    anomalous: list[Image.Image]
    masks: list[Image.Image] | None

    @property
    def given(self) -> bool:
        return bool(self.normal or self.anomalous)


def _option_paths(option: str, inputs: Sequence[str]) -> list[Path]:
    what = f"{option} image"
    paths = _distinct(expand_inputs(inputs, what), what=what)
    if not paths:
        raise ValueError(f"{option} holds no image files")
    return paths


def _masks_of(
    images: Sequence[Path], masks: Sequence[Path], image_option: str, mask_option: str
) -> list[Path]:
    """The mask of each anomalous image: the one with the image's file stem, alone or followed by `_mask`
    (MVTec AD's `000_mask.png` for `000.png`). The options are named in the errors."""
    by_stem: dict[str, Path] = {}
    for mask in masks:
        stem = mask.stem.removesuffix("_mask")
        if stem in by_stem:
            raise ValueError(f"{mask_option} {by_stem[stem]} and {mask} both match the image stem {stem!r}")
        by_stem[stem] = mask
    stems: dict[str, Path] = {}
    for image in images:
        if image.stem in stems:
            raise ValueError(
                f"{image_option} {stems[image.stem]} and {image} share the file stem "
                f"{image.stem!r}, so masks cannot be matched to them; rename one"
            )
        stems[image.stem] = image
    unmatched = [str(image) for image in images if image.stem not in by_stem]
    if unmatched:
        raise ValueError(
            f"{mask_option} has no mask for {', '.join(unmatched)} (a mask is matched by file stem: "
            "000.png or 000_mask.png for 000.png)"
        )
    unused = [str(mask) for stem, mask in by_stem.items() if stem not in stems]
    if unused:
        raise ValueError(f"{mask_option} {', '.join(unused)} match no {image_option} image")
    return [by_stem[image.stem] for image in images]


def _read_images(option: str, paths: Sequence[Path], max_pixels: int | None) -> list[Image.Image]:
    """The images of an option; a ValueError names the option and the file that cannot be used. Unlike
    inputs, none is skipped: what they set (a threshold, a bank) would silently rest on other images."""
    images = []
    for path in paths:
        try:
            images.append(read_image(path, max_pixels))
        except ImageReadError as error:
            raise ValueError(f"{option} {path}: {error}") from None
    return images


def _read_anomalous(
    image_option: str,
    image_inputs: Sequence[str] | None,
    mask_option: str,
    mask_inputs: Sequence[str] | None,
    max_pixels: int | None,
) -> tuple[list[Image.Image], list[Image.Image] | None]:
    """The anomalous images an option gives and their masks (matched by file stem, in the images' order),
    or None without masks."""
    if mask_inputs and not image_inputs:
        raise ValueError(f"{mask_option} needs {image_option} (the images they mark)")
    if not image_inputs:
        return [], None
    paths = _option_paths(image_option, image_inputs)
    masks = None
    if mask_inputs:
        mask_paths = _masks_of(paths, _option_paths(mask_option, mask_inputs), image_option, mask_option)
        masks = _read_images(mask_option, mask_paths, max_pixels)
    return _read_images(image_option, paths, max_pixels), masks


def _read_calibration_files(args: argparse.Namespace) -> _CalibrationFiles:
    """Read the calibration options' files; a ValueError names the option and the file that cannot be used."""
    normal = []
    if args.calibration_normal:
        normal_paths = _option_paths("--calibration-normal", args.calibration_normal)
        normal = _read_images("--calibration-normal", normal_paths, args.max_pixels)
    anomalous, masks = _read_anomalous(
        "--calibration-anomalous",
        args.calibration_anomalous,
        "--calibration-masks",
        args.calibration_masks,
        args.max_pixels,
    )
    return _CalibrationFiles(normal, anomalous, masks)


def _mask_tensor(masks: Sequence[Image.Image], size: int) -> torch.Tensor:
    """Masks as a boolean (A, size, size) tensor at the model's input size (non-zero = defect)."""
    import numpy as np
    import torch

    from hf_fsad.visualization import mask_array

    return torch.from_numpy(np.stack([mask_array(mask, size) for mask in masks]))


def _calibrate(
    model, processor, bank, references, bank_inputs: dict, files: _CalibrationFiles, args: argparse.Namespace
) -> tuple[ReferenceBank, str | None, list[str]]:
    """(bank, why it is not calibrated or None, the warnings calibrating raised): the bank calibrated as the
    options ask. A built bank is calibrated by leave-one-out by default (each reference scored against a bank
    of the others and the `bank_inputs` it was built with); a `--bank` is used as saved unless calibration
    options are given."""
    import warnings

    import torch

    from hf_fsad.pipeline import calibrate_reference_bank

    asked = files.given or args.false_alarm_rate is not None
    if args.bank and not asked and not args.no_calibration:
        return bank, None if bank.calibration else "the --bank was saved without a calibration", []

    def pixels(images: list) -> torch.Tensor | None:
        return processor(images, return_tensors="pt").pixel_values if images else None

    masks = None if files.masks is None else _mask_tensor(files.masks, model.config.image_size)
    # Calibration scores are computed as the queries' are: same precision, same batch size.
    with torch.no_grad(), model.autocast(args.precision), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        bank, refusal = calibrate_reference_bank(
            model,
            bank,
            False if args.no_calibration else True if asked else "auto",
            reference_pixel_values=references,
            normal_pixel_values=pixels(files.normal),
            anomalous_pixel_values=pixels(files.anomalous),
            anomalous_masks=masks,
            false_alarm_rate=args.false_alarm_rate or DEFAULT_FALSE_ALARM_RATE,
            batch_size=args.batch_size,
            bank_inputs=bank_inputs,
        )
    return bank, refusal, [str(warning.message) for warning in caught]


def score(args: argparse.Namespace) -> int:
    """Score images; under `accelerate launch` or `torchrun` the processes split the inputs in order, each
    writes its share, and the main process joins the shares into one ordered results file.

    The results file is replaced atomically, at the end or when the run is interrupted (Ctrl-C, SIGTERM;
    single process) with the images scored so far: it is always the previous file or a complete new one.
    Exit status: 0 scored (unreadable inputs are reported and skipped), 1 no input could be scored, 2 the
    run could not start (arguments, model, bank, calibration, output location), 130 interrupted (results so
    far kept). A calibrated bank adds each image's verdict to its record and a count of them at the end.
    """
    import torch
    from accelerate import PartialState

    from hf_fsad.distributed import multi_process_cpu
    from hf_fsad.io import atomic_write_text, prepare_output_dir, prepare_output_file
    from hf_fsad.loading import ModelLoadError, load_method
    from hf_fsad.modeling_base import ReferenceBank

    if args.bank and args.defect:
        print(
            "error: --defect builds a bank from defective images, --bank reuses a built one: give one",
            file=sys.stderr,
        )
        return 2
    calibration_options = (
        args.calibration_normal,
        args.calibration_anomalous,
        args.calibration_masks,
        args.false_alarm_rate,
    )
    if args.no_calibration and any(option is not None for option in calibration_options):
        print("error: --no-calibration goes with no other calibration option", file=sys.stderr)
        return 2
    runtime_conflict = _runtime_conflict(args)
    if runtime_conflict:
        print(f"error: --runtime {args.runtime}: {runtime_conflict}", file=sys.stderr)
        return 2
    try:
        output = prepare_output_file(args.output, "--output")
        heatmap_dir = prepare_output_dir(args.heatmaps, "--heatmaps") if args.heatmaps else None
        if args.save_bank:
            prepare_output_file(args.save_bank, "--save-bank")
        previous = _previous_results(output) if args.resume else []
        calibration_files = _read_calibration_files(args)
        defects, defect_masks = _read_anomalous(
            "--defect", args.defect, "--defect-mask", args.defect_mask, args.max_pixels
        )
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    state = PartialState(cpu=multi_process_cpu())
    device = args.device if state.num_processes == 1 else state.device
    try:
        model = load_method(args.model).to(device).eval()
    except ModelLoadError as error:
        print(f"error: --model: {error}", file=sys.stderr)
        return 2
    method = model.config.model_type
    if defects and not model.needs_anomalous_references:
        print(
            f"error: --defect: {method} builds its bank from normal references only (defective images can "
            "calibrate its threshold: --calibration-anomalous)",
            file=sys.stderr,
        )
        return 2
    if model.needs_anomalous_references and not defects and not args.bank:
        print(
            f"error: {method} builds its bank from defective images too: give --defect IMAGE (and "
            "--defect-mask MASK), or a --bank",
            file=sys.stderr,
        )
        return 2
    if args.compile:
        model.compile_backbone()
    processor = model.image_processor()

    references, bank_inputs = None, {}
    if args.bank:
        try:
            bank = model.check_bank(ReferenceBank.load(args.bank))
        except ValueError as error:
            print(f"error: --bank {args.bank}: {error}", file=sys.stderr)
            return 2
        if args.class_name is not None and args.class_name != bank.class_name:
            print(
                f"error: --class-name {args.class_name}: the --bank holds class {bank.class_name!r}, fixed "
                "when it was built (build a bank of another class from --reference)",
                file=sys.stderr,
            )
            return 2
    else:
        if defects:
            bank_inputs["anomalous_pixel_values"] = processor(defects, return_tensors="pt").pixel_values
            if defect_masks is not None:
                bank_inputs["anomalous_masks"] = _mask_tensor(defect_masks, model.config.image_size)
        if args.reference:
            readable = readable_images(
                expand_inputs(args.reference, "reference"), "reference", args.max_pixels
            )
            images = [image for _, image in readable]
            if not images:
                print("error: none of the --reference images could be read", file=sys.stderr)
                return 1
            references = processor(images, return_tensors="pt").pixel_values
        try:
            with torch.no_grad():
                bank = model.build_reference_bank(references, class_name=args.class_name, **bank_inputs)
        except ValueError as error:
            print(f"error: the reference bank cannot be built: {error}", file=sys.stderr)
            return 2
    try:
        bank, refusal, notes = _calibrate(
            model, processor, bank, references, bank_inputs, calibration_files, args
        )
    except ValueError as error:
        print(f"error: calibration: {error}", file=sys.stderr)
        return 2
    if state.is_main_process:
        for note in notes:
            print(f"warning: {note}", file=sys.stderr)
        if bank.calibration is not None:
            print(f"calibration: {bank.calibration.describe()}", file=sys.stderr)
        elif refusal is not None:
            print(
                f"not calibrated: {refusal}; --calibration-normal gives held-out normal images",
                file=sys.stderr,
            )
    if args.save_bank and state.is_main_process:
        bank.save(args.save_bank)
    try:
        scorer = _scorer(model, bank, args, state)
    except (ValueError, ImportError) as error:
        print(f"error: --runtime {args.runtime}: {error}", file=sys.stderr)
        return 2

    all_paths = _distinct(expand_inputs(args.inputs), report=state.is_main_process)
    used_names: set[str] = set()
    heatmap_names = {path: _unique_name(path.stem, used_names) for path in all_paths}
    done = {str(record["path"]) for record in previous}
    paths = [path for path in all_paths if str(path) not in done]
    if done and state.is_main_process:
        print(f"resuming: {len(all_paths) - len(paths)} inputs already in {output}", file=sys.stderr)
    shares = [output.with_name(f"{output.name}.part{rank}.tmp") for rank in range(state.num_processes)]
    share = shares[state.process_index]
    interrupted = False
    try:
        with _sigterm_interrupts():
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
                joined = "".join(part.read_text() for part in shares)
                atomic_write_text(output, "".join(json.dumps(record) + "\n" for record in previous) + joined)
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
    if bank.calibration is not None:
        print(_verdict_summary([*previous, *map(json.loads, joined.splitlines())]), file=sys.stderr)
    return 0 if scored or not paths else 1


def _verdict_summary(records: Sequence[dict]) -> str:
    """One line counting the calibrated verdicts in `records`, e.g. `5 images: 2 fail (anomalous), 3 pass`."""
    labels = [record["label"] for record in records if "label" in record]
    failed = labels.count("anomalous")
    summary = f"{len(labels)} images: {failed} fail (anomalous), {len(labels) - failed} pass"
    unlabelled = len(records) - len(labels)
    return summary + (f"; {unlabelled} earlier results without a verdict" if unlabelled else "")


def _runtime_conflict(args: argparse.Namespace) -> str | None:
    """Why the score options cannot run on `--runtime`, or None: the exported runtimes run on the CPU, in
    float32 (OpenVINO also in bfloat16), with their own graph compiler."""
    if args.runtime == "torch":
        return None
    if args.device != "cpu":
        return f"the exported graph runs on the CPU; --device {args.device} is for --runtime torch"
    if args.compile:
        return "--compile compiles the PyTorch model; the exported graph is compiled by its runtime"
    if args.precision == "float16" or (args.precision == "bfloat16" and args.runtime == "onnxruntime"):
        return f"--precision {args.precision} is not available (float32; bfloat16 with openvino)"
    return None


def _scorer(model, bank, args: argparse.Namespace, state):
    """pixel values -> calibrated AnomalyDetectionOutput: the model in PyTorch, or its export on `--runtime`
    (exported once, by the main process, into the export cache)."""
    import torch

    if args.runtime == "torch":

        def score_batch(pixel_values: torch.Tensor):
            with torch.no_grad(), model.autocast(args.precision):
                return model(pixel_values, reference_bank=bank)

        return score_batch
    from hf_fsad.export import ExportedScorer, cached_export

    if state.is_main_process:  # the other processes wait, then find it in the cache
        folder = cached_export(model, bank, args.runtime)
        print(f"{args.runtime} export (made on first use): {folder}", file=sys.stderr)
    state.wait_for_everyone()
    return ExportedScorer(model, bank, args.runtime, "bf16" if args.precision == "bfloat16" else "f32")


def _score_paths(
    scorer, processor, bank, paths, share: Path, args, heatmap_dir, heatmap_names, state
) -> None:
    """Score `paths` in batches with `scorer` (`_scorer`) into the JSON-lines file `share` (heatmaps beside, if
    asked); each line is written whole, so an interrupted share holds complete records only."""
    import torch
    from tqdm.auto import tqdm

    from hf_fsad.io import save_image_atomically
    from hf_fsad.pipeline import decision, resized_map
    from hf_fsad.visualization import heatmap_overlay, outline_region

    with (
        open(share, "w") as sink,
        tqdm(total=len(paths), desc="scoring", unit="img", disable=not state.is_main_process) as progress,
    ):
        readable = readable_images(paths, "input", args.max_pixels, on_skip=lambda: progress.update(1))
        for batch in _batches(readable, args.batch_size):
            pixel_values = processor([image for _, image in batch], return_tensors="pt").pixel_values
            result = scorer(pixel_values)
            for index, (path, image) in enumerate(batch):
                record = {
                    "path": str(path),
                    "score": float(result.image_scores[index]),
                    "branch_scores": {k: float(v[index]) for k, v in (result.branch_scores or {}).items()},
                    "heatmap": None,
                }
                if bank.calibration is not None:
                    record |= decision(result, index, bank.calibration)
                if heatmap_dir and result.anomaly_maps is not None:
                    target = heatmap_dir / f"{heatmap_names[path]}.heatmap.png"
                    anomaly_map = result.anomaly_maps[index]
                    overlay = heatmap_overlay(image, anomaly_map.float().cpu().numpy(), args.heatmap_range)
                    calibration = bank.calibration
                    if calibration is not None and calibration.pixel_threshold is not None:
                        # the pipeline's mask: the map at the image's size above the pixel threshold
                        at_image_size = torch.from_numpy(resized_map(anomaly_map, image.size))
                        overlay = outline_region(overlay, calibration.masks(at_image_size).numpy())
                    save_image_atomically(overlay, target)
                    record["heatmap"] = str(target)
                sink.write(json.dumps(record) + "\n")
                sink.flush()
            progress.update(len(batch))


def fit(args: argparse.Namespace) -> int:
    """Fit a method that is fitted per category on normal images and save it. Exit status: 0 fitted, 1 no
    normal image could be read, 2 it could not start (arguments, models, output location)."""
    from dataclasses import asdict, fields

    import hf_fsad  # noqa: F401  (registers the methods)
    from hf_fsad.hub import save_trained_model
    from hf_fsad.io import atomic_directory, prepare_output_dir
    from hf_fsad.loading import ModelLoadError, load_method
    from hf_fsad.registry import method_spec

    if bool(args.clip) == bool(args.model):
        print("error: give either --clip (a fresh model) or --model (a saved one to refit)", file=sys.stderr)
        return 2
    try:
        spec = method_spec(args.method)
    except ValueError as error:
        print(f"error: --method: {error}", file=sys.stderr)
        return 2
    if not spec.model.fits_per_category:
        how = (
            f"train it with training/train_{args.method}.py"
            if spec.recipe
            else "it needs no fitting: give `hf-fsad score` its --reference images"
        )
        print(f"error: {args.method} is not fitted per category; {how}", file=sys.stderr)
        return 2
    if args.kinds and "anomaly_kinds" not in {field.name for field in fields(spec.training_arguments)}:
        print(f"error: --kinds: {args.method} is not fitted on synthetic anomalies", file=sys.stderr)
        return 2
    if args.diffusion_model and not hasattr(spec.config, "diffusion_model"):
        print(f"error: --diffusion-model: {args.method} uses no diffusion model", file=sys.stderr)
        return 2
    try:
        output = prepare_output_dir(Path(args.out).parent, "--out") / Path(args.out).name
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    readable = readable_images(expand_inputs(args.normal, "normal image"), "normal image", args.max_pixels)
    normals = [image for _, image in readable]
    if not normals:
        print("error: none of the --normal images could be read", file=sys.stderr)
        return 1
    source = f"{args.method}@{args.clip}" if args.clip else args.model
    try:
        model = load_method(source)
    except ModelLoadError as error:
        print(f"error: {'--clip' if args.clip else '--model'}: {error}", file=sys.stderr)
        return 2
    if model.config.model_type != args.method:
        print(
            f"error: --model {args.model} is a {model.config.model_type} model, not {args.method}",
            file=sys.stderr,
        )
        return 2
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
        print(f"error: {error}", file=sys.stderr)
        return 2
    losses = [entry["loss"] for entry in result.history]
    text = f"Fitted on {len(normals)} normal images of `{model.config.fitted_class_name}` for {result.steps} steps"
    text += f"; loss {losses[0]:.4f} -> {losses[-1]:.4f}." if losses else "."
    summary = {"arguments": arguments | {"steps": result.steps}, "result": asdict(result)}
    with atomic_directory(output) as folder:
        save_trained_model(model, folder, args.clip or args.model, None, text, summary, "fit_summary.json")
    print(f"fitted {args.method} on {len(normals)} normal images -> {output}", file=sys.stderr)
    return 0


def _push(args: argparse.Namespace, stage, repo_type: str = "model") -> int:
    """Stage the upload folder (in --dry-run or a temporary folder), then upload it unless --dry-run."""
    import tempfile

    from hf_fsad.hub import upload

    with tempfile.TemporaryDirectory() as temporary:
        try:
            folder = stage(Path(args.dry_run) if args.dry_run else Path(temporary) / "upload")
        except ValueError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        if args.dry_run:
            print(f"staged {len(files)} files for {args.repo_id} in {folder} (not uploaded)", file=sys.stderr)
            return 0
        try:
            url = upload(folder, args.repo_id, repo_type=repo_type, private=args.private)
        except Exception as error:  # noqa: BLE001  (the transport library's errors vary; report any, never the token)
            print(
                f"error: upload to {args.repo_id} failed ({type(error).__name__}): {error}", file=sys.stderr
            )
            return 1
    print(f"pushed {len(files)} files to {args.repo_id}: {url}", file=sys.stderr)
    return 0


def push(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_model

    return _push(
        args, lambda folder: stage_model(args.model_dir, folder, args.repo_id, args.results, args.method)
    )


def push_bank(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_bank

    return _push(args, lambda folder: stage_bank(args.bank, folder))


def push_space(args: argparse.Namespace) -> int:
    from hf_fsad.hub import stage_space

    return _push(args, stage_space, repo_type="space")


def convert(args: argparse.Namespace) -> int:
    afclip_only = {"--clip": args.clip, "--image-size": args.image_size, "--trained-on": args.trained_on}
    given = [option for option, value in afclip_only.items() if value is not None]
    if args.afclip_official:
        if args.pretrained is not None:
            print("error: --pretrained goes with --open-clip, not --afclip-official", file=sys.stderr)
            return 2
        from hf_fsad.models.afclip.convert_afclip import convert_official_afclip

        prompt, adaptor = args.afclip_official
        output = convert_official_afclip(
            prompt,
            adaptor,
            args.clip or "openai/clip-vit-large-patch14-336",
            args.output_dir,
            args.image_size or 518,
            args.trained_on,
        )
        print(f"saved AfClipModel with the official prompt and adaptor to {output}")
        return 0
    if given:
        print(f"error: {', '.join(given)} go with --afclip-official, not --open-clip", file=sys.stderr)
        return 2
    from hf_fsad.backbones.convert import convert_open_clip

    output = convert_open_clip(args.open_clip, args.pretrained, args.output_dir)
    print(f"saved CLIPModel, tokenizer and image processor to {output}")
    return 0


def export(args: argparse.Namespace) -> int:
    """Export a model and its bank to ONNX or OpenVINO (`hf_fsad.export`); exit 2 when the model, the bank or
    the output folder cannot be used, or the method does not export."""
    from hf_fsad.export import export_model
    from hf_fsad.io import prepare_output_dir
    from hf_fsad.loading import ModelLoadError, load_method
    from hf_fsad.modeling_base import ReferenceBank

    try:
        output = prepare_output_dir(Path(args.out).resolve().parent, "--out") / Path(args.out).name
        model = load_method(args.model)
        bank = ReferenceBank.load(args.bank) if args.bank else None
        export_model(model, bank, output, args.format)
    except (ModelLoadError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"exported {model.config.model_type} ({args.format}) -> {output}", file=sys.stderr)
    return 0


def benchmark(args: argparse.Namespace) -> int:
    from hf_fsad.data import load_benchmark
    from hf_fsad.evaluation import DatasetSpec, Protocol, profile_models, run_benchmark
    from hf_fsad.features import FeatureCache
    from hf_fsad.io import prepare_output_dir
    from hf_fsad.loading import ModelLoadError, load_method

    try:
        out = prepare_output_dir(args.out, "--out")
        datasets = [DatasetSpec.parse(text) for text in args.datasets]
        protocol = Protocol(tuple(args.anomalous), args.validation, args.max_test, args.false_alarm_rate)
    except ValueError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    models = {}
    for entry in args.methods:
        label, equals, source = entry.rpartition("=")
        source = source if equals else entry
        try:
            model = load_method(source)
        except ModelLoadError as error:
            print(f"error: --methods {entry}: {error}", file=sys.stderr)
            return 2
        models[label or Path(source.split("@")[-1]).name or source] = model.to(args.device).eval()
    if args.profile:
        spec = datasets[0]
        data = load_benchmark(spec.name, spec.root, spec.categories[0] if spec.categories else None)
        count = min(data["test"].num_rows, max(args.profile_batch_sizes) + 2)
        images = data["test"].select(range(count))["image"]
        profile_models(
            models,
            images,
            out / "profile",
            ks=args.profile_k,
            batch_sizes=args.profile_batch_sizes,
            repeats=args.profile_repeats,
            fit_steps=args.fit_steps,
        )
        print(f"profile: {out / 'profile' / 'profile.md'}")
        return 0
    if args.runtime != "torch":
        from hf_fsad.export import check_exportable

        try:
            if args.device != "cpu":
                raise ValueError(f"the exported graphs run on the CPU; --device {args.device} is for torch")
            for model in models.values():
                check_exportable(model)
        except ValueError as error:
            print(f"error: --runtime {args.runtime}: {error}", file=sys.stderr)
            return 2
    cache = FeatureCache(args.feature_cache or out / "feature_cache")
    results = run_benchmark(
        models,
        datasets,
        args.k,
        args.seeds,
        out,
        args.batch_size,
        cache,
        args.title,
        protocol=protocol,
        runtime=args.runtime,
    )
    print(
        f"{len(results['cells'])} cells ({results['skipped_cells']} already done), feature-cache hit rate "
        f"{100 * results['feature_cache']['hit_rate']:.1f} %, {results['wall_seconds']:.0f} s -> {out / 'results.md'}"
    )
    return 0


def demo(args: argparse.Namespace) -> int:
    from hf_fsad.demo import run_demo

    report = run_demo(Path(args.out), backbone=args.backbone, k=args.k)
    print(f"report: {report}")
    return 0


def _pixel_limit(text: str) -> int | None:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (no limit) or a positive pixel count, got {value}")
    return value or None


def _rate(text: str) -> float:
    value = float(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie between 0 and 1 (e.g. 0.05 for 5 %), got {value}")
    return value


def _add_max_pixels(parser: argparse.ArgumentParser) -> None:
    from hf_fsad.io import DEFAULT_MAX_PIXELS

    parser.add_argument(
        "--max-pixels",
        type=_pixel_limit,
        default=DEFAULT_MAX_PIXELS,
        help=f"skip images with more pixels than this (default {DEFAULT_MAX_PIXELS}: 8192 x 8192; 0: no limit)",
    )


def build_parser() -> argparse.ArgumentParser:
    from hf_fsad.registry import METHODS

    methods = ", ".join(sorted(METHODS))
    fitted = [name for name, spec in sorted(METHODS.items()) if spec.model.fits_per_category]
    learn_defects = [name for name, spec in sorted(METHODS.items()) if spec.model.needs_anomalous_references]
    parser = argparse.ArgumentParser(
        prog="hf-fsad", description="Few-shot image anomaly detection with CLIP."
    )
    commands = parser.add_subparsers(dest="command", required=True)

    score_parser = commands.add_parser(
        "score",
        help="score images for anomalies",
        description="Score images against normal references (--reference) or a saved bank (--bank); with a "
        "calibrated bank each image also gets a pass/fail verdict. Exit status: 0 scored, 1 no input could "
        "be scored, 2 the run could not start, 130 interrupted (results so far kept).",
    )
    score_parser.add_argument("inputs", nargs="+", help="image files or directories (searched recursively)")
    score_parser.add_argument(
        "--model",
        required=True,
        help="a saved model directory, a Hub id, or METHOD@CLIP: a fresh method on a CLIP checkpoint (Hub id "
        f"or local CLIPModel directory), e.g. winclip@openai/clip-vit-base-patch16; methods: {methods}",
    )
    bank_source = score_parser.add_mutually_exclusive_group()
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
    score_parser.add_argument(
        "--defect",
        nargs="+",
        metavar="PATH",
        help="defective images or directories for the bank of a method that learns from them "
        f"({', '.join(learn_defects)}); not with --bank",
    )
    score_parser.add_argument(
        "--defect-mask",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --defect image, matched by file stem (000.png or 000_mask.png for "
        "000.png); without masks each defective image goes wholly to the anomalous memory",
    )
    score_parser.add_argument(
        "--class-name",
        help="object name for the text prompts of a built bank (default: the model's); with --bank only "
        "the bank's own class is accepted",
    )
    score_parser.add_argument(
        "--save-bank", help="save the reference bank (.safetensors) for later runs (--bank)"
    )
    score_parser.add_argument(
        "--output", required=True, help="results file (JSON lines), replaced atomically at the end"
    )
    score_parser.add_argument(
        "--resume",
        action="store_true",
        help="keep the results already in --output and score only the inputs not in it",
    )
    score_parser.add_argument("--heatmaps", help="directory for heatmap overlays (PNG; default: none)")
    score_parser.add_argument(
        "--heatmap-range",
        nargs=2,
        type=float,
        metavar=("LOW", "HIGH"),
        help="scores at the ends of the colour scale (default: each map's own min and max)",
    )
    calibration = score_parser.add_argument_group(
        "calibration",
        "pass/fail decisions: a bank built from 2 or more --reference images is calibrated by scoring each "
        "against the others (leave-one-out); the JSON lines then hold label, normalized_score and threshold",
    )
    calibration.add_argument(
        "--false-alarm-rate",
        type=_rate,
        help=f"share of normal images allowed to fail (default {DEFAULT_FALSE_ALARM_RATE}; giving it asks "
        "for a calibration)",
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
        help="defective images: the threshold with the best F1 instead of the false-alarm rate",
    )
    calibration.add_argument(
        "--calibration-masks",
        nargs="+",
        metavar="PATH",
        help="a defect mask per --calibration-anomalous image, matched by file stem (000.png or "
        "000_mask.png for 000.png): the pixel threshold with the best F1",
    )
    calibration.add_argument(
        "--no-calibration",
        action="store_true",
        help="no decisions, only scores (a calibrated --bank's calibration is left out)",
    )
    score_parser.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)"
    )
    score_parser.add_argument(
        "--device",
        default="cpu",
        help="torch device of a single process, e.g. cuda or cuda:1 (default %(default)s; several processes "
        "take one each)",
    )
    score_parser.add_argument(
        "--precision",
        choices=["float32", "bfloat16", "float16"],
        default="float32",
        help="compute in half precision under torch.autocast (GPU; see docs/performance.md; default "
        "%(default)s)",
    )
    score_parser.add_argument(
        "--compile", action="store_true", help="compile the backbone with torch.compile (slow first batch)"
    )
    score_parser.add_argument(
        "--runtime",
        choices=["torch", *RUNTIMES],
        default="torch",
        help="score with PyTorch (default, the reference) or the model and bank exported to ONNX Runtime or "
        "OpenVINO (CPU, float32; needs the export extra; exported once into ~/.cache/hf_fsad/exports); "
        "branch_scores are then empty",
    )
    _add_max_pixels(score_parser)
    score_parser.set_defaults(handler=score)

    fit_parser = commands.add_parser(
        "fit",
        help=f"fit a method fitted per category ({', '.join(fitted)}) on normal images",
        description=f"Fit a method that is fitted per category ({', '.join(fitted)}) on one part's normal "
        "images and save it (save_pretrained); `hf-fsad score --model OUT` then scores without references. "
        "Exit status: 0 fitted, 1 no normal image could be read, 2 it could not start.",
    )
    fit_parser.add_argument(
        "--method", default="vtfusion", help=f"the method to fit: {' or '.join(fitted)} (default %(default)s)"
    )
    fit_parser.add_argument(
        "--normal", nargs="+", required=True, help="normal images or directories (k <= 8 in the papers)"
    )
    fit_parser.add_argument("--out", required=True, help="directory for the fitted model (save_pretrained)")
    fit_parser.add_argument("--clip", help="CLIP Hub id or local CLIPModel directory for a fresh model")
    fit_parser.add_argument("--model", help="a saved model of the method to refit instead")
    fit_parser.add_argument(
        "--class-name",
        help="object word of the text prompts (default: object; One-to-Normal needs one, e.g. bottle)",
    )
    fit_parser.add_argument(
        "--steps",
        type=int,
        help="optimiser updates (default: the method's, VTFusion 1000, One-to-Normal 400)",
    )
    fit_parser.add_argument(
        "--seed", type=int, default=0, help="seed of the training draws (default %(default)s)"
    )
    fit_parser.add_argument(
        "--kinds", nargs="+", help="VTFusion: synthetic anomaly types to draw from (default: all DAS types)"
    )
    fit_parser.add_argument(
        "--diffusion-model",
        help="One-to-Normal: the Stable Diffusion it personalises, a Hub id or a local diffusers folder "
        "(default: the model's config, runwayml/stable-diffusion-v1-5 for a fresh one); kept in the saved "
        "config, so scoring loads it from there",
    )
    fit_parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    _add_max_pixels(fit_parser)
    fit_parser.set_defaults(handler=fit)

    convert_parser = commands.add_parser(
        "convert", help="convert an open_clip checkpoint, or the official AF-CLIP weights, to transformers"
    )
    source = convert_parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--open-clip", help="open_clip model name, e.g. ViT-B-16-plus-240")
    source.add_argument(
        "--afclip-official",
        nargs=2,
        metavar=("PROMPT", "ADAPTOR"),
        help="the AF-CLIP authors' <dataset>_prompt.pt and <dataset>_adaptor.pt: writes an AfClipModel",
    )
    convert_parser.add_argument(
        "--pretrained", help="with --open-clip: open_clip pretrained tag, e.g. laion400m_e31"
    )
    convert_parser.add_argument(
        "--clip",
        help="with --afclip-official: the CLIP the weights were trained on "
        "(default: openai/clip-vit-large-patch14-336)",
    )
    convert_parser.add_argument(
        "--image-size", type=int, help="with --afclip-official: model input size (default 518, the paper's)"
    )
    convert_parser.add_argument(
        "--trained-on", help="with --afclip-official: the weights' auxiliary dataset, e.g. mvtec_ad or visa"
    )
    convert_parser.add_argument("output_dir", help="directory to write the converted model to")
    convert_parser.set_defaults(handler=convert)

    export_parser = commands.add_parser(
        "export", help="export a model and its bank to ONNX or OpenVINO, with a torch-free runner"
    )
    export_parser.add_argument("--model", required=True, help="saved model dir, Hub id, or METHOD@CLIP")
    export_parser.add_argument(
        "--bank", help="reference bank (.safetensors); default: the method's own (zero-shot) bank"
    )
    export_parser.add_argument(
        "--format", choices=["onnx", "openvino"], default="onnx", help="runtime format (default %(default)s)"
    )
    export_parser.add_argument("--out", required=True, help="folder to write (replaced if it exists)")
    export_parser.set_defaults(handler=export)

    bench_parser = commands.add_parser("benchmark", help="evaluate methods on benchmarks (papers' protocol)")
    bench_parser.add_argument(
        "--methods",
        nargs="+",
        required=True,
        help="[LABEL=]PATH_OR_HUB_ID of a saved model, or [LABEL=]METHOD@CLIP for a fresh method on a CLIP",
    )
    bench_parser.add_argument(
        "--datasets", nargs="+", required=True, help="NAME[:ROOT[:CATEGORY]], e.g. elpv mvtec_ad:/data/mvtec"
    )
    bench_parser.add_argument(
        "--k", nargs="+", type=int, default=[2, 4, 8], help="shots (0 = zero-shot; default 2 4 8)"
    )
    bench_parser.add_argument(
        "--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds of the reference draws (default 0 1 2)"
    )
    bench_parser.add_argument(
        "--anomalous",
        nargs="+",
        type=int,
        default=[0],
        help="anomalous references drawn from the test split, for methods that use them (e.g. 1; default 0)",
    )
    bench_parser.add_argument(
        "--validation",
        type=int,
        default=0,
        help="normal train images kept for weight validation (default %(default)s)",
    )
    bench_parser.add_argument(
        "--max-test", type=int, help="score at most this many test images per category (seeded; default: all)"
    )
    bench_parser.add_argument(
        "--false-alarm-rate",
        type=float,
        default=0.05,
        help="false-alarm rate of each cell's calibrated threshold (F1 and false alarms at it are reported; "
        "default %(default)s)",
    )
    bench_parser.add_argument(
        "--out", required=True, help="output directory (results.json, results.md, plots/)"
    )
    bench_parser.add_argument("--feature-cache", help="feature cache directory (default: OUT/feature_cache)")
    bench_parser.add_argument("--title", help="heading of the results table (say in it if the weights are random)")
    bench_parser.add_argument(
        "--batch-size", type=int, default=8, help="images per forward pass (default %(default)s)"
    )
    bench_parser.add_argument("--device", default="cpu", help="torch device, e.g. cuda (default %(default)s)")
    bench_parser.add_argument(
        "--profile", action="store_true", help="measure latency, memory and k-scaling instead"
    )
    bench_parser.add_argument(
        "--runtime",
        choices=["torch", *RUNTIMES],
        default="torch",
        help="score the test images with PyTorch (default) or each cell's model and bank exported to ONNX "
        "Runtime or OpenVINO (CPU; one export per cell; references and calibration stay in PyTorch)",
    )
    bench_parser.add_argument(
        "--profile-k",
        nargs="+",
        type=int,
        default=[2, 8, 32, 128, 256],
        help="with --profile: bank sizes of the k-scaling (default 2 8 32 128 256)",
    )
    bench_parser.add_argument(
        "--profile-batch-sizes",
        nargs="+",
        type=int,
        default=[1, 16],
        help="with --profile: batch sizes timed (default 1 16)",
    )
    bench_parser.add_argument(
        "--profile-repeats",
        type=int,
        default=3,
        help="with --profile: timed calls per figure (median; default %(default)s)",
    )
    bench_parser.add_argument(
        "--fit-steps",
        type=int,
        default=2,
        help="with --profile: updates of the timed fit of per-category methods (default %(default)s)",
    )
    bench_parser.set_defaults(handler=benchmark)

    push_parser = commands.add_parser("push", help="upload a saved model with a model card to the Hub")
    push_parser.add_argument("model_dir", help="a directory written by save_pretrained")
    push_parser.add_argument("repo_id", help="Hub model repo, e.g. user/winclip-bottle")
    push_parser.add_argument(
        "--results", help="benchmark results.json whose cells go into the card's model-index"
    )
    push_parser.add_argument("--method", help="the method label of those cells (default: the model type)")
    bank_parser = commands.add_parser("push-bank", help="upload a reference bank (.safetensors) to the Hub")
    bank_parser.add_argument("bank", help="a bank saved with --save-bank or ReferenceBank.save")
    bank_parser.add_argument("repo_id", help="Hub model repo, e.g. user/bottle-bank")
    space_parser = commands.add_parser(
        "push-space", help="upload the Gradio Space (spaces/) with the package"
    )
    space_parser.add_argument("repo_id", help="Hub Space repo, e.g. user/hf-fsad-demo")
    space_parser.set_defaults(handler=push_space)
    for parser_ in (push_parser, bank_parser, space_parser):
        parser_.add_argument(
            "--private",
            action="store_true",
            help="create the repo as private (default: public; an existing repo keeps its visibility)",
        )
        parser_.add_argument(
            "--dry-run",
            metavar="DIR",
            help="only build the upload folder in DIR, upload nothing (no token needed)",
        )
    push_parser.set_defaults(handler=push)
    bank_parser.set_defaults(handler=push_bank)

    demo_parser = commands.add_parser("demo", help="score a generated toy dataset and write a report")
    demo_parser.add_argument(
        "--out", default="demo_output", help="directory for report.md and heatmaps (default %(default)s)"
    )
    demo_parser.add_argument(
        "--backbone",
        default="openai/clip-vit-base-patch16",
        help="CLIP Hub id or local directory (default %(default)s; offline and not cached: a random one)",
    )
    demo_parser.add_argument(
        "--k", type=int, default=2, help="number of normal references (default %(default)s)"
    )
    demo_parser.set_defaults(handler=demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "batch_size", 1) < 1:
        print("error: --batch-size must be at least 1", file=sys.stderr)
        return 2
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
