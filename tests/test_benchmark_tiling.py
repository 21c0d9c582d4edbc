"""Tiled benchmark cells: scored as `score_tiled` scores, measured at full resolution, kept apart from untiled
cells on resume, and run from `hf-fsad benchmark --tile-size`."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hf_fsad.cli import main
from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import Protocol, run_benchmark
from hf_fsad.evaluation.tiled_cells import maps_at, mask_at, metrics_size
from hf_fsad.metrics import pixel_aupro, pixel_auroc
from hf_fsad.tiled_scoring import build_tiled_bank, score_tiled
from hf_fsad.tiling import Tiling
from test_benchmark import SPEC, TOY, CountingEncoder, cell

# Overlapping tiles on the 96 px toy images, so maps are stitched and blended.
TILING = Tiling(tile_size=64, tile_stride=32)


def test_a_tiled_cell_scores_as_score_tiled_at_full_resolution_without_the_feature_cache(
    make_winclip, tmp_path
):
    model = make_winclip()
    encoder = CountingEncoder(model)
    results = run_benchmark({"winclip": model}, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path, tiling=TILING)
    (tiled,) = results["cells"]
    assert Tiling(**tiled["tiling"]) == TILING and tiled["metrics_size"] == [96, 96]
    assert results["feature_cache"]["misses"] == results["feature_cache"]["hits"] == 0  # bypassed
    assert encoder.count > 0  # the tiles were encoded in the cell

    data = load_benchmark("toy", category="stripes", **TOY)
    train, test = data["train"], data["test"]
    references = [train[train["path"].index(i)]["image"].convert("RGB") for i in tiled["reference_ids"]]
    bank = build_tiled_bank(model, references, TILING, "textured surface")
    expected = [score_tiled(model, image.convert("RGB"), bank) for image in test["image"]]
    # the runner scores the same tiles in the same batches: the same float32 operations
    np.testing.assert_array_equal(tiled["image_scores"], [output.image_scores.item() for output in expected])
    masks = np.stack(  # normal images have no mask
        [
            np.zeros((96, 96), bool) if mask is None else np.asarray(mask.convert("L")) > 127
            for mask in test["mask"]
        ]
    )
    maps = np.stack([output.anomaly_maps[0].numpy() for output in expected])
    assert maps.shape == masks.shape == (6, 96, 96)
    assert tiled["metrics"]["pixel_auroc"] == pixel_auroc(masks, maps)
    assert tiled["metrics"]["pixel_aupro"] == pixel_aupro(masks, maps)


def test_tiled_and_untiled_cells_keep_their_own_ids_rows_and_resume(make_winclip, tmp_path):
    run = lambda tiling: run_benchmark(
        {"winclip": make_winclip()}, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path, tiling=tiling
    )
    run(None)
    both = run(TILING)
    assert both["skipped_cells"] == 0  # the untiled cell does not stand in for the tiled one
    assert [c.get("tiling") is not None for c in both["cells"]] == [False, True]
    untiled, tiled = both["cells"]
    assert untiled["image_scores"] != tiled["image_scores"]
    again = run(TILING)
    assert (
        again["skipped_cells"] == 1
        and again["cells"] == json.loads((tmp_path / "results.json").read_text())["cells"]
    )
    table = (tmp_path / "results.md").read_text()
    assert "| winclip | 2 |" in table and "| winclip (pooled tiles 64x64 every 32x32) | 2 |" in table


def test_a_position_tiled_cell_runs(make_winclip, tmp_path):
    tiling = Tiling(tile_size=48, mode="position")
    results = run_benchmark(
        {"winclip": make_winclip()}, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path, tiling=tiling
    )
    (tiled,) = results["cells"]
    assert "error" not in tiled, tiled.get("error")
    assert tiled["tiling"]["mode"] == "position" and tiled["tiling"]["image_size"] is None  # as asked
    assert 0 <= tiled["metrics"]["pixel_aupro"] <= 1


def test_pixel_metrics_of_images_of_several_sizes_are_taken_at_the_largest():
    images = [Image.new("RGB", (50, 40)), Image.new("RGB", (30, 60))]
    assert metrics_size(images) == (60, 50)
    maps = maps_at([np.full((40, 50), 2.0, np.float32), np.full((60, 50), 3.0, np.float32)], (60, 50))
    np.testing.assert_array_equal(maps, np.stack([np.full((60, 50), 2.0), np.full((60, 50), 3.0)]))
    mask = Image.fromarray(np.kron(np.eye(2, dtype=np.uint8) * 255, np.ones((20, 25), np.uint8)))  # 40x50
    resized = mask_at(mask, (60, 50))
    assert resized.shape == (60, 50) and resized[:30, :25].all() and not resized[:30, 25:].any()
    assert not mask_at(None, (60, 50)).any()


def test_cli_benchmark_tiled(tiny_clip_dir, tmp_path, capsys):
    argv = ["benchmark", "--methods", f"w=winclip@{tiny_clip_dir}", "--datasets", "toy::grid", "--k", "0"]
    argv += ["--seeds", "0", "--out", str(tmp_path), "--tile-size", "120", "--tile-stride", "100"]
    assert main(argv) == 0
    scored = cell(json.loads((tmp_path / "results.json").read_text()), method="w")
    assert Tiling(**scored["tiling"]) == Tiling(120, 100)
    assert "error" not in scored and scored["metrics"]["pixel_auroc"] is not None


@pytest.mark.parametrize(
    "options, message",
    [
        (["--tile-stride", "32"], "--tile-stride tile only with --tile-size"),
        (["--tile-size", "32", "--tile-stride", "64"], "tile_stride 64x64 is larger than tile_size 32x32"),
    ],
)
def test_cli_benchmark_refuses_bad_tiling_options(options, message, tmp_path, capsys):
    argv = [
        "benchmark",
        "--methods",
        "winclip@nowhere",
        "--datasets",
        "toy",
        "--out",
        str(tmp_path),
        *options,
    ]
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_a_tiled_cell_on_an_exported_runtime_scores_and_is_calibrated_as_pytorch(
    make_winclip, tmp_path, monkeypatch
):
    from extras import import_extra
    from test_export import PARITY

    import_extra("onnxruntime", "export")
    monkeypatch.setenv("HOME", str(tmp_path))  # the export cache lives under ~/.cache
    cells = {}
    for runtime in ("torch", "onnxruntime"):
        for validation in (0, 2):
            results = run_benchmark(
                {"winclip": make_winclip()},
                [SPEC],
                ks=[2],
                seeds=[0],
                out_dir=tmp_path / f"run{validation}",
                runtime=runtime,
                protocol=Protocol(num_validation=validation),
                tiling=TILING,
            )
            cells[runtime, validation] = cell(results, runtime=runtime)
            assert "error" not in cells[runtime, validation], cells[runtime, validation].get("error")
    for validation in (0, 2):
        np.testing.assert_allclose(
            cells["onnxruntime", validation]["image_scores"],
            cells["torch", validation]["image_scores"],
            rtol=0,
            atol=PARITY,
        )
    # Leave-one-out would take one export per reference: without validation normals, no verdicts on the export.
    assert cells["torch", 0]["calibration"]["normal_source"] == "leave_one_out"
    assert cells["onnxruntime", 0]["calibration"] is None
    assert "fitted on torch" in cells["onnxruntime", 0]["calibration_note"]
    # The validation normals are scored tiled by the export the test images are scored by: its calibration,
    # the same threshold as PyTorch's within the graph's parity (a threshold is one of the scores), verdicts.
    torch_calibration, exported_calibration = (
        cells[runtime, 2]["calibration"] for runtime in ("torch", "onnxruntime")
    )
    assert (torch_calibration["runtime"], exported_calibration["runtime"]) == ("torch", "onnxruntime")
    assert exported_calibration["normal_source"] == "held_out"
    assert exported_calibration["image_threshold"] == pytest.approx(
        torch_calibration["image_threshold"], abs=PARITY
    )
    exported = cells["onnxruntime", 2]
    assert exported["calibration_note"] is None or "fitted on" not in exported["calibration_note"]
    assert exported["false_alarm_rate"] is not None and exported["calibrated_f1"] is not None
