"""hf_fsad in a web page: pick a method or model, upload normal references and queries, see where the defects are.

    python spaces/app.py [--model DIR_OR_HUB_ID ...] [--port 7860]

One pipeline per model serves every user (models are stateless: references live in the per-request bank).
Methods come from `hf_fsad.registry`, so a new method appears here without editing this file.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw

import hf_fsad  # noqa: F401  (registers the methods)
from hf_fsad.io import DEFAULT_MAX_PIXELS, ImageReadError, read_image
from hf_fsad.loading import ModelLoadError, load_method
from hf_fsad.modeling_base import ReferenceBank
from hf_fsad.registry import METHODS
from hf_fsad.visualization import mask_array

DEFAULT_CLIP = "openai/clip-vit-base-patch16"
_PIPELINES: dict[str, object] = {}


def method_choices(models: list[str]) -> list[str]:
    """The models given at launch, then a fresh model of every registered method on the default CLIP."""
    return [*models, *(f"{method}@{DEFAULT_CLIP}" for method in METHODS)]


def get_pipeline(source: str):
    """The pipeline of `source` (a saved model directory, a Hub id, or METHOD@CLIP), loaded once."""
    from transformers import pipeline

    if not source or not source.strip():
        raise gr.Error("Choose a model: a saved model directory, a Hub id, or METHOD@CLIP.")
    source = source.strip()
    if source not in _PIPELINES:
        try:
            model = load_method(source).eval()
        except ModelLoadError as error:
            raise gr.Error(f"Could not load {source}: {error}") from None
        _PIPELINES[source] = pipeline(
            "image-anomaly-detection", model=model, image_processor=model.image_processor()
        )
    return _PIPELINES[source]


def read_images(files: list | None, what: str) -> list[tuple[str, Image.Image]]:
    """(name, RGB image) per uploaded file; a file that is not a usable image stops with a gr.Error."""
    images = []
    for file in files or []:
        path = Path(file if isinstance(file, str) else file.name)
        try:
            images.append((path.name, read_image(path)))
        except ImageReadError as error:
            raise gr.Error(
                f"{what} {path.name} is not an image this demo can use: {error}. Upload PNG, JPEG, BMP or TIFF "
                f"files of at most {DEFAULT_MAX_PIXELS // 10**6} megapixels."
            ) from None
    return images


def annotate(image: Image.Image, anomaly_map: np.ndarray, threshold: float) -> Image.Image:
    """The image with the region where the map reaches `threshold` outlined in red."""
    region = anomaly_map >= threshold
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


def build_bank(model, references, anomalous_files, mask_files, class_name) -> ReferenceBank:
    """The bank from the uploaded normal references and, for methods that use them, anomalous references
    with optional masks (in the same order)."""
    processor = model.image_processor()

    def pixels(images):
        return processor([image for _, image in images], return_tensors="pt").pixel_values if images else None

    extra = {}
    anomalous = read_images(anomalous_files, "Anomalous reference")
    if anomalous:
        if not model.needs_anomalous_references:
            raise gr.Error(
                f"{model.config.model_type} does not use anomalous references: remove them, or pick a method "
                "that learns from defective samples (anomalous_memory)."
            )
        extra["anomalous_pixel_values"] = pixels(anomalous)
        masks = read_images(mask_files, "Mask")
        if masks:
            if len(masks) != len(anomalous):
                raise gr.Error(
                    f"{len(masks)} masks for {len(anomalous)} anomalous references: give one mask per image, in "
                    "the same order, or none."
                )
            size = model.config.image_size
            extra["anomalous_masks"] = torch.from_numpy(
                np.stack([mask_array(mask, size) for _, mask in masks])
            )
    try:
        return model.build_reference_bank(pixels(references), class_name=class_name, **extra)
    except ValueError as error:
        raise gr.Error(f"{error} Upload the reference images this method needs (or a saved bank).") from None


def detect(
    source,
    reference_files,
    class_name,
    query_files,
    threshold,
    bank_file,
    anomalous_files=None,
    mask_files=None,
    progress=gr.Progress(),  # noqa: B008  (gradio injects the progress tracker through this default)
):
    """Score the queries; returns heatmaps, annotated images, per-query results, branch scores, the bank."""
    pipe = get_pipeline(source)
    model = pipe.model
    queries = read_images(query_files, "Query")
    if not queries:
        raise gr.Error("Upload at least one query image to score.")
    references = read_images(reference_files, "Reference")
    progress(0.1, desc="building the reference bank")
    if bank_file:
        try:
            bank = model.check_bank(
                ReferenceBank.load(bank_file if isinstance(bank_file, str) else bank_file.name)
            )
        except (ValueError, TypeError) as error:
            raise gr.Error(f"The uploaded bank cannot be used: {error}") from None
    else:
        bank = build_bank(model, references, anomalous_files, mask_files, class_name or None)
    heatmaps, annotated, results, branches = [], [], [], []
    for index, (name, image) in enumerate(queries):
        progress(0.2 + 0.8 * index / len(queries), desc=f"scoring {name}")
        result = pipe(image, reference_bank=bank)
        verdict = "fail" if result["score"] >= threshold else "pass"
        results.append(
            {
                "image": name,
                "score": result["score"],
                "verdict": verdict,
                "branch_scores": result["branch_scores"],
            }
        )
        branches += [
            {"query": name, "branch": branch, "score": value}
            for branch, value in result["branch_scores"].items()
        ]
        if result["heatmap"] is not None:
            heatmaps.append((result["heatmap"], f"{name}: {result['score']:.3f} ({verdict})"))
            annotated.append((annotate(image, result["anomaly_map"], threshold), name))
    bank_path = Path(tempfile.mkdtemp()) / f"{bank.class_name.replace(' ', '_')}-bank.safetensors"
    bank.save(bank_path)
    return (
        heatmaps,
        annotated,
        results,
        pd.DataFrame(branches, columns=["query", "branch", "score"]),
        str(bank_path),
    )


def toy_examples(folder: Path) -> list[list]:
    """Example inputs from the toy generator (two normal references and a defective query), as files."""
    from hf_fsad.data.toy import toy_records

    folder.mkdir(parents=True, exist_ok=True)
    records = toy_records("weave", num_train=2, num_test_good=0, num_test_anomalous=1, seed=4)
    paths = []
    for index, record in enumerate(records["train"] + records["test"]):
        path = folder / f"toy_weave_{index}.png"
        record.image.save(path)
        paths.append(str(path))
    return [[paths[:2], "fabric", paths[2:]]]


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
        row["image"].convert("RGB").save(path)
        paths.append(str(path))
    return [[paths[:2], "solar cell", paths[2:]]]


def build_app(models: list[str] | None = None) -> gr.Blocks:
    choices = method_choices(models or [])
    with gr.Blocks(title="hf_fsad: few-shot anomaly detection") as app:
        gr.Markdown(
            "# Few-shot anomaly detection\nUpload a few normal images of a part and the images to check. "
            "Choose a saved model, a Hub id, or METHOD@CLIP for a fresh method (no training needed for "
            "WinCLIP)."
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
                    0, 1, value=0.5, step=0.01, label="Threshold (score >= threshold: fail)"
                )
                bank_in = gr.File(file_types=[".safetensors"], label="Load a reference bank (optional)")
                with gr.Accordion("Defective references (methods that learn from them)", open=False):
                    anomalous = gr.File(
                        file_count="multiple", file_types=["image"], label="Anomalous references"
                    )
                    masks = gr.File(
                        file_count="multiple", file_types=["image"], label="Their masks (same order)"
                    )
                button = gr.Button("Detect", variant="primary")
            with gr.Column():
                heatmaps = gr.Gallery(label="Heatmaps", format="png")
                annotated = gr.Gallery(label="Thresholded regions", format="png")
                results = gr.JSON(label="Scores")
                branches = gr.BarPlot(x="branch", y="score", color="query", label="Branch scores")
                bank_out = gr.File(label="Save the reference bank")
        button.click(
            detect,
            [source, references, class_name, queries, threshold, bank_in, anomalous, masks],
            [heatmaps, annotated, results, branches, bank_out],
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
    args = parser.parse_args()
    build_app(args.model).queue().launch(server_port=args.port)


if __name__ == "__main__":
    main()
