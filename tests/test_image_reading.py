"""One rule for reading images on every path (CLI, pipeline given a path or a PIL image, benchmark loaders and
runner, Space, exported runner): images and masks are turned upright by their EXIF orientation, and
transparency is composited on white as transformers' `CLIPImageProcessor` does."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import pipeline
from transformers.image_transforms import convert_to_rgb

import hf_fsad.io
from hf_fsad.cli import main
from hf_fsad.data import load_benchmark
from hf_fsad.data.common import Record, build_dataset
from hf_fsad.data.toy import toy_records
from hf_fsad.deploy import image_files, run_exported
from hf_fsad.evaluation import DatasetSpec, run_benchmark
from hf_fsad.evaluation.runner import _paper_pixel_values
from hf_fsad.features import FeatureCache
from hf_fsad.io import read_image, read_mask, read_upright, read_upright_size, to_rgb, to_upright_rgb, upright
from hf_fsad.metrics import PIXEL_METRICS
from hf_fsad.pipeline import as_rgb_image
from hf_fsad.visualization import mask_array

ORIENTATION = 0x0112  # the EXIF tag


def save_oriented(upright_image: Image.Image, path: Path) -> Path:
    """Save `upright_image` as a camera held sideways does: the pixels a quarter turn anticlockwise, and EXIF
    orientation 6 ("turn clockwise to view")."""
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    path.parent.mkdir(parents=True, exist_ok=True)
    upright_image.transpose(Image.Transpose.ROTATE_90).save(path, exif=exif)
    return path


def save(image: Image.Image, path: Path, **options) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **options)
    return path


def toy_images(count: int, seed: int = 5) -> list[Image.Image]:
    """`count` toy textures (240x240 RGB), the last one with a defect."""
    splits = toy_records("weave", num_train=count - 1, num_test_good=0, num_test_anomalous=1, seed=seed)
    return [Image.fromarray(np.asarray(record.image)) for record in [*splits["train"], *splits["test"]]]


def pixels_of(image: Image.Image) -> np.ndarray:
    return np.asarray(image)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """refs/ (2 upright textures) and the same 180x240 query saved upright and sideways (orientation 6)."""
    root = tmp_path_factory.mktemp("photos")
    *references, query = toy_images(3)
    for index, reference in enumerate(references):
        save(reference, root / "refs" / f"{index}.png")
    query = query.crop((30, 0, 210, 240))
    return {
        "refs": root / "refs",
        "query": query,
        "upright": save(query, root / "upright.png"),
        "oriented": save_oriented(query, root / "oriented.png"),
    }


@pytest.fixture(scope="module")
def pipe(saved_winclip_dir):
    return pipeline("image-anomaly-detection", model=saved_winclip_dir)



def _score_arguments(model_dir: str, photos: dict) -> list[str]:
    """`hf-fsad score` against the upright references, one image a batch, as the pipeline scores them."""
    return ["score", "--model", model_dir, "--reference", str(photos["refs"]), "--batch-size", "1",
            "--class-name", "fabric"]  # fmt: skip

def test_the_oriented_file_is_stored_sideways(photos):
    with Image.open(photos["oriented"]) as stored:
        assert stored.size == (240, 180) and stored.getexif()[ORIENTATION] == 6


def test_every_reader_turns_an_oriented_image_upright(photos):
    expected = pixels_of(photos["query"])
    oriented = photos["oriented"]
    read = {
        "read_image (CLI)": read_image(oriented),
        "pipeline, path": as_rgb_image(str(oriented)),
        "pipeline, Image.open": as_rgb_image(Image.open(oriented)),
        "exported runner": image_files.read_image(oriented),
    }
    for path, image in read.items():
        assert np.array_equal(pixels_of(image), expected), path
    # Turning is done once: an image already upright (tag removed) is not turned again.
    assert np.array_equal(pixels_of(to_upright_rgb(read_image(oriented))), expected)


def test_an_ordinary_image_is_read_unchanged(photos):
    with Image.open(photos["upright"]) as image:
        image.load()
        assert upright(image) is image
        assert np.array_equal(pixels_of(to_upright_rgb(image)), pixels_of(image.convert("RGB")))


def test_an_oriented_query_scores_as_its_upright_self_in_the_pipeline_and_the_cli(
    pipe, photos, saved_winclip_dir, tmp_path
):
    references = [str(path) for path in sorted(photos["refs"].iterdir())]
    inputs = [str(photos["upright"]), str(photos["oriented"]), Image.open(photos["oriented"])]
    scores = [pipe(item, reference_images=references, class_name="fabric")["score"] for item in inputs]
    assert scores[1] == scores[0] and scores[2] == scores[0]
    output = tmp_path / "scores.jsonl"
    arguments = _score_arguments(saved_winclip_dir, photos)
    assert main([*arguments, "--output", str(output), str(photos["upright"]), str(photos["oriented"])]) == 0
    upright_score, oriented_score = [json.loads(line)["score"] for line in output.read_text().splitlines()]
    assert oriented_score == upright_score


def test_the_folder_benchmark_turns_oriented_images_and_their_masks_upright_together(photos, tmp_path):
    """A mask drawn on the image as viewers show it (no tag) and one stored sideways like its photo (tag 6)
    both line up with the upright image; before, the image was turned by `datasets` and the masks were not."""
    query = photos["query"]
    mask = np.zeros((240, 180), np.uint8)
    mask[10:50, 100:170] = 255  # off-centre: a turned or mirrored mask would not match
    mask_image = Image.fromarray(mask)
    base = tmp_path / "root" / "part"
    for index, normal in enumerate(toy_images(5, seed=7)[:4]):
        save(normal, base / "good" / f"{index}.png")
    save_oriented(query, base / "scratch" / "drawn.png")
    save(mask_image, base / "masks" / "scratch" / "drawn.png")
    save_oriented(query, base / "scratch" / "camera.png")
    save_oriented(mask_image, base / "masks" / "scratch" / "camera_mask.png")
    test = load_benchmark("folder", root=base)["test"]
    for name in ("drawn", "camera"):
        (row,) = [row for row in test if row["path"].endswith(f"{name}.png")]
        assert np.array_equal(pixels_of(row["image"].convert("RGB")), pixels_of(query)), name
        assert np.array_equal(np.asarray(row["mask"]), mask), name
    # A cropped record (KSDD, AITEX) is cut from the upright image, and so is its mask.
    box = (20, 30, 160, 200)
    record = Record(
        image=str(base / "scratch" / "drawn.png"),
        label=1,
        category="part",
        defect_type="scratch",
        path="drawn",
        mask=str(base / "masks" / "scratch" / "drawn.png"),
        crop=box,
    )
    (row,) = build_dataset([record], "cropped", "test")
    assert np.array_equal(pixels_of(row["image"].convert("RGB")), pixels_of(query.crop(box)))
    assert np.array_equal(np.asarray(row["mask"]), mask[box[1] : box[3], box[0] : box[2]])


def test_the_runner_scores_oriented_benchmark_images_as_upright_ones(make_winclip, tmp_path):
    normals, anomalous = toy_images(6, seed=11)[:5], toy_images(2, seed=12)[-1].crop((0, 0, 200, 240))
    mask = np.zeros((240, 200), np.uint8)
    mask[20:60, 120:190] = 255
    results = []
    for name, save_photo in (("upright", save), ("oriented", save_oriented)):
        base = tmp_path / name / "part"
        for index, normal in enumerate(normals):
            save_photo(normal, base / "good" / f"{index}.png")
        save_photo(anomalous, base / "scratch" / "0.png")
        save(Image.fromarray(mask), base / "masks" / "scratch" / "0.png")
        spec = DatasetSpec("folder", str(base))
        results.append(
            run_benchmark({"w": make_winclip()}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / f"{name}-run")
        )
    (upright_cell,), (oriented_cell,) = (result["cells"] for result in results)
    assert oriented_cell["image_scores"] == upright_cell["image_scores"]
    for metric in PIXEL_METRICS:
        assert upright_cell["metrics"][metric] is not None
        assert oriented_cell["metrics"][metric] == upright_cell["metrics"][metric], metric


@pytest.fixture(scope="module")
def transparent(tmp_path_factory):
    """{mode: file} for an RGBA, an LA and a palette image with a transparent colour, each with a transparent
    background around the texture (PNG)."""
    root = tmp_path_factory.mktemp("transparent")
    texture = toy_images(2, seed=3)[0]
    alpha = np.zeros((240, 240), np.uint8)
    alpha[40:200, 40:200] = np.linspace(64, 255, 160, dtype=np.uint8)[None, :]  # partly, fully, not
    alpha = Image.fromarray(alpha)
    rgba = texture.copy()
    rgba.putalpha(alpha)
    grey = texture.convert("L")
    grey.putalpha(alpha)
    palette = texture.quantize(colors=16)
    palette.paste(0, (0, 0, 240, 40))  # index 0, made transparent below, fills the top band
    return {
        "RGBA": save(rgba, root / "rgba.png"),
        "LA": save(grey, root / "la.png"),
        "P": save(palette, root / "palette.png", transparency=0),
    }


def test_to_rgb_composites_transparency_on_white_as_transformers_does(transparent):
    for mode, path in transparent.items():
        with Image.open(path) as image:
            assert image.mode == mode
            expected = convert_to_rgb(image, return_numpy=True)
            assert np.array_equal(pixels_of(to_rgb(image)), expected), mode
            assert not np.array_equal(pixels_of(image.convert("RGB")), expected), mode  # alpha matters here


def test_every_path_gives_the_processors_pixels_for_transparent_images(
    saved_winclip_dir, pipe, transparent, tmp_path
):
    model = pipe.model
    processor = model.image_processor()

    def pixel_values(image: Image.Image) -> torch.Tensor:
        return processor(image, return_tensors="pt").pixel_values

    settings = json.loads(json.dumps({**processor.to_dict(), "resample": int(processor.resample)}))
    for mode, path in transparent.items():
        expected = pixel_values(Image.open(path))
        read = {
            "read_image (CLI)": read_image(path),
            "pipeline, path": as_rgb_image(str(path)),
            "pipeline, Image.open": as_rgb_image(Image.open(path)),
        }
        for route, image in read.items():
            assert torch.equal(pixel_values(image), expected), (mode, route)
        exported = run_exported.preprocess(image_files.read_image(path), settings)
        assert np.array_equal(exported, expected[0].numpy()), mode

    # The benchmark runner: the images of a `folder` benchmark, preprocessed and encoded by the feature cache.
    base = tmp_path / "root" / "part"
    for path in transparent.values():
        save(Image.open(path), base / "good" / path.name)
    save(toy_images(2, seed=9)[-1], base / "scratch" / "0.png")
    paper_processor = model.paper_image_processor()
    for split in load_benchmark("folder", root=base).values():
        rows = [index for index, path in enumerate(split["path"]) if Path(path).parent.name == "good"]
        files = [base / "good" / Path(split[index]["path"]).name for index in rows]
        expected = paper_processor([Image.open(file) for file in files], return_tensors="pt").pixel_values
        assert torch.equal(_paper_pixel_values(model, split.select(rows)["image"]), expected)
        with torch.no_grad():
            cached = FeatureCache().features(model, split, rows, 8, "references")
            direct = model.encode_images(expected)
        for name, tensor in direct.items():
            assert torch.equal(cached[name], tensor), name


def test_the_cli_scores_a_transparent_image_as_the_processor_sees_it(
    pipe, transparent, photos, saved_winclip_dir, tmp_path
):
    """The CLI's score of each transparent query equals the pipeline's on `processor`-converted copies (RGB
    files holding transformers' `convert_to_rgb` of each), so the CLI and Python agree."""
    composited = [
        save(Image.fromarray(convert_to_rgb(Image.open(path), return_numpy=True)), tmp_path / f"{mode}.png")
        for mode, path in transparent.items()
    ]
    output = tmp_path / "scores.jsonl"
    arguments = _score_arguments(saved_winclip_dir, photos)
    queries = [*map(str, transparent.values()), *map(str, composited)]
    assert main([*arguments, "--output", str(output), *queries]) == 0
    scores = [json.loads(line)["score"] for line in output.read_text().splitlines()]
    assert scores[:3] == scores[3:]
    references = [str(path) for path in sorted(photos["refs"].iterdir())]
    for path, score in zip(transparent.values(), scores):
        assert pipe(Image.open(path), reference_images=references, class_name="fabric")["score"] == score


def test_masks_ignore_transparency_and_turn_upright(tmp_path):
    """A mask painted on a transparent background: only the painted defect is anomalous (compositing on white
    would mark the background); a sideways mask is turned like its photo."""
    painted = np.zeros((40, 60, 4), np.uint8)
    painted[5:15, 30:50] = 255
    path = save(Image.fromarray(painted, mode="RGBA"), tmp_path / "mask.png")
    expected = np.zeros((40, 60), bool)
    expected[5:15, 30:50] = True
    assert np.array_equal(mask_array(read_mask(path), 40)[:, :], mask_array(Image.fromarray(expected), 40))
    turned = save_oriented(Image.fromarray(expected.astype(np.uint8) * 255), tmp_path / "turned.png")
    assert np.array_equal(np.asarray(read_mask(turned).convert("L")) > 127, expected)


def test_the_exported_runner_reads_with_the_librarys_own_functions():
    """The runner shipped beside an export reads and reports files with `hf_fsad.io`'s functions themselves
    (they live in `image_files`, which the export copies beside the runner), so no second copy can drift."""
    for name in ("read_image", "to_upright_rgb", "to_rgb", "upright", "expand_inputs", "json_line"):
        assert getattr(hf_fsad.io, name) is getattr(image_files, name), name
    assert run_exported.image_files is image_files  # the module the runner reads with


def test_the_space_reads_images_as_the_cli_does(transparent, photos):
    from extras import import_extra

    import_extra("gradio", "space")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
    import app as space

    expected = [pixels_of(photos["query"])]
    expected += [convert_to_rgb(Image.open(path), return_numpy=True) for path in transparent.values()]
    files = [str(photos["oriented"]), *map(str, transparent.values())]
    for file, wanted, (_, image) in zip(files, expected, space.read_images(files, "Query")):
        assert np.array_equal(pixels_of(image), wanted), file


def test_the_loaders_reader_turns_files_upright_and_keeps_their_mode(photos, tmp_path):
    assert read_upright_size(photos["oriented"]) == photos["query"].size == (180, 240)
    assert pixels_of(read_upright(photos["oriented"])).tolist() == pixels_of(photos["query"]).tolist()
    # a sideways RGBA file: upright, its alpha kept for the model's reader (`to_upright_rgb`) to composite
    rgba = photos["query"].convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.arange(180, dtype=np.uint8), (240, 1))))
    loaded = read_upright(save_oriented(rgba, tmp_path / "rgba.png"))
    assert loaded.mode == "RGBA" and pixels_of(loaded).tolist() == pixels_of(rgba).tolist()
