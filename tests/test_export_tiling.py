"""Tiled banks exported: the graph stays fixed-size, the manifest carries the tiling, and the torch-free runner
cuts, scores and stitches as `hf_fsad.tiled_scoring.score_tiled` does, pooled and by position."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch
from PIL import Image

from extras import import_extra
from hf_fsad.data import load_toy
from hf_fsad.export import ExportedModel, ExportedScorer, export_model, position_banks
from hf_fsad.registry import METHODS
from hf_fsad.tiled_scoring import build_tiled_bank, calibrate_tiled_bank, score_tiled, tile_bank
from hf_fsad.tiling import Tiling
from test_export import (
    EXPORTED_METHODS,
    PARITY,
    _records,
    _run_runner,
    _runtime_interpreter,
    _write_images,
)
from test_method_contract import tiny_model

import_extra("onnxruntime", "export")

# Overlapping tiles whose stride does not divide the toy images, so the stitching blends and the last tiles
# lie flush with the border.
TILING = Tiling(tile_size=(96, 112), tile_stride=(70, 80))
EXACT = {"rtol": 0, "atol": 0}


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


POSITION_TILING = dataclasses.replace(TILING, mode="position")
# Methods whose banks are built from reference images (a fitted method's bank is pooled only: `fit_tiled`).
POSITION_METHODS = [method for method in EXPORTED_METHODS if not METHODS[method].model.saves_its_references]


@pytest.fixture(scope="module")
def position_exports(large_toy, request, tmp_path_factory):
    """method -> (model, its position-tiled bank of the toy references, the bank's ONNX export), made once.
    The anomalous memory's anomalous reference is the first anomalous toy query with its mask: its defect-free
    tiles join their own positions' memories, so those hold more items than the others."""
    cache = {}

    def get(method: str):
        if method not in cache:
            model = tiny_model(method, request)
            references, queries = large_toy
            anomalous = {}
            if model.needs_anomalous_references:
                mask = Image.new("L", queries[-1].size, 0)
                mask.paste(255, (20, 20, 60, 60))  # within the top-left tile only
                anomalous = {"anomalous_images": [queries[-1]], "anomalous_masks": [mask]}
            bank = build_tiled_bank(model, references, POSITION_TILING, "stripes", **anomalous)
            folder = export_model(model, bank, tmp_path_factory.mktemp(f"{method}-position") / "onnx")
            cache[method] = model, bank, folder
        return cache[method]

    return get


@pytest.mark.parametrize("method", POSITION_METHODS)
def test_exported_position_tiling_scores_and_maps_equal_score_tiled(method, position_exports, large_toy):
    """Each tile scored by the graph against its own position's bank (the `tile_position` input) gives
    score_tiled's scores and maps within the export's parity: the graph computes the same float32 operations
    in another summation order (measured <= 4e-6 untiled, tests/test_export.py), picking a position's slice
    of the stacked bank is exact, and stitching (bilinear resizes, averages: convex combinations) keeps the
    bound."""
    model, bank, folder = position_exports(method)
    runner = ExportedModel(folder)
    assert runner.position_input_name == "tile_position" and runner.tiling == bank.tiling
    for image in large_toy[1][:1] + large_toy[1][-2:]:
        expected = score_tiled(model, image, bank)
        actual = runner.score_tiled(image, batch_size=4)
        np.testing.assert_allclose(
            actual["image_scores"], expected.image_scores[0].numpy(), rtol=0, atol=PARITY
        )
        if expected.anomaly_maps is None:
            assert "anomaly_maps" not in actual
        else:
            np.testing.assert_allclose(
                actual["anomaly_maps"], expected.anomaly_maps[0].numpy(), rtol=0, atol=PARITY
            )


def test_the_position_graph_scores_each_tile_against_its_own_position(position_exports, large_toy):
    """The same tile fed as two positions scores as PyTorch scores it against each position's bank; those two
    scores lie more than twice the parity apart, so one bank could not match both."""
    model, bank, folder = position_exports("winclip")
    runner = ExportedModel(folder)
    box = bank.tiling.boxes(256, 256)[0]
    tile = large_toy[1][-1].crop(box.pil_box)
    pixel_values = model.image_processor()([tile], return_tensors="pt").pixel_values
    scores = []
    for position in (0, 5):
        with torch.no_grad():
            expected = model.score_features(model.encode_images(pixel_values), tile_bank(bank, position))
        actual = runner(pixel_values.numpy(), tile_position=position)["image_scores"]
        np.testing.assert_allclose(actual, expected.image_scores.numpy(), rtol=0, atol=PARITY)
        scores.append(expected.image_scores.item())
    assert abs(scores[0] - scores[1]) > 2 * PARITY
    with pytest.raises(ValueError, match="give the tiles' tile_position"):
        runner(pixel_values.numpy())


def test_position_banks_share_what_every_position_holds_and_pad_memories_by_repetition(position_exports):
    model, bank, _ = position_exports("anomalous_memory")
    shared, stacked = position_banks(model, bank)
    positions = len(bank.tiling.boxes(256, 256))
    assert "text_embeddings" in shared.tensors and "text_embeddings" not in stacked  # one copy in the graph
    first_level = f"reference.{model.level_names()[0]}"
    sizes = [len(tile_bank(bank, position).tensors[first_level]) for position in range(positions)]
    assert len(set(sizes)) > 1  # the defect-free tiles of the anomalous reference join their positions
    assert stacked[first_level].shape[:2] == (positions, max(sizes))
    for position, size in enumerate(sizes):
        memory = stacked[first_level][position]
        torch.testing.assert_close(memory[:size], tile_bank(bank, position).tensors[first_level], **EXACT)
        assert (memory[size:] == memory[0]).all()  # repeated first item: no item nearer than before


def test_position_banks_refuse_tensors_of_several_shapes_that_are_no_memory(position_exports):
    model, bank, _ = position_exports("winclip")
    tensors = dict(bank.tensors)
    tensors["position.1.text_embeddings"] = tensors["position.1.text_embeddings"][:, :-1]
    with pytest.raises(ValueError, match="'text_embeddings' has shapes .* one fixed-size graph cannot stack"):
        position_banks(model, dataclasses.replace(bank, tensors=tensors))


@pytest.mark.runtime
def test_runner_scores_position_tiled_image_files_without_torch(position_exports, large_toy, tmp_path):
    model, bank, folder = position_exports("winclip")
    paths = _write_images(tmp_path / "images", large_toy[1])
    output = tmp_path / "results.jsonl"
    completed = _run_runner(
        folder, str(tmp_path / "images"), "--output", str(output), interpreter=_runtime_interpreter()
    )
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    expected = [score_tiled(model, Image.open(path).convert("RGB"), bank) for path in paths]
    np.testing.assert_allclose(
        [result["score"] for result in _records(output)],
        [output.image_scores[0].item() for output in expected],
        rtol=0,
        atol=PARITY,
    )


def test_the_exported_scorer_scores_a_tiled_bank_on_whole_images_only(tiled_winclip, large_toy, tmp_path):
    model, bank = tiled_winclip
    scorer = ExportedScorer(model, bank, cache_dir=tmp_path)
    image = large_toy[1][-1]
    expected = score_tiled(model, image, bank)
    actual = scorer.score_tiled(image, batch_size=4)
    np.testing.assert_allclose(
        actual.image_scores.numpy(), expected.image_scores.numpy(), rtol=0, atol=PARITY
    )
    assert actual.anomaly_maps.shape == (1, 256, 256) and actual.labels.tolist() == expected.labels.tolist()
    pixel_values = model.image_processor()([image], return_tensors="pt").pixel_values
    with pytest.raises(ValueError, match="a tiled bank scores whole images"):
        scorer(pixel_values)


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
