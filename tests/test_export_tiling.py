"""Tiled banks exported: the graph stays fixed-size, the manifest carries the tiling, and the torch-free runner
cuts, scores and stitches as `hf_fsad.tiled_scoring.score_tiled` does."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from extras import import_extra
from hf_fsad.data import load_toy
from hf_fsad.export import ExportedModel, ExportedScorer, export_model
from hf_fsad.tiled_scoring import build_tiled_bank, calibrate_tiled_bank, score_tiled
from hf_fsad.tiling import Tiling
from test_export import PARITY, _records, _run_runner, _runtime_interpreter, _write_images
from test_method_contract import tiny_model

import_extra("onnxruntime", "export")

# Overlapping tiles whose stride does not divide the toy images, so the stitching blends and the last tiles
# lie flush with the border.
TILING = Tiling(tile_size=(96, 112), tile_stride=(70, 80))


@pytest.fixture(scope="module")
def large_toy():
    """Toy stripes at 256 px: 2 normal references, 2 normal and 2 anomalous queries."""
    dataset = load_toy("stripes", num_train=2, num_test_good=2, num_test_anomalous=2, image_size=256)
    return list(dataset["train"]["image"]), list(dataset["test"]["image"])


@pytest.fixture(scope="module")
def tiled_winclip(large_toy, request):
    """A tiny WinCLIP+, its pooled tiled bank of the toy references calibrated leave-one-out (two references
    are too few for 5 %: calibration warns)."""
    model = tiny_model("winclip", request)
    references, _ = large_toy
    bank = build_tiled_bank(model, references, TILING, "stripes")
    with pytest.warns(UserWarning, match="cannot guarantee"):
        bank = calibrate_tiled_bank(model, bank, references)
    return model, bank


@pytest.fixture(scope="module")
def tiled_export(tiled_winclip, tmp_path_factory):
    model, bank = tiled_winclip
    return export_model(model, bank, tmp_path_factory.mktemp("tiled") / "onnx")


def test_manifest_carries_the_tiling_and_the_tiled_calibration(tiled_winclip, tiled_export):
    _, bank = tiled_winclip
    manifest = json.loads((tiled_export / "hf_fsad_export.json").read_text())
    assert Tiling.from_json(json.dumps(manifest["tiling"])) == bank.tiling
    assert manifest["calibration"] == json.loads(bank.calibration.to_json())
    assert (tiled_export / "tiling.py").is_file()


@pytest.mark.parametrize("batch_size", [1, 4])
def test_exported_tiled_scores_and_stitched_maps_equal_score_tiled(
    tiled_winclip, tiled_export, large_toy, batch_size
):
    model, bank = tiled_winclip
    runner = ExportedModel(tiled_export)
    for image in large_toy[1]:
        expected = score_tiled(model, image, bank)
        actual = runner.score_tiled(image, batch_size)
        np.testing.assert_allclose(
            actual["image_scores"], expected.image_scores[0].numpy(), rtol=0, atol=PARITY
        )
        assert actual["anomaly_maps"].shape == (image.height, image.width)
        # bilinear resizing is a convex combination, so the maps keep the graph's parity
        np.testing.assert_allclose(
            actual["anomaly_maps"], expected.anomaly_maps[0].numpy(), rtol=0, atol=PARITY
        )


def test_a_tile_the_size_of_the_image_scores_as_the_untiled_export(tiled_winclip, large_toy, tmp_path):
    model, _ = tiled_winclip
    references, queries = large_toy
    whole = Tiling(tile_size=256)
    folder = export_model(model, build_tiled_bank(model, references, whole, "stripes"), tmp_path / "whole")
    untiled = export_model(
        model,
        model.build_reference_bank(
            model.image_processor()(references, return_tensors="pt").pixel_values, class_name="stripes"
        ),
        tmp_path / "untiled",
    )
    tiled_runner, untiled_runner = ExportedModel(folder), ExportedModel(untiled)
    tiled = tiled_runner.score_images(queries, batch_size=2)
    expected = untiled_runner.score_images(queries, batch_size=2)
    np.testing.assert_array_equal(tiled["image_scores"], expected["image_scores"])


def test_a_position_tiled_bank_is_refused_with_why(tiled_winclip, large_toy, tmp_path):
    model, _ = tiled_winclip
    bank = build_tiled_bank(model, large_toy[0], Tiling(128, mode="position"), "stripes")
    with pytest.raises(ValueError, match="position-tiled bank does not export"):
        export_model(model, bank, tmp_path / "position")


def test_the_exported_scorer_refuses_a_tiled_bank(tiled_winclip):
    model, bank = tiled_winclip
    with pytest.raises(ValueError, match="a tiled bank scores whole images"):
        ExportedScorer(model, bank)


@pytest.mark.runtime
def test_runner_scores_tiled_image_files_as_score_tiled_without_torch(
    tiled_winclip, tiled_export, large_toy, tmp_path
):
    """The runner copied into the export, run by `.venv-runtime`'s interpreter (no torch) on image files:
    records with score_tiled's scores (within the export's parity) and calibrated labels."""
    model, bank = tiled_winclip
    paths = _write_images(tmp_path / "images", large_toy[1])
    output = tmp_path / "results.jsonl"
    completed = _run_runner(
        tiled_export, str(tmp_path / "images"), "--output", str(output), "--batch-size", "3",
        interpreter=_runtime_interpreter(),
    )  # fmt: skip
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    results = _records(output)
    assert [result["path"] for result in results] == [str(path) for path in paths]
    expected = [score_tiled(model, Image.open(path).convert("RGB"), bank) for path in paths]
    np.testing.assert_allclose(
        [result["score"] for result in results],
        [output.image_scores[0].item() for output in expected],
        rtol=0,
        atol=PARITY,
    )
    assert [result["label"] for result in results] == [
        "anomalous" if output.labels[0] else "normal" for output in expected
    ]
