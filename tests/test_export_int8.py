"""int8 exports (`hf-fsad export --precision int8`): every exported method quantises and scores within a
measured bound of float32, an error above the bound falls back to float32 (or is refused), an int8 export has
a cache folder of its own, the runner runs it, and the CLI's calibration is fitted on the int8 graph."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

import test_export
from extras import import_extra
from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import fit_calibration
from hf_fsad.cli import main as cli_main
from hf_fsad.deploy import run_exported
from hf_fsad.export import QUANTIZATION_IMAGES, ExportedModel, cached_export, export_model
from hf_fsad.quantization import int8_error
from hf_fsad.registry import method_spec
from hf_fsad.tiling import Tiling
from test_export import (
    EXPORTED_METHODS,
    PARITY,
    _records,
    _write_images,
    assert_parity,
    pixels,
    toy_bank,
)
from test_method_contract import tiny_model

import_extra("onnxruntime", "export")
import_extra("openvino", "export")
import_extra("nncf", "export")

# The bound on the tiny models' int8 error on the 6 toy queries, as a share of the float32 outputs' spread
# (`int8_error`; the export's own guard is 0.05 on paper-sized towers). Measured on these tiny random towers
# (2 blocks, 8 calibration images): at most 0.033 for image scores and 0.052 for maps (WinCLIP on OpenVINO),
# so 0.1 leaves 2x; MetaCAN's maps move most (0.32 on ONNX Runtime, 0.20 on OpenVINO; on the calibration
# images 0.16 and 0.11, so its export falls back to float32 at the default 0.05), so 0.5 there, 1.5x. A quantised scoring head or an uncalibrated activation range moves them by 1 and more.
INT8_PARITY = 0.1
METACAN_MAP_PARITY = 0.5


def parity_bound(method: str) -> float:
    return METACAN_MAP_PARITY if method == "metacan" else INT8_PARITY


@pytest.fixture(scope="module")
def toy():
    """tests/test_export.py's toy stripes (its fixture of the same name)."""
    return test_export.toy.__wrapped__()


@pytest.fixture(scope="module")
def int8_exports(toy, tmp_path_factory, request):
    """(method, format) -> (model, bank, float32 export, int8 export), exported once per module."""
    cache = {}

    def get(method: str, format: str = "onnx"):
        if (method, format) not in cache:
            model = tiny_model(method, request)
            bank = toy_bank(model, toy)
            folder = tmp_path_factory.mktemp(f"{method}-{format}")
            float32 = export_model(model, bank, folder / "float32", format)
            int8 = export_model(model, bank, folder / "int8", format, "int8", toy[0], parity_bound(method))
            cache[method, format] = model, bank, float32, int8
        return cache[method, format]

    return get


# OpenVINO's int8 (NNCF, then a conversion per method: ~20 s each) with the long runs, as its float32 parity
@pytest.mark.parametrize("format", ["onnx", pytest.param("openvino", marks=pytest.mark.slow)])
@pytest.mark.parametrize("method", EXPORTED_METHODS)
def test_int8_export_scores_within_the_measured_bound_of_float32(method, format, int8_exports, toy):
    model, _, float32, int8 = int8_exports(method, format)
    manifest = run_exported.read_manifest(int8)
    assert manifest["precision"] == "int8" and not manifest["int8"]["fell_back_to_float32"]
    assert manifest["int8"]["calibration_images"] == QUANTIZATION_IMAGES  # 2 references + 6 generated views
    assert manifest["int8"]["quantized_nodes"] > 0
    assert max(manifest["int8"]["errors"].values()) <= manifest["int8"]["max_error"]
    runner = ExportedModel(int8)
    assert runner.precision == "int8"
    queries = pixels(model, toy[1]).numpy()
    expected, actual = ExportedModel(float32)(queries), runner(queries)
    errors = int8_error(expected, actual)
    assert errors["image_scores"] <= INT8_PARITY, errors
    assert errors.get("anomaly_maps", 0) <= parity_bound(method), errors
    # quantised, not the float32 graph again: the outputs moved
    assert any(not np.array_equal(actual[name], expected[name]) for name in expected)
    for batch in (1, 6):  # the batch size is still free
        assert runner(queries[:batch])["image_scores"].shape == (batch,)


