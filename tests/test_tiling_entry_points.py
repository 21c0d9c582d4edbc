"""Tiled scoring through the user's entry points: `hf-fsad score` (and `calibrate`), the pipeline and the
Space give what the Python API (`hf_fsad.tiled_scoring`) gives; a tiled bank scores tiled by itself; tile
options that disagree with a bank are refused; calibrated outputs list their defect regions."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from transformers import pipeline

from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import Calibration
from hf_fsad.calibration_policy import calibrated_bank
from hf_fsad.cli import main
from hf_fsad.deploy.regions import defect_regions
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.pipeline import pixel_decision
from hf_fsad.tiled_scoring import build_tiled_bank, calibrate_tiled_bank, score_tiled
from hf_fsad.tiling import Tiling
from hf_fsad.visualization import heatmap_overlay, outline_region
from model_tester import method_tester

EXACT = {"rtol": 0, "atol": 0}
# Tiles of 32 px every 16 x 24 px on 48 x 64 images: overlapping rows and columns, the last ones flush.
TILE_OPTIONS = ["--tile-size", "32", "--tile-stride", "16x24"]
TILING = Tiling(32, (16, 24))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Three normal references and two queries (one with a black square), 48 x 64 px, as PNG files."""
    root = tmp_path_factory.mktemp("tiled_files")
    rng = np.random.default_rng(0)
    paths = {"refs": [], "queries": []}
    for kind, count in (("refs", 3), ("queries", 2)):
        (root / kind).mkdir()
        for index in range(count):
            pixels = rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)
            if kind == "queries" and index == 1:
                pixels[5:30, 5:30] = 0
            path = root / kind / f"{index}.png"
            Image.fromarray(pixels).save(path)
            paths[kind].append(path)
    return root, paths


def rgb(paths) -> list[Image.Image]:
    return [Image.open(path).convert("RGB") for path in paths]


def read(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def python_bank(model, references, tiling=TILING, false_alarm_rate=0.05) -> ReferenceBank:
    """The calibrated tiled bank the Python API builds (leave-one-out), as the CLI's default class name."""
    bank = build_tiled_bank(model, references, tiling)
    return calibrate_tiled_bank(model, bank, references, false_alarm_rate=false_alarm_rate)


def score(model_dir, files, output, *options) -> int:
    _, paths = files
    return main(
        ["score", "--model", model_dir, "--output", str(output), *map(str, paths["queries"]), *options]
    )


def error_line(capsys) -> str:
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_cli_tile_options_score_and_map_as_the_python_api(saved_winclip_dir, files, tmp_path):
    root, paths = files
    output, heatmaps, saved = tmp_path / "tiled.jsonl", tmp_path / "maps", tmp_path / "bank.safetensors"
    options = ["--reference", str(root / "refs"), "--heatmaps", str(heatmaps), "--save-bank", str(saved)]
    # a lax threshold, so that the maps cross it: the regions compared are not all empty
    options += ["--false-alarm-rate", "0.5"]
    assert score(saved_winclip_dir, files, output, *options, *TILE_OPTIONS) == 0

    model = WinClipModel.from_pretrained(saved_winclip_dir).eval()
    bank = python_bank(model, rgb(sorted(paths["refs"])), false_alarm_rate=0.5)
    assert ReferenceBank.load(saved).tiling == bank.tiling == Tiling(32, (16, 24))
    assert ReferenceBank.load(saved).calibration.image_threshold == bank.calibration.image_threshold
    calibration = bank.calibration
    records = read(output)
    assert any(record["regions"] for record in records)  # a mask to compare, not only empty ones
    for record, image in zip(records, rgb(paths["queries"])):
        expected = score_tiled(model, image, bank)
        assert record["score"] == float(expected.image_scores[0])
        assert record["normalized_score"] == float(expected.normalized_scores[0])
        anomaly_map = expected.anomaly_maps[0].numpy()
        assert anomaly_map.shape == (48, 64)  # the image's full size
        mask, regions = pixel_decision(anomaly_map, calibration)
        assert record["regions"] == regions == defect_regions(mask, anomaly_map)
        # the heatmap is the Python map's, outlined where the calibrated mask is
        overlay = outline_region(heatmap_overlay(image, anomaly_map), mask)
        np.testing.assert_array_equal(np.asarray(Image.open(record["heatmap"])), np.asarray(overlay))


def test_a_tiled_saved_bank_scores_tiled_and_disagreeing_tile_options_are_refused(
    saved_winclip_dir, files, tmp_path, capsys
):
    root, _ = files
    first, second, saved = tmp_path / "first.jsonl", tmp_path / "second.jsonl", tmp_path / "bank.safetensors"
    built = ["--reference", str(root / "refs"), "--save-bank", str(saved)]
    assert score(saved_winclip_dir, files, first, *built, *TILE_OPTIONS) == 0
    capsys.readouterr()
    assert score(saved_winclip_dir, files, second, "--bank", str(saved)) == 0
    assert "tiling: pooled tiling: 32x32 tiles every 16x24 px" in capsys.readouterr().err
    assert read(second) == read(first)
    # the same tiling asked again is no conflict
    assert score(saved_winclip_dir, files, second, "--bank", str(saved), *TILE_OPTIONS) == 0
    assert read(second) == read(first)

    refused = tmp_path / "refused.jsonl"
    assert score(saved_winclip_dir, files, refused, "--bank", str(saved), "--tile-size", "16") == 2
    assert "the bank was built with pooled tiling: 32x32 tiles every 16x24 px" in error_line(capsys)
    mode = ["--bank", str(saved), *TILE_OPTIONS, "--tile-mode", "position"]
    assert score(saved_winclip_dir, files, refused, *mode) == 2
    assert "but position tiling" in error_line(capsys)
    untiled = tmp_path / "untiled.safetensors"
    assert (
        score(
            saved_winclip_dir, files, refused, "--reference", str(root / "refs"), "--save-bank", str(untiled)
        )
        == 0
    )
    capsys.readouterr()
    assert score(saved_winclip_dir, files, refused, "--bank", str(untiled), "--tile-size", "32") == 2
    assert "the bank is not tiled" in error_line(capsys)
    assert not refused.with_suffix(".jsonl.tmp").exists()


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--tile-stride", "16"], "--tile-stride tile only with --tile-size"),
        (["--tile-size", "16", "--tile-stride", "32"], "tile_stride 32x32 is larger than tile_size 16x16"),
        (
            ["--tile-size", "32", "--runtime", "onnxruntime", "--device", "cpu"],
            "hf-fsad score runs tiled banks on --runtime torch",
        ),
    ],
)
def test_tile_options_that_cannot_work_are_refused_before_anything_is_read(
    saved_winclip_dir, files, tmp_path, capsys, options, message
):
    root, _ = files
    assert (
        score(saved_winclip_dir, files, tmp_path / "out.jsonl", "--reference", str(root / "refs"), *options)
        == 2
    )
    assert message in error_line(capsys)


