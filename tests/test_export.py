"""ONNX / OpenVINO export: the exported graph scores as the PyTorch model does, the manifest carries what the
torch-free runner needs, and the runner preprocesses, decides and draws as hf_fsad does."""

from __future__ import annotations

import ast
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from extras import import_extra
from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import apply_calibration, exceeds_threshold
from hf_fsad.cli import main as cli_main
from hf_fsad.data import load_toy
from hf_fsad.deploy import run_exported
from hf_fsad.deploy.image_files import LABEL_NAMES
from hf_fsad.export import RUNNER_MODULES, ExportedModel, cached_export, export_model
from hf_fsad.pipeline import resized_map
from hf_fsad.registry import METHODS, method_spec
from hf_fsad.visualization import heatmap_overlay, outline_region
from model_tester import method_tester
from test_bad_inputs import _make_inputs
from test_method_contract import tiny_model

import_extra("onnxruntime", "export")
import_extra("openvino", "export")

# The methods whose class declares no `export_refusal`, and those that say why they cannot export.
EXPORTED_METHODS = sorted(name for name, spec in METHODS.items() if spec.model.export_refusal is None)
REFUSED_METHODS = sorted(set(METHODS) - set(EXPORTED_METHODS))
# The parity bound. Measured: <= 4e-6 on these models (float32 sums in another order).
PARITY = 1e-4
REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy():
    """Toy stripes: 2 normal training images (references), 3 normal and 3 anomalous test images (queries)."""
    dataset = load_toy("stripes", num_train=2, num_test_good=3, num_test_anomalous=3)
    return list(dataset["train"]["image"]), list(dataset["test"]["image"]), list(dataset["test"]["mask"])


def pixels(model, images) -> torch.Tensor:
    return model.image_processor()(images, return_tensors="pt").pixel_values


def toy_bank(model, toy):
    """A 2-shot bank of the toy references (with one anomalous toy image and its mask where the method
    needs anomalous references; VTFusion: fitted on them for 2 steps, its bank holds no references)."""
    references, queries, masks = toy
    if model.fits_per_category:
        model.fit(references, class_name="stripes", steps=2)
        return model.build_reference_bank()
    anomalous = {}
    if model.needs_anomalous_references:
        mask = torch.from_numpy(np.asarray(masks[-1]) > 0)[None]
        anomalous = {"anomalous_pixel_values": pixels(model, queries[-1:]), "anomalous_masks": mask}
    with torch.no_grad():
        return model.build_reference_bank(pixels(model, references), **anomalous)


def calibrated_bank(model, bank, toy):
    """`bank` calibrated leave-one-out on its 2 toy references (too few for 5 %: calibrate warns)."""
    with pytest.warns(UserWarning, match="cannot guarantee"):
        return model.calibrate(bank, pixels(model, toy[0]))


@pytest.fixture(scope="module")
def exported(toy, tmp_path_factory, request):
    """method -> (model, bank, ONNX export folder), exported once per module."""
    cache = {}

    def get(method: str):
        if method not in cache:
            model = tiny_model(method, request)
            bank = toy_bank(model, toy)
            cache[method] = model, bank, export_model(model, bank, tmp_path_factory.mktemp(method) / "onnx")
        return cache[method]

    return get


def assert_parity(model, bank, runner: ExportedModel, queries: torch.Tensor) -> None:
    with torch.no_grad():
        expected = model(queries, reference_bank=bank)
    outputs = runner(queries.numpy())
    np.testing.assert_allclose(outputs["image_scores"], expected.image_scores.numpy(), rtol=0, atol=PARITY)
    if expected.anomaly_maps is None:
        assert runner.output_names == ["image_scores"]
    else:
        np.testing.assert_allclose(
            outputs["anomaly_maps"], expected.anomaly_maps.numpy(), rtol=0, atol=PARITY
        )


