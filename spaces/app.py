"""hf_fsad in a web page: pick a method or model, upload normal references and queries, see where the defects are.

    python spaces/app.py [--model DIR_OR_HUB_ID ...] [--port 7860] [--allow-untrained]

One pipeline per model serves every user (models are stateless: references live in the per-request bank).
Methods come from `hf_fsad.registry`, so a new method appears here without editing this file.

Raw scores have no common scale (a tiny random WinCLIP scores a clear defect 0.27), so the bank built from
the uploads is calibrated (`hf_fsad.calibration_policy.calibrated_bank`, as the CLI calibrates) and the
pass/fail slider acts on the normalised score, whose 0.5 is the calibrated threshold. Where calibration is impossible the page says why and the slider acts on
the raw score.

Large images can be scored tile by tile (tile size N or HxW, 0: off), their maps stitched at the image's full size; a
loaded tiled bank scores tiled by itself. With a calibrated bank each query lists its defect regions (box,
area, peak score) at the calibrated pixel threshold.

A method whose own parts must be trained (MetaCAN, AF-CLIP) is offered as METHOD@CLIP, and scored with random
weights, only when the Space is launched with --allow-untrained (a demo); otherwise the page refuses such a
model with how to get weights, as the CLI does.
"""

from __future__ import annotations

import argparse
import functools
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

import hf_fsad  # noqa: F401  (registers the methods)
from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import Calibration, score_at_level
from hf_fsad.calibration_policy import BankBuildError, calibrated_bank, checked_saved_bank, tiling_conflict
from hf_fsad.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image, read_mask, to_upright_rgb
from hf_fsad.loading import ModelLoadError, load_method
from hf_fsad.registry import METHODS, method_spec
from hf_fsad.tiling import TILE_MODES, Tiling, parse_pixels

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
_PIPELINES: dict[tuple[str, bool], object] = {}


def method_choices(models: list[str], allow_untrained: bool = False) -> list[str]:
    """The models given at launch, then a fresh model of every registered method on the default CLIP; of
    the methods whose own parts must be trained, only with `allow_untrained` (fresh, they are random)."""
    fresh = [method for method in METHODS if allow_untrained or not method_spec(method).model.needs_training]
    return [*models, *(f"{method}@{DEFAULT_CLIP}" for method in fresh)]


def get_pipeline(source: str, allow_untrained: bool = False):
    """The pipeline of `source` (a saved model directory, a Hub id, or METHOD@CLIP), loaded once; a model
    whose trained parts were never trained is refused unless `allow_untrained` (`load_method`)."""
    from transformers import pipeline

    if not source or not source.strip():
        raise gr.Error("Choose a model: a saved model directory, a Hub id, or METHOD@CLIP.")
    source = source.strip()
    key = (source, allow_untrained)
    if key not in _PIPELINES:
        try:
            model = load_method(source, allow_untrained=allow_untrained).eval()
        except ModelLoadError as error:
            raise gr.Error(f"Could not load {source}: {error}") from None
        _PIPELINES[key] = pipeline(
            "image-anomaly-detection", model=model, image_processor=model.image_processor()
        )
    return _PIPELINES[key]