def test_int8_error_above_the_bound_falls_back_to_float32_or_is_refused(int8_exports, toy, tmp_path):
    model, bank, _, _ = int8_exports("winclip")
    with pytest.warns(UserWarning, match="exceeds the bound 1e-09: exporting float32 instead"):
        folder = export_model(model, bank, tmp_path / "fallback", "onnx", "int8", toy[0], max_int8_error=1e-9)
    manifest = run_exported.read_manifest(folder)
    assert manifest["precision"] == "float32" and manifest["int8"]["fell_back_to_float32"]
    assert max(manifest["int8"]["errors"].values()) > 1e-9  # the measured error is recorded
    assert_parity(model, bank, ExportedModel(folder), pixels(model, toy[1][:2]))  # the float32 graph
    with pytest.raises(ValueError, match="This export holds a float32 graph .*int8 quantisation fell back"):
        ExportedModel(folder, precision="int8")
    with pytest.raises(ValueError, match="exceeds the bound 1e-09; not exported"):
        export_model(model, bank, tmp_path / "strict", "onnx", "int8", toy[0], 1e-9, strict_precision=True)
    assert not (tmp_path / "strict").exists()


def test_an_int8_export_runs_at_int8_only(int8_exports):
    _, _, float32, int8 = int8_exports("winclip")
    with pytest.raises(ValueError, match="holds an int8 graph: it runs at precision int8, not float32"):
        ExportedModel(int8, precision="float32")
    with pytest.raises(ValueError, match="export with --precision int8"):
        ExportedModel(float32, precision="int8")
    assert ExportedModel(float32, precision="f32").precision == "float32"  # the earlier runner's name


def test_int8_export_needs_images_and_is_cached_in_a_folder_of_its_own(
    int8_exports, toy, tmp_path, monkeypatch
):
    model, bank, _, _ = int8_exports("winclip")
    with pytest.raises(ValueError, match="calibrates its quantiser on images"):
        export_model(model, bank, tmp_path / "no_images", "onnx", "int8")
    position_tiled = dataclasses.replace(bank, tiling=Tiling(32, mode="position", image_size=(64, 64)))
    with pytest.raises(ValueError, match="int8 export of a position-tiled bank is not supported"):
        export_model(model, position_tiled, tmp_path / "position", "onnx", "int8", toy[0])
    made = []

    def write_manifest_only(model, bank, folder, export_format, precision, images):
        made.append((precision, images))
        folder.mkdir(parents=True)
        (folder / run_exported.MANIFEST_FILE).write_text("{}")
        return folder

    monkeypatch.setattr("hf_fsad.export.export_model", write_manifest_only)
    float32 = cached_export(model, bank, "onnxruntime", tmp_path)
    int8 = cached_export(model, bank, "onnxruntime", tmp_path, "int8", toy[0])
    other_images = cached_export(model, bank, "onnxruntime", tmp_path, "int8", toy[1][:2])
    assert len({float32, int8, other_images}) == 3 and int8.name.startswith("winclip-onnxruntime-int8-")
    assert cached_export(model, bank, "onnxruntime", tmp_path, "int8", toy[0]) == int8  # reused
    assert [precision for precision, _ in made] == ["float32", "int8", "int8"]


def test_runner_cli_scores_an_int8_export_and_refuses_another_precision(int8_exports, toy, tmp_path, capsys):
    model, _, _, int8 = int8_exports("winclip")
    paths = _write_images(tmp_path / "images", toy[1])
    output = tmp_path / "results.jsonl"
    argv = [str(int8), str(tmp_path / "images"), "--output", str(output)]
    assert run_exported.main([*argv, "--precision", "int8"]) == 0
    expected = ExportedModel(int8)(pixels(model, toy[1]).numpy())["image_scores"]
    records = _records(output)
    assert [record["path"] for record in records] == [str(path) for path in paths]
    np.testing.assert_allclose([record["score"] for record in records], expected, rtol=0, atol=PARITY)
    assert run_exported.main([*argv, "--precision", "bfloat16"]) == 2
    assert "holds an int8 graph: it runs at precision int8, not bfloat16" in capsys.readouterr().err