@pytest.mark.parametrize("method", EXPORTED_METHODS)
def test_onnx_scores_and_maps_equal_pytorch_on_toy_images_at_two_batch_sizes(method, exported, toy):
    model, bank, folder = exported(method)
    runner = ExportedModel(folder)
    assert runner.runtime == "onnxruntime"
    queries = pixels(model, toy[1])
    for batch in (1, 6):  # traced with 2: neither size is baked in
        assert_parity(model, bank, runner, queries[:batch])
    # the anomalous toy images score differently from the normal ones: the graph does not return constants
    assert len(set(np.round(runner(queries.numpy())["image_scores"], 6))) > 1


@pytest.mark.slow  # a second trace per method, then OpenVINO's conversion: ~8 s each
@pytest.mark.parametrize("method", EXPORTED_METHODS)
def test_openvino_scores_and_maps_equal_pytorch_at_two_batch_sizes(method, exported, toy, tmp_path):
    model, bank, _ = exported(method)
    folder = export_model(model, bank, tmp_path / "openvino", format="openvino")
    assert sorted(path.name for path in folder.iterdir()) == [
        "hf_fsad_export.json",
        "image_files.py",
        "model.bin",
        "model.xml",
        "regions.py",
        "run_exported.py",
        "tiling.py",
    ]
    runner = ExportedModel(folder)
    assert (runner.runtime, runner.precision) == ("openvino", "float32")
    queries = pixels(model, toy[1])
    for batch in (1, 6):
        assert_parity(model, bank, runner, queries[:batch])


def test_manifest_carries_preprocessing_outputs_and_the_calibration(exported, toy, tmp_path):
    model, bank, folder = exported("winclip")
    manifest = run_exported.read_manifest(folder)
    assert manifest["calibration"] is None  # an uncalibrated bank
    processor = model.image_processor().to_dict()
    assert manifest["image_processor"]["size"] == processor["size"] == {"height": 240, "width": 240}
    assert manifest["image_processor"]["image_mean"] == list(model.config.image_mean)
    assert manifest["image_processor"]["resample"] == int(Image.Resampling.BICUBIC)
    assert (manifest["model_type"], manifest["class_name"], manifest["k"]) == ("winclip", bank.class_name, 2)
    assert manifest["output_names"] == ["image_scores", "anomaly_maps"]

    calibrated = calibrated_bank(model, bank, toy)
    calibrated_folder = export_model(model, calibrated, tmp_path / "calibrated")
    calibration = run_exported.read_manifest(calibrated_folder)["calibration"]
    assert calibration == json.loads(calibrated.calibration.to_json())
    queries = pixels(model, toy[1])
    with torch.no_grad():
        expected = apply_calibration(
            model.score_features(model.encode_images(queries), calibrated), calibrated.calibration
        )
    scores = ExportedModel(calibrated_folder)(queries.numpy())["image_scores"]
    # normalised scores: 1/2 + z / (2 (1 + |z|)), z = (score - threshold) / scale, moves by at most
    # PARITY / (2 * scale) when the scores agree to PARITY
    np.testing.assert_allclose(
        run_exported.normalized_scores(scores, calibration),
        expected.normalized_scores.numpy(),
        atol=PARITY / (2 * calibration["image_scale"]) + 1e-7,  # + float32 rounding of a value in (0, 1)
    )
    assert run_exported.labels(scores, calibration).tolist() == expected.labels.tolist()


def test_runner_preprocessing_equals_the_model_processor_exactly(exported, toy):
    model, _, _ = exported("winclip")
    image = toy[1][-1].resize((300, 200))  # not square: the crop geometry matters
    for crop in (False, True):
        processor = model.image_processor(crop=crop)
        settings = json.loads(json.dumps({**processor.to_dict(), "resample": int(processor.resample)}))
        expected = processor(image, return_tensors="np").pixel_values[0]
        assert np.array_equal(run_exported.preprocess(image, settings), expected)