def read_images(files: list | None, what: str, read=read_image) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) per uploaded file, read as the CLI reads it (`read_image`, or `read_mask` for
    masks); a file that is not a usable image stops with a gr.Error."""
    images = []
    for file in files or []:
        path = Path(file if isinstance(file, str) else file.name)
        try:
            images.append((path.name, read(path)))
        except ImageReadError as error:
            raise gr.Error(
                f"{what} {path.name} is not an image this demo can use: {error}. Upload PNG, JPEG, BMP or TIFF "
                f"files of at most {DEFAULT_MAX_PIXELS // 10**6} megapixels."
            ) from None
    return images


def annotate(image: Image.Image, region: np.ndarray) -> Image.Image:
    """The image with `region` (a boolean map of the image's size) outlined in red."""
    annotated = image.convert("RGB").copy()
    if region.any():
        edge = region & ~(
            np.roll(region, 1, 0) & np.roll(region, -1, 0) & np.roll(region, 1, 1) & np.roll(region, -1, 1)
        )
        pixels = np.asarray(annotated).copy()
        pixels[edge] = (255, 0, 0)
        annotated = Image.fromarray(pixels)
        draw = ImageDraw.Draw(annotated)
        ys, xs = np.nonzero(region)
        draw.rectangle([xs.min(), ys.min(), xs.max(), ys.max()], outline=(255, 0, 0), width=2)
    return annotated


# The calibrated heatmap's colour scale runs over normalised map values from 1% (blue) to 99% (red), so the
# pixel threshold is its middle (green) and every query shares it.
HEATMAP_LEVELS = 0.01


def heatmap_range(calibration: Calibration | None) -> tuple[float, float] | None:
    """The raw map values where the normalised map is HEATMAP_LEVELS and 1 - HEATMAP_LEVELS; None (each
    heatmap on its own min and max) without a pixel calibration."""
    if calibration is None or calibration.pixel_threshold is None:
        return None
    low, high = (
        score_at_level(level, calibration.pixel_threshold, calibration.pixel_scale)
        for level in (HEATMAP_LEVELS, 1 - HEATMAP_LEVELS)
    )
    return low, high


def named_images(files: list | None, what: str, read=read_image) -> dict[str, Image.Image]:
    """`read_images` keyed by file name, so masks pair with their images by file stem as the CLI pairs them
    (`000.png` with `000.png` or `000_mask.png`); a name uploaded twice stops with a gr.Error."""
    images = read_images(files, what, read)
    named = dict(images)
    if len(named) < len(images):
        repeated = sorted({name for name, _ in images if [n for n, _ in images].count(name) > 1})
        raise gr.Error(f"{what} files must have distinct names: {', '.join(repeated)} uploaded twice.")
    return named


def page_tiling(tile_size: str | None, tile_stride: str | None, tile_mode: str) -> Tiling | None:
    """The tiling the page asks for: tiles of `tile_size` px, N (square) or HxW, every `tile_stride` px (N or
    HxW; empty or 0: the tile size), compared by `tile_mode`; None (untiled) when the tile size is empty or 0."""
    if not str(tile_size or "").strip() or str(tile_size).strip() == "0":
        return None
    try:
        stride = None if str(tile_stride or "").strip() in ("", "0") else parse_pixels(tile_stride)
        return Tiling(parse_pixels(tile_size), stride, tile_mode)
    except ValueError as error:
        raise gr.Error(f"Tiling: {error}") from None


def build_bank(
    model,
    references,
    anomalous_files,
    mask_files,
    class_name,
    confidence: float | None = None,
    weight_search: bool = True,
    held_out: list[tuple[str, Image.Image]] = (),
    tiling: Tiling | None = None,
) -> tuple[ReferenceBank, str]:
    """The bank from the uploaded normal references and defective ones, calibrated where possible, and the
    line saying how (`hf_fsad.calibration_policy.calibrated_bank`, as the CLI builds it). A method that learns
    from defects keeps them in its bank with their masks, paired by file name, and chooses its score weights
    on them unless `weight_search` is off; for the others they are held out and report their miss rate.
    `held_out` normal images calibrate instead of the references left out one at a time; with a `tiling` the
    bank is tiled."""
    defects = named_images(anomalous_files, "Defective reference")
    masks = named_images(mask_files, "Mask", read_mask)
    if masks and not defects:
        raise gr.Error("Masks were uploaded without defective references: add the images they outline.")
    learns = model.needs_anomalous_references
    try:
        made = calibrated_bank(
            model,
            [image for _, image in references],
            class_name=class_name,
            defects=defects if learns else (),
            defect_masks=(masks or None) if learns else None,
            # the false-alarm rule sets the pixel threshold on the normals alone: masks serve only banks that learn them
            anomalous=() if learns else list(defects.values()),
            held_out_normals=[image for _, image in held_out],
            confidence=confidence,
            weight_search=weight_search,
            tiling=tiling,
        )
    except BankBuildError as error:
        raise gr.Error(f"{error} Upload the reference images this method needs (or a saved bank).") from None
    except ValueError as error:
        raise gr.Error(str(error)) from None
    notes = "".join(f" {note[0].upper()}{note[1:]}." for note in made.notes)
    if made.refusal is not None:
        reason = f"{made.refusal[0].upper()}{made.refusal[1:]}: a threshold needs normal images the bank does not hold."
        return made.bank, uncalibrated(reason + notes)
    line = f"**Calibrated:** {made.bank.calibration.describe()}."
    if defects and learns:
        line += (
            " The defective references are in the bank, so they do not set the threshold: scored against a "
            "bank that holds them, each would be matched with itself."
        )
    return made.bank, line + notes


def uncalibrated(reason: str) -> str:
    """The note shown instead of a calibration line: why, and that the slider then acts on raw scores."""
    return (
        f"**Not calibrated:** {reason} The verdict compares the raw score with the slider, and raw scores "
        "have no common scale: treat pass/fail as unreliable."
    )


def loaded_bank(model, bank_file, tiling: Tiling | None = None) -> tuple[ReferenceBank, str]:
    """The uploaded bank, checked against the model and the page's `tiling` (a tiled bank scores as it was
    tiled), with its own calibration line (or why it has none)."""
    try:
        bank = checked_saved_bank(
            model, ReferenceBank.load(bank_file if isinstance(bank_file, str) else bank_file.name)
        )
    except (ValueError, TypeError) as error:
        raise gr.Error(f"The uploaded bank cannot be used: {error}") from None
    conflict = tiling_conflict(bank, tiling)
    if conflict is not None:
        raise gr.Error(f"The uploaded bank cannot be used: {conflict}.")
    if bank.calibration is None:
        return bank, uncalibrated(
            "the loaded bank was saved without a calibration; build it again from 2 or more references."
        )
    return bank, f"**Calibrated (loaded bank):** {bank.calibration.describe()}."


def decide(
    calibration: Calibration | None, score: float, anomaly_map: np.ndarray | None, threshold: float
) -> tuple[float | None, str, np.ndarray | None]:
    """(normalised score, verdict, region to outline) of one query at the slider's `threshold`: on the
    normalised score and map with a calibration, else on the raw ones, said in the verdict."""
    if calibration is None:
        verdict = "fail" if score > threshold else "pass"
        region = None if anomaly_map is None else anomaly_map > threshold
        return None, f"{verdict} (uncalibrated)", region
    normalized = float(calibration.normalize(torch.tensor([score]))[0])
    if anomaly_map is not None:
        anomaly_map = calibration.normalize_maps(torch.from_numpy(anomaly_map)).numpy()
    return (
        normalized,
        "fail" if normalized > threshold else "pass",
        None if anomaly_map is None else anomaly_map > threshold,
    )


def decision_table(line: str, results: list[dict], threshold: float) -> str:
    """Markdown: the calibration line, the rule at the slider's level, and each query's scores and verdict."""
    scale = "raw" if results[0]["normalized_score"] is None else "normalised"
    rows = [
        f"| {r['image']} | {r['score']:.4f} | "
        f"{'—' if r['normalized_score'] is None else format(r['normalized_score'], '.3f')} | **{r['verdict']}** |"
        for r in results
    ]
    return "\n".join(
        [
            line,
            "",
            f"Fail when the {scale} score is above {threshold:.2f}.",
            "",
            "| query | score | normalised score | verdict |",
            "|---|---|---|---|",
            *rows,
        ]
    )


def detect(
    source,
    reference_files,
    class_name,
    query_files,
    threshold,
    bank_file,
    anomalous_files=None,
    mask_files=None,
    confidence=0.0,
    weight_search=True,
    held_out_files=None,
    tile_size=0,
    tile_stride=0,
    tile_mode="pooled",
    progress=gr.Progress(),  # noqa: B008  (gradio injects the progress tracker through this default)
    *,
    allow_untrained: bool = False,
):
    """Score the queries; returns heatmaps, outlined regions, the decision (Markdown), per-query results,
    branch scores and the bank. `confidence` > 0: the calibrated false-alarm rate holds with that probability,
    not only on average; `weight_search`: the anomalous memory chooses its score weights on the defects;
    `tile_size` N or HxW (0: off): a tiled bank (`page_tiling`), large images scored tile by tile.

    With a calibrated bank a query fails when its normalised score reaches `threshold` and the outlined
    region is where the normalised map does; otherwise both compare raw values with `threshold`.
    """
    pipe = get_pipeline(source, allow_untrained)
    model = pipe.model
    queries = read_images(query_files, "Query")
    if not queries:
        raise gr.Error("Upload at least one query image to score.")
    references = read_images(reference_files, "Reference")
    tiling = page_tiling(tile_size, tile_stride, tile_mode)
    progress(0.1, desc="building and calibrating the reference bank")
    if bank_file:
        if held_out_files:
            raise gr.Error(
                "Held-out normal images calibrate a bank built here; an uploaded bank is used as saved "
                "(recalibrate it with hf-fsad calibrate)."
            )
        bank, line = loaded_bank(model, bank_file, tiling)
    else:
        bank, line = build_bank(
            model,
            references,
            anomalous_files,
            mask_files,
            class_name or None,
            confidence=confidence or None,
            weight_search=weight_search,
            held_out=read_images(held_out_files, "Held-out normal image"),
            tiling=tiling,
        )
    if bank.tiling is not None:
        line += f" Scored with {bank.tiling.describe()}."
    calibration = bank.calibration
    heatmaps, annotated, results, branches = [], [], [], []
    for index, (name, image) in enumerate(queries):
        progress(0.2 + 0.8 * index / len(queries), desc=f"scoring {name}")
        result = pipe(image, reference_bank=bank, heatmap_range=heatmap_range(calibration))
        normalized, verdict, region = decide(calibration, result["score"], result["anomaly_map"], threshold)
        results.append(
            {
                "image": name,
                "score": result["score"],
                "normalized_score": normalized,
                "verdict": verdict,
                "branch_scores": result["branch_scores"],
                "regions": result.get("regions"),
            }
        )
        branches += [
            {"query": name, "branch": branch, "score": value}
            for branch, value in result["branch_scores"].items()
        ]
        if result["heatmap"] is not None:
            shown = f"{result['score']:.3f}" + (
                "" if normalized is None else f", normalised {normalized:.2f}"
            )
            heatmaps.append((result["heatmap"], f"{name}: {shown} ({verdict})"))
            annotated.append((annotate(image, region), f"{name} ({verdict})"))
    bank_path = Path(tempfile.mkdtemp()) / f"{bank.class_name.replace(' ', '_')}-bank.safetensors"
    bank.save(bank_path)
    return (
        heatmaps,
        annotated,
        decision_table(line, results, threshold),
        results,
        pd.DataFrame(branches, columns=["query", "branch", "score"]),
        str(bank_path),
    )


def toy_examples(folder: Path) -> list[list]:
    """Example inputs from the toy generator, as files: four normal references (enough for a leave-one-out
    calibration), then a normal and a defective query."""
    from hf_fsad.data.toy import toy_records

    folder.mkdir(parents=True, exist_ok=True)
    records = toy_records("weave", num_train=4, num_test_good=1, num_test_anomalous=1, seed=4)
    names = [f"toy_weave_reference_{index}" for index in range(len(records["train"]))]
    names += [f"toy_weave_{record.defect_type}" for record in records["test"]]
    paths = []
    for name, record in zip(names, records["train"] + records["test"]):
        path = folder / f"{name}.png"
        record.image.save(path)
        paths.append(str(path))
    references = len(records["train"])
    return [[paths[:references], "fabric", paths[references:]]]


def elpv_examples(folder: Path) -> list[list]:
    """Two normal solar cells and a defective one from ELPV when the `elpv` extra is installed; else none."""
    from hf_fsad.data import load_benchmark

    try:
        data = load_benchmark("elpv")
    except ImportError:
        return []
    test = data["test"]
    query = test[test["label"].index(1)]
    normals = [row for row in data["train"] if row["category"] == query["category"]][:2]
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, row in enumerate([*normals, query]):
        path = folder / f"elpv_{index}.png"
        to_upright_rgb(row["image"]).save(path)
        paths.append(str(path))
    return [[paths[:2], "solar cell", paths[2:]]]


def build_app(models: list[str] | None = None, allow_untrained: bool = False) -> gr.Blocks:
    """The page; `allow_untrained` offers and scores methods whose own parts were never trained (demos)."""
    choices = method_choices(models or [], allow_untrained)
    with gr.Blocks(title="hf_fsad: few-shot anomaly detection") as app:
        gr.Markdown(
            "# Few-shot anomaly detection\nUpload a few normal images of a part and the images to check. "
            "Choose a saved model, a Hub id, or METHOD@CLIP for a fresh method (no training needed for "
            "WinCLIP). The pass/fail threshold keeps a 5% false-alarm rate: calibrated on held-out normal "
            "images when given, else on 2 or more references (each scored against the others); defective "
            "references, when given, report the share of them it misses."
        )
        with gr.Row():
            with gr.Column():
                source = gr.Dropdown(choices, value=choices[0], allow_custom_value=True, label="Model")
                references = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    label="Normal references (k)",
                    elem_id="references",
                )
                class_name = gr.Textbox(label="Class name", placeholder="e.g. bottle")
                queries = gr.File(
                    file_count="multiple", file_types=["image"], label="Query images", elem_id="queries"
                )
                threshold = gr.Slider(
                    0,
                    1,
                    value=0.5,
                    step=0.01,
                    label="Threshold on the normalised score (fail above; 0.5 = calibrated threshold)",
                )
                bank_in = gr.File(file_types=[".safetensors"], label="Load a reference bank (optional)")
                with gr.Accordion(
                    "Defective references (their miss rate at the threshold; anomalous_memory also learns from them)",
                    open=False,
                ):
                    anomalous = gr.File(
                        file_count="multiple", file_types=["image"], label="Defective references"
                    )
                    masks = gr.File(
                        file_count="multiple",
                        file_types=["image"],
                        label="Their masks, matched by file name (000.png or 000_mask.png for 000.png; "
                        "anomalous_memory learns from them)",
                    )
                    weight_search = gr.Checkbox(
                        value=True,
                        label="anomalous_memory: choose the score weights on the defects (paper Sec. 4.3 weight "
                        "search; off: the baseline weights)",
                    )
                held_out = gr.File(
                    file_count="multiple",
                    file_types=["image"],
                    label="Held-out normal images (optional): calibrate on them instead of the references "
                    "left out one at a time",
                )
                confidence = gr.Slider(
                    0,
                    0.99,
                    value=0,
                    step=0.01,
                    label="Confidence that the 5% false-alarm rate holds for this calibration (0: on average; "
                    "0.9 needs 45 normal references)",
                )
                with gr.Accordion("Tiling for large images (optional)", open=False):
                    tile_size = gr.Textbox(
                        value="0",
                        label="Tile size in pixels, N or HEIGHTxWIDTH, e.g. 240 or 240x320 (0: off, each image "
                        "squashed to the model's input)",
                    )
                    tile_stride = gr.Textbox(
                        value="0",
                        label="Tile stride in pixels, N or HEIGHTxWIDTH (0: the tile size; smaller: overlapping "
                        "tiles, maps averaged)",
                    )
                    tile_mode = gr.Radio(
                        list(TILE_MODES),
                        value="pooled",
                        label="Compare each tile with all reference tiles (pooled: textures) or with the tile at "
                        "its place (position: a fixed part under a fixed camera)",
                    )
                button = gr.Button("Detect", variant="primary")
            with gr.Column():
                decision = gr.Markdown(elem_id="decision")
                heatmaps = gr.Gallery(
                    label="Heatmaps (calibrated: one colour scale, green at the pixel threshold)",
                    format="png",
                    columns=2,
                )
                annotated = gr.Gallery(
                    label="Regions at the threshold (calibrated pixel threshold at 0.5)",
                    format="png",
                    columns=2,
                )
                results = gr.JSON(
                    label="Scores and defect regions (box [left, top, right, bottom], area, peak score)"
                )
                branches = gr.BarPlot(x="branch", y="score", color="query", label="Branch scores")
                bank_out = gr.File(label="Save the reference bank")
        button.click(
            functools.partial(detect, allow_untrained=allow_untrained),
            [
                source,
                references,
                class_name,
                queries,
                threshold,
                bank_in,
                anomalous,
                masks,
                confidence,
                weight_search,
                held_out,
                tile_size,
                tile_stride,
                tile_mode,
            ],
            [heatmaps, annotated, decision, results, branches, bank_out],
            api_name="detect",
        )
        examples = Path(tempfile.gettempdir()) / "hf_fsad_space_examples"
        gr.Examples(toy_examples(examples) + elpv_examples(examples), [references, class_name, queries])
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model", nargs="*", default=[], help="saved model directories or Hub ids to offer first"
    )
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", "7860")))
    parser.add_argument(
        "--allow-untrained",
        action="store_true",
        help="offer and score MetaCAN and AF-CLIP with random weights, as METHOD@CLIP builds them (demos)",
    )
    args = parser.parse_args()
    build_app(args.model, args.allow_untrained).queue().launch(server_port=args.port)


if __name__ == "__main__":
    main()