def test_export_cli_writes_an_int8_export_with_its_measured_error(saved_winclip_dir, toy, tmp_path, capsys):
    references = _write_images(tmp_path / "good", toy[0])
    # the tiny random model's int8 error (0.17 of the spread on its calibration images) is above the default
    # bound, set for paper-sized towers; 0.5 lets it export at int8
    argv = ["export", "--model", saved_winclip_dir, "--out", str(tmp_path / "out"), "--max-int8-error", "0.5"]
    argv += ["--precision", "int8"]
    assert cli_main(argv) == 2
    assert "give --reference" in capsys.readouterr().err
    assert cli_main([*argv, "--reference", str(tmp_path / "good")]) == 0
    manifest = run_exported.read_manifest(tmp_path / "out")
    assert manifest["precision"] == "int8"
    error = max(manifest["int8"]["errors"].values())
    assert f"(onnx, int8; int8 error {error:.3g} (bound 0.5)) -> " in capsys.readouterr().err
    assert (
        cli_main(
            [*argv, "--reference", *map(str, references), "--max-int8-error", "1e-9", "--strict-precision"]
        )
        == 2
    )
    assert "not exported" in capsys.readouterr().err


def test_score_cli_at_int8_calibrates_on_the_int8_graph(saved_winclip_dir, toy, tmp_path, monkeypatch):
    """The thresholds are fitted on the held-out normals as the int8 graph scores them, and recorded as int8."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    # the tiny random model's int8 error is above the default bound, set for paper-sized towers
    monkeypatch.setattr("hf_fsad.quantization.DEFAULT_MAX_INT8_ERROR", 0.5)
    references = _write_images(tmp_path / "good", toy[0])
    _write_images(tmp_path / "queries", toy[1])
    held_out = _write_images(tmp_path / "held_out", toy[1][:3])
    saved = tmp_path / "bank.safetensors"
    argv = ["score", str(tmp_path / "queries"), "--model", saved_winclip_dir, "--runtime", "onnxruntime"]
    argv += ["--precision", "int8", "--reference", *map(str, references), "--save-bank", str(saved)]
    argv += ["--calibration-normal", *map(str, held_out), "--output", str(tmp_path / "int8.jsonl")]
    assert cli_main(argv) == 0
    calibration = ReferenceBank.load(saved).calibration
    assert (calibration.runtime, calibration.precision) == ("onnxruntime", "int8")
    (folder,) = (tmp_path / "home" / ".cache" / "hf_fsad" / "exports").iterdir()
    assert folder.name.startswith("winclip-onnxruntime-int8-")
    assert run_exported.read_manifest(folder)["precision"] == "int8"
    # the thresholds are those the int8 graph's outputs on the held-out normals give, not the float32 graph's
    held_out_pixels = pixels_of_files(saved_winclip_dir, held_out)
    for precision, close in (("int8", True), ("float32", False)):
        folder = (
            folder if precision == "int8" else export_model(model_of(saved_winclip_dir), None, tmp_path / "f")
        )
        outputs = ExportedModel(folder)(held_out_pixels)
        fitted = fit_calibration(
            torch.from_numpy(outputs["image_scores"]),
            torch.from_numpy(outputs["anomaly_maps"]),
            normal_source="held_out",
            false_alarm_rate=0.05,
        )
        assert (fitted.image_threshold == pytest.approx(calibration.image_threshold, abs=1e-6)) is close


def model_of(model_dir: str):
    return method_spec("winclip").model.from_pretrained(model_dir)


def pixels_of_files(model_dir: str, paths) -> np.ndarray:
    from PIL import Image

    model = model_of(model_dir)
    with torch.no_grad():
        return pixels(model, [Image.open(path).convert("RGB") for path in paths]).numpy()


def test_manifest_of_a_float32_export_says_float32(int8_exports):
    _, _, float32, _ = int8_exports("winclip")
    manifest = json.loads((float32 / run_exported.MANIFEST_FILE).read_text())
    assert (manifest["precision"], manifest["int8"]) == ("float32", None)
