"""ONNX / OpenVINO export: the exported graph scores as the PyTorch model does, the manifest carries what the
torch-free runner needs, and the runner preprocesses, decides and draws as hf_fsad does."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from extras import import_extra
from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import apply_calibration
from hf_fsad.cli import main as cli_main
from hf_fsad.data import load_toy
from hf_fsad.deploy import run_exported
from hf_fsad.export import ExportedModel, cached_export, export_model
from hf_fsad.registry import METHODS, method_spec
from hf_fsad.visualization import heatmap_overlay
from model_tester import method_tester
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
        "model.bin",
        "model.xml",
        "run_exported.py",
    ]
    runner = ExportedModel(folder)
    assert (runner.runtime, runner.precision) == ("openvino", "f32")
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


def test_runner_heatmap_equals_hf_fsad_heatmap_overlay(toy):
    image = toy[1][-1]
    anomaly_map = np.random.default_rng(0).random((240, 240)).astype(np.float32)
    drawn = np.asarray(run_exported.heatmap_overlay(image, anomaly_map))
    assert np.array_equal(drawn, np.asarray(heatmap_overlay(image, anomaly_map)))


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

    def write_manifest_only(model, bank, folder, export_format):
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


@pytest.mark.runtime
def test_runner_scores_image_files_in_an_environment_without_torch(exported, toy, tmp_path):
    """run_exported.py, copied into the export, run by the interpreter of `.venv-runtime` (numpy, Pillow,
    onnxruntime, openvino; no torch), on image files: its scores, normalised scores, labels and heatmaps
    equal hf_fsad's."""
    interpreter = os.environ.get("HF_FSAD_RUNTIME_PYTHON", str(REPOSITORY / ".venv-runtime/bin/python"))
    if not Path(interpreter).is_file():
        pytest.fail(
            f"No runtime interpreter at {interpreter}: run `make install-runtime` (or `make test-runtime`)."
        )
    assert (
        subprocess.run([interpreter, "-c", "import torch"], check=False, capture_output=True).returncode != 0
    )
    model, bank, _ = exported("winclip")
    calibrated = calibrated_bank(model, bank, toy)
    folder = export_model(model, calibrated, tmp_path / "export", format="openvino")
    paths = []
    for index, image in enumerate(toy[1]):
        paths.append(tmp_path / "images" / f"{index}.png")
        paths[-1].parent.mkdir(exist_ok=True)
        image.save(paths[-1])
    command = [interpreter, str(folder / "run_exported.py"), str(folder), str(tmp_path / "images")]
    command += ["--output", str(tmp_path / "results.json"), "--heatmaps", str(tmp_path / "heatmaps")]
    completed = subprocess.run(
        command, check=False, capture_output=True, text=True, env={"PATH": os.environ["PATH"]}
    )
    assert completed.returncode == 0, completed.stderr
    results = json.loads((tmp_path / "results.json").read_text())
    assert [Path(result["path"]).name for result in results] == [path.name for path in paths]

    images = [Image.open(path).convert("RGB") for path in paths]
    with torch.no_grad():
        expected = model(pixels(model, images), reference_bank=calibrated)
    scores = np.array([result["score"] for result in results])
    np.testing.assert_allclose(scores, expected.image_scores.numpy(), rtol=0, atol=PARITY)
    assert [result["label"] for result in results] == expected.labels.tolist()
    np.testing.assert_allclose(
        [result["normalized_score"] for result in results],
        expected.normalized_scores.numpy(),
        atol=PARITY / (2 * calibrated.calibration.image_scale) + 1e-7,  # as in the manifest test
    )
    for result, image, anomaly_map in zip(results, images, expected.anomaly_maps.numpy()):
        drawn = np.asarray(Image.open(result["heatmap"]), dtype=np.int16)
        # maps agreeing to PARITY change a colour-table index rarely, and then by one entry (a few levels)
        difference = np.abs(drawn - np.asarray(heatmap_overlay(image, anomaly_map), dtype=np.int16))
        assert (difference > 0).mean() < 0.01 and difference.max() <= 8


def test_runner_imports_only_numpy_pillow_the_runtimes_and_the_standard_library():
    imported = set()
    for node in ast.walk(ast.parse(Path(run_exported.__file__).read_text())):
        if isinstance(node, ast.Import):
            imported |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            imported.add(node.module.split(".")[0])
    assert imported - set(sys.stdlib_module_names) == {"numpy", "PIL", "onnxruntime", "openvino"}


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
    from hf_fsad.evaluation import DatasetSpec, run_benchmark

    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    model, _, _ = exported("winclip")
    spec = DatasetSpec(
        "toy", categories=["stripes"], options={"num_train": 4, "num_test_good": 3, "num_test_anomalous": 3}
    )
    cells = {}
    for runtime in ("torch", "onnxruntime"):
        results = run_benchmark(
            {"winclip": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "run", runtime=runtime
        )
        (cell,) = results["cells"]
        assert cell["runtime"] == runtime and results["skipped_cells"] == 0  # another runtime reruns the cell
        cells[runtime] = cell
    np.testing.assert_allclose(
        cells["onnxruntime"]["image_scores"], cells["torch"]["image_scores"], rtol=0, atol=PARITY
    )
    assert cells["onnxruntime"]["calibration"] == cells["torch"]["calibration"]
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