def test_a_bad_tile_size_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["score", "--model", "m", "--output", "o", "x.png", "--tile-size", "32x"])
    assert "must be N or HEIGHTxWIDTH" in capsys.readouterr().err


def test_a_tile_the_size_of_the_image_scores_exactly_as_untiled_through_the_cli(
    saved_winclip_dir, files, tmp_path
):
    root, _ = files
    untiled, tiled, saved = (
        tmp_path / "untiled.jsonl",
        tmp_path / "tiled.jsonl",
        tmp_path / "bank.safetensors",
    )
    common = ["--reference", str(root / "refs"), "--batch-size", "1"]
    assert score(saved_winclip_dir, files, untiled, *common) == 0
    assert (
        score(saved_winclip_dir, files, tiled, *common, "--tile-size", "48x64", "--save-bank", str(saved))
        == 0
    )
    assert ReferenceBank.load(saved).tiling == Tiling((48, 64))  # scored tiled, one tile per image
    keys = ("path", "score", "branch_scores", "label", "normalized_score", "threshold")
    assert [{key: r[key] for key in keys} for r in read(tiled)] == [
        {key: r[key] for key in keys} for r in read(untiled)
    ]


def test_calibrate_builds_and_calibrates_a_tiled_bank_as_the_python_api(saved_winclip_dir, files, tmp_path):
    root, paths = files
    saved = tmp_path / "bank.safetensors"
    arguments = ["calibrate", "--model", saved_winclip_dir, "--reference", str(root / "refs"), *TILE_OPTIONS]
    assert main([*arguments, "--save-bank", str(saved), "--report", str(tmp_path / "report")]) == 0
    model = WinClipModel.from_pretrained(saved_winclip_dir).eval()
    expected = python_bank(model, rgb(sorted(paths["refs"])))
    bank = ReferenceBank.load(saved)
    assert bank.tiling == expected.tiling
    assert bank.calibration.image_threshold == expected.calibration.image_threshold
    assert bank.calibration.pixel_threshold == expected.calibration.pixel_threshold


@pytest.fixture(scope="module")
def pipe(saved_winclip_dir):
    model = WinClipModel.from_pretrained(saved_winclip_dir).eval()
    return pipeline("image-anomaly-detection", model=model, image_processor=model.image_processor())