def test_runner_heatmap_is_hf_fsads_and_its_colours_are_matplotlibs_jet(toy):
    """One drawing for hf_fsad and the runner (shipped without matplotlib): its colour table is matplotlib's
    256-entry jet, entry for entry, and a non-finite value is drawn at the top of the scale."""
    from matplotlib import colormaps

    assert heatmap_overlay is run_exported.heatmap_overlay
    matplotlib_jet = (colormaps["jet"](np.arange(256))[:, :3] * 255).astype(np.uint8)
    assert np.array_equal(run_exported.jet_lookup(), matplotlib_jet)
    image = toy[1][-1]
    anomaly_map = np.random.default_rng(0).random((240, 240)).astype(np.float32)
    anomaly_map[:120] = np.nan
    drawn = np.asarray(run_exported.heatmap_overlay(image, anomaly_map, alpha=1.0))
    inside_the_nan_half = drawn[: image.height * 2 // 5]
    assert (inside_the_nan_half == matplotlib_jet[255]).all()  # the top colour


@pytest.mark.parametrize("method", REFUSED_METHODS)
def test_methods_left_out_are_refused_with_their_reason(method, tmp_path):
    model = method_tester(method).tiny_model()  # unfitted: refused before anything else is read
    reason = model.export_refusal
    with pytest.raises(ValueError, match=f"{method} cannot be exported: {reason[:30]}"):
        export_model(model, None, tmp_path / method)


def test_the_deprecated_table_of_refusals_is_read_from_the_classes():
    with pytest.warns(DeprecationWarning, match=r"use `<model class>\.export_refusal`"):
        from hf_fsad.export import NOT_EXPORTABLE
    assert NOT_EXPORTABLE == {method: METHODS[method].model.export_refusal for method in REFUSED_METHODS}


def test_export_refuses_a_bank_of_another_model(exported, make_winclip, tmp_path):
    _, bank, _ = exported("winclip")
    with pytest.raises(ValueError, match="another config or backbone"):
        export_model(make_winclip(seed=1), bank, tmp_path / "other")
    assert not (tmp_path / "other").exists()


def test_cached_export_exports_once_per_model_bank_and_runtime(exported, toy, tmp_path, monkeypatch):
    model, bank, _ = exported("winclip")
    first = cached_export(model, bank, "onnxruntime", tmp_path)
    manifest_time = (first / "hf_fsad_export.json").stat().st_mtime_ns
    monkeypatch.setattr("hf_fsad.export.export_model", lambda *args: pytest.fail("exported again"))
    assert cached_export(model, bank, "onnxruntime", tmp_path) == first
    assert (first / "hf_fsad_export.json").stat().st_mtime_ns == manifest_time
    monkeypatch.undo()
    calibrated = cached_export(model, calibrated_bank(model, bank, toy), "onnxruntime", tmp_path)
    assert calibrated != first and run_exported.read_manifest(calibrated)["calibration"] is not None
    assert_parity(model, bank, ExportedModel(first), pixels(model, toy[1][:2]))


def test_the_export_cache_key_covers_the_config_and_every_bank_tensor(
    make_winclip, toy, tmp_path, monkeypatch
):
    """A bank that differs from another only in its tensors, and a model that differs only in a scoring config
    field (same weights, so the same bank tensors), each get an export folder of their own."""

    def write_manifest_only(model, bank, folder, *export_options):
        folder.mkdir(parents=True)
        (folder / run_exported.MANIFEST_FILE).write_text("{}")
        return folder

    monkeypatch.setattr("hf_fsad.export.export_model", write_manifest_only)
    model, hotter = make_winclip(), make_winclip(temperature=0.5)
    references = pixels(model, toy[0])
    with torch.no_grad():
        bank = model.build_reference_bank(references)
        mirrored_bank = model.build_reference_bank(references.flip(-1))  # same class, k and calibration
        hotter_bank = hotter.build_reference_bank(references)
    assert bank.tensors.keys() == hotter_bank.tensors.keys()
    assert all(torch.equal(tensor, hotter_bank.tensors[name]) for name, tensor in bank.tensors.items())
    pairs = [(model, bank), (model, mirrored_bank), (hotter, hotter_bank)]
    folders = {cached_export(scorer, its_bank, "onnxruntime", tmp_path) for scorer, its_bank in pairs}
    assert len(folders) == 3


def test_cli_exports_a_saved_model_and_bank(saved_winclip_dir, toy, tmp_path, capsys):
    model = method_spec("winclip").model.from_pretrained(saved_winclip_dir)
    bank = toy_bank(model, toy)
    bank.save(tmp_path / "bank.safetensors")
    argv = ["export", "--model", saved_winclip_dir, "--bank", str(tmp_path / "bank.safetensors")]
    assert cli_main([*argv, "--format", "onnx", "--out", str(tmp_path / "out")]) == 0
    assert_parity(model, bank, ExportedModel(tmp_path / "out"), pixels(model, toy[1][:2]))
    assert cli_main([*argv[:3], "--bank", str(tmp_path / "missing"), "--out", str(tmp_path / "x")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _runtime_interpreter() -> str:
    interpreter = os.environ.get("HF_FSAD_RUNTIME_PYTHON", str(REPOSITORY / ".venv-runtime/bin/python"))
    if not Path(interpreter).is_file():
        pytest.fail(
            f"No runtime interpreter at {interpreter}: run `make install-runtime` (or `make test-runtime`)."
        )
    assert (
        subprocess.run([interpreter, "-c", "import torch"], check=False, capture_output=True).returncode != 0
    )
    return interpreter


def _run_runner(
    folder: Path, *arguments: str, interpreter: str = sys.executable
) -> subprocess.CompletedProcess:
    """The runner copied into the export `folder`, run as a script (so it imports only the files beside it)."""
    command = [interpreter, str(folder / "run_exported.py"), str(folder), *arguments]
    return subprocess.run(
        command, check=False, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
    )


def _skipped_lines(stderr: str) -> list[str]:
    return sorted(line for line in stderr.splitlines() if line.startswith("skipped "))


@pytest.mark.runtime
def test_runner_scores_image_files_in_an_environment_without_torch(exported, toy, tmp_path):
    """run_exported.py and image_files.py, copied into the export, run by the interpreter of `.venv-runtime`
    (numpy, Pillow, onnxruntime, openvino; no torch), on image files and on every bad input `hf-fsad score`
    survives (tests/test_bad_inputs.py): each bad one is skipped with the CLI's reason and the run goes on;
    the good ones get the CLI's records, with hf_fsad's scores, labels, normalised scores and heatmaps."""
    interpreter = _runtime_interpreter()
    model, bank, _ = exported("winclip")
    calibrated = calibrated_bank(model, bank, toy)
    folder = export_model(model, calibrated, tmp_path / "export", format="openvino")
    paths = _write_images(tmp_path / "images", toy[1])
    bad_inputs = _make_inputs(tmp_path / "bad_inputs")
    output, heatmaps = tmp_path / "results.jsonl", tmp_path / "heatmaps"
    completed = _run_runner(
        folder, str(tmp_path / "images"), *(str(path) for path, _ in bad_inputs.values()),
        "--output", str(output), "--heatmaps", str(heatmaps), "--max-pixels", "100000", "--batch-size", "3",
        interpreter=interpreter,
    )  # fmt: skip
    assert completed.returncode == 0 and "Traceback" not in completed.stderr, completed.stderr
    results = _records(output)
    assert [Path(result["path"]).name for result in results[: len(paths)]] == [path.name for path in paths]
    scored = {name for name, (_, reason) in bad_inputs.items() if reason is None}
    assert {Path(result["path"]).name for result in results[len(paths) :]} == scored
    for name, (path, reason) in bad_inputs.items():
        if reason is not None:
            assert re.search(f"skipped input {re.escape(str(path))}: [^\n]*{reason}", completed.stderr), name

    results = results[: len(paths)]
    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        expected = model(pixels(model, images), reference_bank=calibrated)
    scores = np.array([result["score"] for result in results])
    np.testing.assert_allclose(scores, expected.image_scores.numpy(), rtol=0, atol=PARITY)
    assert [result["label"] for result in results] == [LABEL_NAMES[label] for label in expected.labels]
    assert {result["threshold"] for result in results} == {calibrated.calibration.image_threshold}
    np.testing.assert_allclose(
        [result["normalized_score"] for result in results],
        expected.normalized_scores.numpy(),
        atol=PARITY / (2 * calibrated.calibration.image_scale) + 1e-7,  # as in the manifest test
    )
    calibration = json.loads(calibrated.calibration.to_json())
    for result, image, anomaly_map in zip(results, images, expected.anomaly_maps.numpy()):
        drawn = np.asarray(Image.open(result["heatmap"]), dtype=np.int16)
        # maps agreeing to PARITY change a colour-table index rarely, and then by one entry (a few levels)
        reference = run_exported.heatmap(image, anomaly_map, calibration)  # the CLI's drawing: test below
        difference = np.abs(drawn - np.asarray(reference, dtype=np.int16))
        assert (difference > 0).mean() < 0.01 and difference.max() <= 8


def test_runner_imports_only_numpy_pillow_the_runtimes_and_the_standard_library():
    imported = set()
    for module in RUNNER_MODULES:
        for node in ast.walk(ast.parse(Path(module.__file__).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(node.module.split(".")[0])
    # image_files, regions, tiling: the copies beside run_exported.py in an export
    assert imported - set(sys.stdlib_module_names) == {
        "numpy",
        "PIL",
        "onnxruntime",
        "openvino",
        "image_files",
        "regions",
        "tiling",
    }


@pytest.mark.parametrize("size", [(300, 200), (7, 500), (1, 1)])  # up, down and mixed; one pixel
def test_runner_resizes_maps_and_outlines_the_pixel_threshold_as_the_cli_does(toy, size):
    """The runner's heatmap is `hf-fsad score`'s: the overlay with the region above the calibrated pixel
    threshold outlined, the map brought to the image's size as `pipeline.resized_map` (torch) does."""
    anomaly_map = np.random.default_rng(0).random((24, 24)).astype(np.float32)
    expected_map = resized_map(torch.from_numpy(anomaly_map), size)
    # torch rounds its float32 weights in another order: measured up to 8e-7 on values in [0, 1); Pillow's
    # bilinear resize, which antialiases when it shrinks, is 0.4 off at (7, 500) and (1, 1)
    np.testing.assert_allclose(run_exported.resized_map(anomaly_map, size), expected_map, atol=1e-6)
    image = toy[1][-1].resize(size)
    region = exceeds_threshold(torch.from_numpy(expected_map), 0.5).numpy()  # `Calibration.masks`
    expected = outline_region(heatmap_overlay(image, anomaly_map), region)
    drawn = run_exported.heatmap(image, anomaly_map, {"pixel_threshold": 0.5})
    assert np.array_equal(np.asarray(drawn), np.asarray(expected))
    assert not np.array_equal(np.asarray(expected), np.asarray(heatmap_overlay(image, anomaly_map)))


def test_runner_resizes_a_map_that_is_not_square_to_float32():
    anomaly_map = np.random.default_rng(1).random((12, 20))  # float64, 12 rows by 20 columns
    expected_map = resized_map(torch.from_numpy(anomaly_map.astype(np.float32)), (50, 30))
    resized = run_exported.resized_map(anomaly_map, (50, 30))
    assert resized.dtype == np.float32 and resized.shape == (30, 50)
    # as above: torch's float32 weights rounded in another order, up to 8e-7 on values in [0, 1)
    np.testing.assert_allclose(resized, expected_map, atol=1e-6)


def test_runner_writes_the_records_hf_fsad_score_writes(saved_winclip_dir, toy, tmp_path):
    """The same model, calibrated bank and images through `hf-fsad score` and the exported runner: the same
    records (keys in order, paths, labels, threshold; scores within the export's parity) and heatmaps."""
    model = method_spec("winclip").model.from_pretrained(saved_winclip_dir)
    bank = calibrated_bank(model, toy_bank(model, toy), toy)
    assert bank.calibration.pixel_threshold is not None  # so the heatmaps carry the outline
    bank.save(tmp_path / "bank.safetensors")
    folder = export_model(model, bank, tmp_path / "export")
    _write_images(tmp_path / "queries", toy[1])
    argv = [
        "score",
        str(tmp_path / "queries"),
        "--model",
        saved_winclip_dir,
        "--bank",
        str(tmp_path / "bank.safetensors"),
    ]
    assert (
        cli_main([*argv, "--output", str(tmp_path / "cli.jsonl"), "--heatmaps", str(tmp_path / "cli")]) == 0
    )
    runner = _run_runner(
        folder,
        str(tmp_path / "queries"),
        "--output",
        str(tmp_path / "runner.jsonl"),
        "--heatmaps",
        str(tmp_path / "runner"),
    )
    assert runner.returncode == 0, runner.stderr
    expected, actual = _records(tmp_path / "cli.jsonl"), _records(tmp_path / "runner.jsonl")
    assert [list(record) for record in actual] == [list(record) for record in expected]
    assert [record["path"] for record in actual] == [record["path"] for record in expected]
    threshold = bank.calibration.image_threshold
    for record, reference in zip(actual, expected):
        assert record["threshold"] == reference["threshold"] == threshold and record["branch_scores"] == {}
        assert record["score"] == pytest.approx(reference["score"], abs=PARITY)
        # normalised scores move by at most PARITY / (2 * scale) when the scores agree to PARITY
        assert record["normalized_score"] == pytest.approx(
            reference["normalized_score"], abs=PARITY / (2 * bank.calibration.image_scale) + 1e-7
        )
        if abs(reference["score"] - threshold) > PARITY:  # a score this near the threshold may flip
            assert record["label"] == reference["label"]
        assert Path(record["heatmap"]).name == Path(reference["heatmap"]).name
        drawn = np.asarray(Image.open(record["heatmap"]), dtype=np.int16)
        difference = np.abs(drawn - np.asarray(Image.open(reference["heatmap"]), dtype=np.int16))
        # maps agreeing to PARITY change a colour-table index rarely (by one entry, a few levels), and move
        # the outline only where the map lies within PARITY of the pixel threshold
        assert (difference > 0).mean() < 0.01 and (difference > 8).mean() < 0.001
        # defect regions: the pixels above the pixel threshold, as the outline; their highest peak within PARITY
        assert (record["regions"] is None) == (reference["regions"] is None)
        if record["regions"] and reference["regions"]:
            peaks = record["regions"][0]["peak_score"], reference["regions"][0]["peak_score"]
            assert peaks[0] == pytest.approx(peaks[1], abs=PARITY)


def test_a_terminated_runner_keeps_whole_records_and_resume_finishes_them(exported, tmp_path):
    """Like `hf-fsad score`: SIGTERM ends the run with the records so far written whole into --output (exit
    130); --resume keeps them, scores only the rest, and finds nothing left to score the next time."""
    _, _, folder = exported("winclip")
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for index in range(150):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(inputs / f"{index:03d}.png")
    output = tmp_path / "results.jsonl"
    earlier = {"path": "earlier.png", "score": 0.5, "branch_scores": {}, "heatmap": None}
    output.write_text(json.dumps(earlier) + "\n")
    command = [sys.executable, str(folder / "run_exported.py"), str(folder), str(inputs)]
    command += ["--output", str(output), "--resume", "--batch-size", "1", "--threads", "1"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    partial = tmp_path / "results.jsonl.tmp"  # written as the batches are scored
    deadline = time.monotonic() + 120
    while not (partial.exists() and partial.read_text().count("\n") >= 3) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "run again with --resume" in stderr, stderr
    first = _records(output)  # every line whole
    assert first[0] == earlier and 3 <= len(first) < 151
    assert not list(tmp_path.glob("*.tmp"))

    resumed = _run_runner(folder, str(inputs), "--output", str(output), "--resume")
    assert resumed.returncode == 0 and f"resuming: {len(first) - 1} inputs already in" in resumed.stderr
    final = _records(output)
    assert final[: len(first)] == first  # what the terminated run saved is kept as it was
    assert sorted(record["path"] for record in final[1:]) == sorted(str(path) for path in inputs.iterdir())

    again = _run_runner(folder, str(inputs), "--output", str(output), "--resume")
    assert again.returncode == 0 and "scored 0 of 0 images" in again.stderr and _records(output) == final


def test_runner_refuses_to_start_with_exit_status_2_naming_the_problem(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # nothing can be created under a regular file
    script = [sys.executable, run_exported.__file__, str(tmp_path), str(tmp_path)]
    for arguments, message in [
        (
            ["--output", str(blocker / "out.jsonl")],
            f"error: --output {blocker / 'out.jsonl'} cannot be written",
        ),
        (["--heatmaps", str(blocker / "maps")], f"error: --heatmaps {blocker / 'maps'} cannot be written"),
        ([], f"error: {tmp_path} is not an hf_fsad export"),
    ]:
        result = subprocess.run([*script, *arguments], check=False, capture_output=True, text=True)
        assert result.returncode == 2 and message in result.stderr and "Traceback" not in result.stderr


def _write_images(folder: Path, images) -> list[Path]:
    folder.mkdir(parents=True)
    for index, image in enumerate(images):
        image.save(folder / f"{index}.png")
    return sorted(folder.glob("*.png"))


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_score_cli_on_an_exported_runtime_scores_and_decides_as_pytorch(
    runtime, saved_winclip_dir, toy, tmp_path, monkeypatch
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # the export cache lives under ~/.cache
    references = _write_images(tmp_path / "good", toy[0])
    _write_images(tmp_path / "queries", toy[1])
    held_out = _write_images(tmp_path / "held_out", toy[1][:3])  # the normal queries

    def score(name: str, *options: str) -> list[dict]:
        argv = ["score", str(tmp_path / "queries"), "--model", saved_winclip_dir]
        argv += ["--reference", *map(str, references), "--heatmaps", str(tmp_path / name)]
        argv += ["--calibration-normal", *map(str, held_out)]
        assert cli_main([*argv, "--output", str(tmp_path / f"{name}.jsonl"), *options]) == 0
        return _records(tmp_path / f"{name}.jsonl")

    saved = tmp_path / "bank.safetensors"
    expected, actual = score("torch"), score("exported", "--runtime", runtime, "--save-bank", str(saved))
    assert ReferenceBank.load(saved).calibration.runtime == runtime
    assert [record["path"] for record in actual] == [record["path"] for record in expected]
    np.testing.assert_allclose(
        [record["score"] for record in actual], [record["score"] for record in expected], rtol=0, atol=PARITY
    )
    threshold = expected[0]["threshold"]
    # calibrated on the held-out normals as the runtime scores them: the same order statistic within parity
    assert len({record["threshold"] for record in actual}) == 1
    assert actual[0]["threshold"] == pytest.approx(threshold, abs=PARITY)
    for record, reference in zip(actual, expected):
        if abs(reference["score"] - threshold) > PARITY:  # a score this near the threshold may flip
            assert record["label"] == reference["label"]
        assert record["branch_scores"] == {} and Path(record["heatmap"]).is_file()
    (folder,) = (tmp_path / "home" / ".cache" / "hf_fsad" / "exports").iterdir()
    assert folder.name.startswith(f"winclip-{runtime}-")
    made = (folder / run_exported.MANIFEST_FILE).stat().st_mtime_ns
    assert score("again", "--runtime", runtime) == [
        record | {"heatmap": str(tmp_path / "again" / Path(record["heatmap"]).name)} for record in actual
    ]
    assert (folder / run_exported.MANIFEST_FILE).stat().st_mtime_ns == made  # reused, not exported again


def test_score_cli_refuses_a_calibration_fitted_in_pytorch_on_an_exported_runtime(
    saved_winclip_dir, toy, tmp_path, monkeypatch, capsys
):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    references = _write_images(tmp_path / "good", toy[0])
    argv = ["score", str(references[0]), "--model", saved_winclip_dir, "--runtime", "onnxruntime"]
    assert cli_main([*argv, "--reference", *map(str, references), "--output", str(tmp_path / "o.jsonl")]) == 2
    assert (
        "error: calibration: the bank's calibration was fitted on torch at float32, but the images are scored "
        "on onnxruntime at float32; give held-out --calibration-normal images to calibrate on onnxruntime "
        "(its graph has the bank built in: leave-one-out would take one export per reference), or "
        "--no-calibration"
    ) in capsys.readouterr().err
    assert not (tmp_path / "home").exists()  # refused before anything was exported


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--device", "cuda"], "runs on the CPU"),
        (["--compile"], "compiled by its runtime"),
        (["--precision", "bfloat16"], "bfloat16 with openvino"),
        (["--precision", "float16"], "float16 is not available"),
    ],
)
def test_score_cli_refuses_options_an_exported_runtime_cannot_honour(options, message, tmp_path, capsys):
    argv = ["score", str(tmp_path), "--model", "winclip@nowhere", "--runtime", "onnxruntime", *options]
    assert cli_main([*argv, "--output", str(tmp_path / "out.jsonl")]) == 2
    assert message in capsys.readouterr().err


def test_benchmark_runner_on_an_exported_runtime_scores_as_pytorch(exported, tmp_path, monkeypatch):
    from hf_fsad.evaluation import DatasetSpec, Protocol, run_benchmark

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, _, _ = exported("winclip")
    spec = DatasetSpec(
        "toy", categories=["stripes"], options={"num_train": 5, "num_test_good": 3, "num_test_anomalous": 3}
    )
    cells = {}
    for runtime in ("torch", "onnxruntime"):
        for validation in (0, 3):
            results = run_benchmark(
                {"winclip": model},
                [spec],
                ks=[2],
                seeds=[0],
                out_dir=tmp_path / f"run{validation}",
                runtime=runtime,
                protocol=Protocol(num_validation=validation),
            )
            (cell,) = results["cells"]
            assert cell["runtime"] == runtime and results["skipped_cells"] == 0  # another runtime reruns
            cells[runtime, validation] = cell
    np.testing.assert_allclose(
        cells["onnxruntime", 0]["image_scores"], cells["torch", 0]["image_scores"], rtol=0, atol=PARITY
    )
    # Leave-one-out is fitted in PyTorch (on an export it would take one export per reference): refused there.
    assert cells["torch", 0]["calibration"]["runtime"] == "torch"
    assert cells["onnxruntime", 0]["calibration"] is None
    assert "fitted on torch" in cells["onnxruntime", 0]["calibration_note"]
    # Validation normals are scored by the graph the test images are scored by: the same threshold, within
    # the graph's parity with PyTorch (a threshold is one of the scores).
    torch_calibration, exported_calibration = (
        cells[runtime, 3]["calibration"] for runtime in ("torch", "onnxruntime")
    )
    assert (torch_calibration["runtime"], exported_calibration["runtime"]) == ("torch", "onnxruntime")
    assert exported_calibration["image_threshold"] == pytest.approx(
        torch_calibration["image_threshold"], abs=PARITY
    )
    cells = {runtime: cells[runtime, 0] for runtime in ("torch", "onnxruntime")}
    for name, value in cells["torch"]["metrics"].items():
        # threshold-free ranking metrics of 6 images: scores within PARITY order them alike unless two tie
        assert cells["onnxruntime"]["metrics"][name] == pytest.approx(value, abs=0.02), name
    # a method that declares an export refusal is refused first: nothing else of it is read
    refused = SimpleNamespace(config=SimpleNamespace(model_type="diffusing"), export_refusal="a Python loop")
    with pytest.raises(ValueError, match="diffusing cannot be exported: a Python loop"):
        run_benchmark(
            {"o": refused},
            [spec],
            ks=[2],
            seeds=[0],
            out_dir=tmp_path / "v",
            runtime="openvino",
        )