@pytest.mark.parametrize("tiling", [TILING, {"tile_size": 32, "tile_stride": [16, 24], "mode": "position"}])
def test_pipeline_tiling_scores_as_the_python_api_and_its_bank_scores_tiled(pipe, files, tiling):
    _, paths = files
    references, queries = rgb(paths["refs"]), rgb(paths["queries"])
    results = pipe(queries, reference_images=references, tiling=tiling)
    as_tiling = tiling if isinstance(tiling, Tiling) else Tiling(**tiling)
    bank = python_bank(pipe.model, references, as_tiling)
    for result, image in zip(results, queries):
        expected = score_tiled(pipe.model, image, bank)
        assert result["score"] == float(expected.image_scores[0])
        np.testing.assert_array_equal(result["anomaly_map"], expected.anomaly_maps[0].numpy())
        mask, regions = pixel_decision(result["anomaly_map"], bank.calibration)
        np.testing.assert_array_equal(result["mask"], mask)
        assert result["regions"] == regions
    # a tiled bank scores tiled without being told
    again = pipe(queries, reference_bank=bank)
    assert [r["score"] for r in again] == [r["score"] for r in results]
    with pytest.raises(ValueError, match="the bank was built with .* but .* was asked"):
        pipe(queries, reference_bank=bank, tiling={"tile_size": 16})
    untiled = pipe.build_reference_bank(references)
    with pytest.raises(ValueError, match="the bank is not tiled"):
        pipe(queries, reference_bank=untiled, tiling=TILING)


def test_pipeline_results_list_the_defect_regions_of_the_calibrated_mask(pipe, files):
    _, paths = files
    results = pipe(rgb(paths["queries"]), reference_images=rgb(paths["refs"]), false_alarm_rate=0.5)
    assert any(r["regions"] for r in results)
    assert all(r["regions"] == defect_regions(r["mask"], r["anomaly_map"]) for r in results)
    uncalibrated = pipe(rgb(paths["queries"]), reference_images=rgb(paths["refs"]), calibrate=False)
    assert "regions" not in uncalibrated[0]


def test_pixel_decision_gives_the_regions_of_a_hand_made_map_above_the_pixel_threshold():
    calibration = Calibration(
        image_threshold=0.3, image_scale=0.01, rule="false_alarm_rate", normal_source="held_out",
        num_normal=20, num_anomalous=0, target_false_alarm_rate=0.05, false_alarm_bound=0.05,
        calibration_false_alarm_rate=0.05, pixel_threshold=0.5, pixel_scale=0.01, pixel_rule="false_alarm_rate",
    )  # fmt: skip
    anomaly_map = np.zeros((8, 10), dtype=np.float32)
    anomaly_map[1:3, 1:4] = 0.7  # 6 pixels, peak 0.9 below
    anomaly_map[2, 2] = 0.9
    anomaly_map[5:8, 8] = 0.6  # a 3 px column at the border
    anomaly_map[6, 5] = 0.5  # at the threshold: normal ("anomalous when above")
    mask, regions = pixel_decision(anomaly_map, calibration)
    np.testing.assert_array_equal(mask, anomaly_map > 0.5)
    assert regions == [
        {"box": [1, 1, 4, 3], "area": 6, "peak_score": pytest.approx(0.9)},
        {"box": [8, 5, 9, 8], "area": 3, "peak_score": pytest.approx(0.6)},
    ]
    assert pixel_decision(None, calibration) == (None, None)


def test_the_bank_policy_calibrates_a_tiled_bank_on_held_out_normals_and_refuses_other_preprocessing(files):
    _, paths = files
    model = method_tester("winclip").tiny_model()
    references, held_out = rgb(paths["refs"][:2]), rgb(paths["refs"][2:] + paths["queries"][:1])
    made = calibrated_bank(model, references, held_out_normals=held_out, tiling=TILING)
    expected = calibrate_tiled_bank(
        model, build_tiled_bank(model, references, TILING), normal_images=held_out
    )
    assert made.bank.calibration.normal_source == "held_out"
    assert made.bank.calibration.normal_scores == expected.calibration.normal_scores
    assert made.bank.calibration.pixel_threshold == expected.calibration.pixel_threshold
    with pytest.raises(ValueError, match="paper_preprocessing cannot be used with tiling"):
        calibrated_bank(model, references, tiling=TILING, paper_preprocessing=True)
    # one reference: nothing to leave out, and the policy says so as it does untiled
    single = calibrated_bank(model, references[:1], tiling=TILING)
    assert single.bank.tiling == TILING and single.bank.calibration is None
    assert "at least 2 reference images" in single.refusal
