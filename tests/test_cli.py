"""`hf-fsad score` and `fit`: scores match the model, bad files are reported and skipped, outputs are atomic,
options that cannot go together are refused; every option has a help text and docs/cli.md is the parser's."""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from calibration_checks import assert_same_calibration
from hf_fsad import cli
from hf_fsad.bank import ReferenceBank
from hf_fsad.cli import main
from hf_fsad.data.toy import toy_records
from hf_fsad.io import expand_inputs
from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
from hf_fsad.models.one_to_normal import training_one_to_normal
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.registry import METHODS
from hf_fsad.visualization import heatmap_overlay, mask_array

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """Two normal references and 2 good + 2 anomalous queries (one not square) as PNG files."""
    root = tmp_path_factory.mktemp("toy_files")
    splits = toy_records("stripes", num_train=2, num_test_good=2, num_test_anomalous=2, seed=3)
    (root / "refs").mkdir()
    (root / "queries").mkdir()
    for index, example in enumerate(splits["train"]):
        example.image.save(root / "refs" / f"ref{index}.png")
    queries = []
    for index, example in enumerate(splits["test"]):
        image = example.image.resize((240, 200)) if index == 0 else example.image
        path = root / "queries" / f"{example.defect_type}{index}.png"
        image.save(path)
        queries.append(path)
    return root, queries


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(model, paths):
    images = [Image.open(path).convert("RGB") for path in paths]
    return model.image_processor()(images, return_tensors="pt").pixel_values


def _expected_output(model, root, queries):
    """The model's output on `queries` in one batch, against a bank of the references under `root`."""
    with torch.no_grad():
        bank = model.build_reference_bank(_pixels(model, sorted((root / "refs").iterdir())))
        return model(_pixels(model, queries), reference_bank=bank)


def _expected_scores(model, root, queries):
    return _expected_output(model, root, queries).image_scores.tolist()


def _error_line(capsys) -> str:
    """The CLI's one `error:` line on stderr (beside it, only the progress bars of loading a model)."""
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, errors
    return errors[0]


def test_scores_match_the_model_and_bad_files_are_skipped(saved_winclip_dir, toy_files, tmp_path, capsys):
    root, queries = toy_files
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    missing = tmp_path / "missing.png"
    output = tmp_path / "results.jsonl"

    status = main(
        [
            "score",
            "--model",
            saved_winclip_dir,
            "--reference",
            str(root / "refs"),
            "--output",
            str(output),
            "--heatmaps",
            str(tmp_path / "maps"),
            "--batch-size",
            "3",
            str(queries[0]),
            str(broken),
            *map(str, queries[1:]),
            str(missing),
        ]
    )

    assert status == 0
    errors = capsys.readouterr().err
    assert f"skipped input {broken}: not an image PIL can read" in errors
    assert f"skipped input {missing}: file not found" in errors
    records = _read(output)
    assert [r["path"] for r in records] == list(map(str, queries))
    expected = _expected_output(WinClipModel.from_pretrained(saved_winclip_dir), root, queries)
    # the CLI scores in its own batches: float32 rounding ~1e-7 relative, 1e-5 bound
    assert [r["score"] for r in records] == pytest.approx(expected.image_scores.tolist(), rel=1e-5)
    # batches of 3 and 1 (the broken file skipped): every record's branch scores and heatmap are its own
    # image's, not its batch's first
    for index, record in enumerate(records):
        branch_scores = {name: float(scores[index]) for name, scores in expected.branch_scores.items()}
        assert record["branch_scores"] == pytest.approx(branch_scores, rel=1e-5)
        image = Image.open(queries[index]).convert("RGB")
        heatmap = np.asarray(Image.open(record["heatmap"]), dtype=np.int16)
        overlay = np.asarray(heatmap_overlay(image, expected.anomaly_maps[index].numpy()), dtype=np.int16)
        # the bank (2 references) is calibrated, so its pixel mask is outlined in white, which no blend of
        # jet's colours reaches (test_calibrated_cli checks the outline): compare every other pixel.
        # Rounding may move a pixel to the adjacent entry of jet's 256 colours: a channel ramps over 64
        # entries, so <= 4 levels, halved by the 0.5 blend, plus 1 of rounding
        blended = (heatmap != 255).any(axis=-1)
        assert heatmap.shape == overlay.shape and np.abs(heatmap - overlay)[blended].max() <= 3
    assert Image.open(records[0]["heatmap"]).size == (240, 200)
    assert not list(tmp_path.rglob("*.tmp"))


def test_saved_bank_reproduces_scores(saved_winclip_dir, toy_files, tmp_path):
    root, queries = toy_files
    inputs = list(map(str, queries))
    first, second, bank = tmp_path / "first.jsonl", tmp_path / "second.jsonl", tmp_path / "bank.safetensors"
    common = ["score", "--model", saved_winclip_dir, "--class-name", "tile"]
    assert (
        main(
            [
                *common,
                "--reference",
                str(root / "refs"),
                "--save-bank",
                str(bank),
                "--output",
                str(first),
                *inputs,
            ]
        )
        == 0
    )
    assert main([*common, "--bank", str(bank), "--output", str(second), *inputs]) == 0
    assert [r["score"] for r in _read(first)] == [r["score"] for r in _read(second)]


def test_bank_of_another_model_is_reported(saved_winclip_dir, toy_files, tmp_path, capsys, make_winclip):
    _, queries = toy_files
    bank = tmp_path / "other.safetensors"
    other = make_winclip(seed=7)
    with torch.no_grad():
        other.build_reference_bank(None, class_name="tile").save(bank)
    status = main(
        [
            "score",
            "--model",
            saved_winclip_dir,
            "--bank",
            str(bank),
            "--output",
            str(tmp_path / "r.jsonl"),
            str(queries[0]),
        ]
    )
    assert status == 2
    assert "another config or backbone" in capsys.readouterr().err


def test_nothing_readable_exits_nonzero(saved_winclip_dir, tmp_path, capsys):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\x00" * 10)
    output = tmp_path / "results.jsonl"
    assert main(["score", "--model", saved_winclip_dir, "--output", str(output), str(broken)]) == 1
    assert "scored 0 of 1" in capsys.readouterr().err


def test_failed_run_leaves_previous_results_untouched(saved_winclip_dir, toy_files, tmp_path, monkeypatch):
    _, queries = toy_files
    output = tmp_path / "results.jsonl"
    output.write_text("previous results\n")

    def failing_overlay(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("hf_fsad.batch_scoring.heatmap_overlay", failing_overlay)
    with pytest.raises(RuntimeError, match="disk full"):
        main(
            [
                "score",
                "--model",
                saved_winclip_dir,
                "--output",
                str(output),
                "--heatmaps",
                str(tmp_path / "maps"),
                *map(str, queries),
            ]
        )
    assert output.read_text() == "previous results\n"
    assert not list(tmp_path.rglob("*.tmp"))


def test_bad_batch_size_is_refused(capsys):
    assert main(["score", "--model", "x", "--output", "o.jsonl", "--batch-size", "0", "a.png"]) == 2
    assert "--batch-size" in capsys.readouterr().err


def test_directories_expand_to_images_only(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.JPG", "notes.txt", "sub/c.tif"):
        (tmp_path / name).write_bytes(b"")
    expanded = expand_inputs([str(tmp_path), str(tmp_path / "notes.txt")])
    assert [p.relative_to(tmp_path).as_posix() for p in expanded] == [
        "a.JPG",
        "b.png",
        "sub/c.tif",
        "notes.txt",
    ]


@pytest.mark.slow
def test_two_processes_give_the_single_process_results(saved_winclip_dir, toy_files, tmp_path):
    """torchrun with 2 CPU processes: each scores its share, the joined file equals one process's output
    (order kept; a repeated input and an unreadable file reported once, by the process that met it).

    Batches of one image, on one thread, make both runs compute every score alike, so the records are
    compared exactly: with larger batches a process's batches hold other images than the single run's,
    and float32 kernels may round a batch differently with its contents."""
    root, queries = toy_files
    broken = tmp_path / "broken.png"
    broken.write_text("not an image")
    inputs = [*map(str, queries[:2]), str(broken), str(queries[1]), *map(str, queries[2:])]

    def run(launcher: list[str], name: str) -> tuple[list[dict], str]:
        output = tmp_path / f"{name}.jsonl"
        command = [*launcher, "-m", "hf_fsad.cli", "score", "--model", saved_winclip_dir,
                   "--reference", str(root / "refs"), "--output", str(output),
                   "--heatmaps", str(tmp_path / name), "--batch-size", "1", *inputs]  # fmt: skip
        completed = subprocess.run(
            command, capture_output=True, text=True, timeout=600, check=False,
            env=os.environ | {"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        assert completed.returncode == 0, completed.stderr[-3000:]
        assert not list(tmp_path.glob(f"{name}.jsonl*.tmp"))
        return _read(output), completed.stderr

    single, single_log = run([sys.executable], "single")
    torchrun = str(Path(sys.executable).with_name("torchrun"))
    double, double_log = run([torchrun, "--standalone", "--nproc_per_node", "2"], "double")
    assert [r["path"] for r in single] == list(map(str, queries))
    for log in (single_log, double_log):
        assert log.count("listed more than once") == 1 and log.count("not an image PIL can read") == 1
    for one, two in zip(single, double, strict=True):
        assert one["heatmap"].replace("single", "double") == two["heatmap"]
        assert {**one, "heatmap": None} == {**two, "heatmap": None}


def test_method_at_clip_scores_as_the_fresh_method(tiny_clip_dir, toy_files, tmp_path):
    root, queries = toy_files
    output = tmp_path / "results.jsonl"
    model_source = f"winclip@{tiny_clip_dir}"
    arguments = ["score", "--model", model_source, "--reference", str(root / "refs"), "--output", str(output)]
    assert main([*arguments, *map(str, queries)]) == 0
    expected = _expected_scores(WinClipModel.from_clip(tiny_clip_dir), root, queries)
    # the CLI scores in its own batches: float32 rounding ~1e-7 relative, 1e-5 bound
    assert [record["score"] for record in _read(output)] == pytest.approx(expected, rel=1e-5)


@pytest.fixture(scope="module")
def defect_files(tmp_path_factory):
    """One defective image (`defects/000.png`) and its mask (`masks/000_mask.png`)."""
    root = tmp_path_factory.mktemp("defect_files")
    (example,) = toy_records("stripes", num_train=0, num_test_good=0, num_test_anomalous=1, seed=5)["test"]
    (root / "defects").mkdir()
    (root / "masks").mkdir()
    example.image.save(root / "defects" / "000.png")
    example.mask.save(root / "masks" / "000_mask.png")
    return root / "defects" / "000.png", root / "masks" / "000_mask.png"


def test_defects_build_the_anomalous_memory_bank_as_python_does(
    tiny_clip_dir, toy_files, defect_files, tmp_path
):
    root, queries = toy_files
    defect, mask = defect_files
    inputs = list(map(str, queries))
    common = ["score", "--model", f"anomalous_memory@{tiny_clip_dir}", "--reference", str(root / "refs")]
    common.append("--no-weight-search")  # the baseline weights, as the bank Python builds below
    bank_path, masked, unmasked = (
        tmp_path / "bank.safetensors",
        tmp_path / "masked.jsonl",
        tmp_path / "u.jsonl",
    )
    with_mask = ["--defect", str(defect), "--defect-mask", str(mask), "--save-bank", str(bank_path)]
    assert main([*common, *with_mask, "--output", str(masked), *inputs]) == 0

    model = AnomalousMemoryModel.from_clip(tiny_clip_dir)
    references = _pixels(model, sorted((root / "refs").iterdir()))
    defects = {
        "anomalous_pixel_values": _pixels(model, [defect]),
        "anomalous_masks": torch.from_numpy(mask_array(Image.open(mask), model.config.image_size)[None]),
    }
    with torch.no_grad():
        bank = model.build_reference_bank(references, **defects)
        expected = model(_pixels(model, queries), reference_bank=bank).image_scores
    saved = ReferenceBank.load(bank_path)
    # the same images through the same code: the same tensors, exactly
    assert saved.tensors.keys() == bank.tensors.keys()
    assert all(torch.equal(saved.tensors[name], tensor) for name, tensor in bank.tensors.items())
    # the mask put some, not all, of the defect's patches in the anomalous memory
    patches = model.config.image_size // model.config.clip_config.vision_config.patch_size
    assert saved.tensors["num_anomalous"].item() == 1
    assert 0 < saved.tensors["anomalous.patch"].shape[0] < patches**2
    # the 2 references are calibrated leave-one-out, each against a bank of the other and the defect
    with pytest.warns(UserWarning, match="2 normal scores cannot guarantee"):
        expected_calibration = model.calibrate(bank, references, bank_inputs=defects).calibration
    assert_same_calibration(saved.calibration, expected_calibration)  # other batches than the CLI's
    # the CLI scores in its own batches: float32 rounding ~1e-7 relative, 1e-5 bound
    assert [record["score"] for record in _read(masked)] == pytest.approx(expected.tolist(), rel=1e-5)

    # without its mask the whole defect is anomalous memory: other scores
    assert main([*common, "--defect", str(defect), "--output", str(unmasked), *inputs]) == 0
    without_mask = torch.tensor([record["score"] for record in _read(unmasked)])
    assert (without_mask - expected).abs().max() > 1e-3


def test_defects_and_banks_are_refused_where_they_do_not_fit(
    tiny_clip_dir, saved_winclip_dir, toy_files, defect_files, tmp_path, capsys
):
    root, queries = toy_files
    defect, mask = defect_files
    bank = tmp_path / "bank.safetensors"
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    with torch.no_grad():
        model.build_reference_bank(None, class_name="tile").save(bank)

    def score(model: str, *options: str) -> int:  # the input first: options take several paths
        return main(
            ["score", str(queries[0]), "--model", model, "--output", str(tmp_path / "r.jsonl"), *options]
        )

    assert score(f"winclip@{tiny_clip_dir}", "--reference", str(root / "refs"), "--defect", str(defect)) == 2
    assert "error: --defect: winclip builds its bank from normal references only" in _error_line(capsys)
    assert score(f"anomalous_memory@{tiny_clip_dir}", "--reference", str(root / "refs")) == 2
    assert "anomalous_memory builds its bank from defective images too" in _error_line(capsys)
    assert score(saved_winclip_dir, "--bank", str(bank), "--defect", str(defect)) == 2
    assert "--defect builds a bank from defective images, --bank reuses a built one" in _error_line(capsys)
    assert score(saved_winclip_dir, "--defect-mask", str(mask)) == 2
    assert "--defect-mask needs --defect" in _error_line(capsys)
    # the bank's class is fixed: another --class-name is refused, its own accepted
    assert score(saved_winclip_dir, "--bank", str(bank), "--class-name", "bottle") == 2
    assert "the --bank holds class 'tile'" in _error_line(capsys)
    assert score(saved_winclip_dir, "--bank", str(bank), "--class-name", "tile") == 0
    # argparse refuses a bank with references (one or the other in the usage line)
    with pytest.raises(SystemExit) as exit_info:
        score(saved_winclip_dir, "--bank", str(bank), "--reference", str(root / "refs"))
    assert exit_info.value.code == 2
    assert "error: argument --reference: not allowed with argument --bank" in capsys.readouterr().err


def test_fit_one_to_normal_takes_its_own_steps_and_diffusion_model(
    tiny_clip_dir, toy_files, tmp_path, monkeypatch
):
    """The trainer is replaced by one that records what it was given and stops: the fit itself is tested in
    tests/test_one_to_normal.py."""
    root, _ = toy_files
    given = {}

    class Stop(Exception):
        pass

    class RecordingTrainer:
        def __init__(self, model, normal_images, class_name, args, accelerator=None):
            given.update(steps=args.max_steps, diffusion=model.config.diffusion_model, class_name=class_name)
            raise Stop

    monkeypatch.setattr(training_one_to_normal, "DreamBoothLoraTrainer", RecordingTrainer)
    arguments = ["fit", "--method", "one_to_normal", "--clip", tiny_clip_dir, "--normal", str(root / "refs")]
    sd = str(tmp_path / "my-sd")
    with pytest.raises(Stop):
        main([*arguments, "--out", str(tmp_path / "fitted"), "--class-name", "grid", "--diffusion-model", sd])
    # One-to-Normal's 400 DreamBooth updates, not VTFusion's 1000
    assert given == {"steps": 400, "diffusion": sd, "class_name": "grid"}


def test_fit_refuses_what_the_method_does_not_use(tiny_clip_dir, toy_files, tmp_path, capsys):
    root, _ = toy_files
    common = [
        "fit",
        "--clip",
        tiny_clip_dir,
        "--normal",
        str(root / "refs"),
        "--out",
        str(tmp_path / "fitted"),
    ]
    one_to_normal = [*common, "--method", "one_to_normal", "--class-name", "grid"]
    missing = tmp_path / "no-such-sd"
    assert main([*one_to_normal, "--diffusion-model", str(missing)]) == 2
    expected = f"error: diffusion model {missing}: the local folder does not exist (and it is not a Hub id)."
    assert _error_line(capsys) == expected
    assert main([*one_to_normal, "--diffusion-model", tiny_clip_dir]) == 2  # a CLIP, not a diffusers folder
    assert f"diffusion model {tiny_clip_dir}: the local path has no model_index.json" in _error_line(capsys)
    assert main([*one_to_normal, "--kinds", "cutpaste"]) == 2
    assert _error_line(capsys) == "error: --kinds: one_to_normal is not fitted on synthetic anomalies"
    assert main([*common, "--method", "vtfusion", "--diffusion-model", str(missing)]) == 2
    assert _error_line(capsys) == "error: --diffusion-model: vtfusion uses no diffusion model"
    assert main([*common, "--method", "anomalous_memory"]) == 2
    assert "needs no fitting" in _error_line(capsys)
    assert not (tmp_path / "fitted").exists()


def _subcommands(parser: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    return commands.choices


def test_every_option_of_every_command_has_a_help_text():
    parser = cli.build_parser()
    undocumented = [
        f"{name} {action.dest}"
        for name, command in _subcommands(parser).items()
        for action in command._actions
        if not action.help or action.help == argparse.SUPPRESS
    ]
    assert undocumented == []
    # fit's help names the methods fitted per category
    fitted = [name for name, spec in METHODS.items() if spec.model.fits_per_category]
    assert sorted(fitted) == ["one_to_normal", "vtfusion"]
    assert "(one_to_normal, vtfusion)" in _subcommands(parser)["fit"].description


def test_docs_cli_md_is_the_parsers_help():
    spec = importlib.util.spec_from_file_location("cli_reference", REPO / "scripts" / "cli_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = module.reference()
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == text, "run `make cli-docs`"
    for name, command in _subcommands(cli.build_parser()).items():
        assert f"## `hf-fsad {name}`" in text
        assert all(option in text for action in command._actions for option in action.option_strings)


# `hf-fsad ARGS` as the console script runs it, in a fresh interpreter that then names the heavy libraries
# it loaded (sys.modules), whatever the exit status.
CONSOLE_SCRIPT = Path(sys.executable).with_name("hf-fsad")
RUN_CONSOLE_SCRIPT = f"""
import runpy, sys
sys.argv = [{str(CONSOLE_SCRIPT)!r}, *sys.argv[1:]]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
except SystemExit as exit:
    loaded = [name for name in ("torch", "transformers", "datasets", "ray") if name in sys.modules]
    print(f"exit {{exit.code}}, loaded {{loaded}}", file=sys.stderr)
"""


def _console_script(*arguments: str) -> subprocess.CompletedProcess:
    assert CONSOLE_SCRIPT.is_file(), "installing the package (pip install -e .) installs the console script"
    return subprocess.run(
        [sys.executable, "-c", RUN_CONSOLE_SCRIPT, *arguments], capture_output=True, text=True, check=False
    )


def test_help_loads_neither_torch_nor_transformers_nor_datasets():
    # the console script registers the methods when a command runs, so its parser alone loads none of them
    for command in ([], *([name] for name in _subcommands(cli.build_parser()))):
        completed = _console_script(*command, "--help")
        assert completed.stderr.splitlines()[-1] == "exit 0, loaded []", (command, completed.stderr)
        assert "usage: hf-fsad" in completed.stdout


def test_help_as_a_module_loads_neither_torch_nor_transformers_nor_datasets():
    # `python -m hf_fsad.cli` (how torchrun starts it) defers registration as the console script does;
    # -X importtime lists every module the process imports, one per stderr line
    completed = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "hf_fsad.cli", "--help"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert completed.returncode == 0 and "usage: hf-fsad" in completed.stdout
    imported = {line.rsplit("|", 1)[-1].strip() for line in completed.stderr.splitlines() if "|" in line}
    assert "hf_fsad.cli" in imported
    assert imported & {"torch", "transformers", "datasets", "ray"} == set()


def test_version_prints_the_installed_version_without_loading_torch():
    from importlib.metadata import version

    completed = _console_script("--version")
    assert completed.stdout.strip() == f"hf-fsad {version('hf-fsad')}"
    assert completed.stderr.splitlines()[-1] == "exit 0, loaded []", completed.stderr


def test_the_console_script_registers_the_methods_when_a_command_runs(saved_winclip_dir, toy_files, tmp_path):
    _, queries = toy_files
    output = tmp_path / "scores.jsonl"
    completed = _console_script(
        "score", "--model", saved_winclip_dir, "--output", str(output), str(queries[0])
    )
    assert completed.stderr.splitlines()[-1].startswith("exit 0,"), completed.stderr
    assert len(_read(output)) == 1


def test_the_names_of_the_single_module_cli_still_work_with_a_warning():
    from hf_fsad.calibration_policy import DEFAULT_FALSE_ALARM_RATE
    from hf_fsad.cli.hub import run_push_bank

    with pytest.warns(DeprecationWarning, match="use `hf_fsad.calibration_policy.DEFAULT_FALSE_ALARM_RATE`"):
        assert cli.DEFAULT_FALSE_ALARM_RATE == DEFAULT_FALSE_ALARM_RATE
    with pytest.warns(DeprecationWarning, match="use `hf_fsad.cli.hub.run_push_bank`"):
        assert cli.push_bank is run_push_bank
    with pytest.raises(AttributeError):
        _ = cli.no_such_name


@pytest.mark.parametrize(
    ("cuda", "mps", "runtime", "expected"),
    [
        (True, True, "torch", "cuda"),
        (False, True, "torch", "mps"),
        (False, False, "torch", "cpu"),
        (True, True, "onnxruntime", "cpu"),  # an exported graph runs on the CPU
    ],
)
def test_device_auto_is_cuda_then_mps_then_the_cpu(monkeypatch, cuda, mps, runtime, expected):
    from hf_fsad.distributed import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert resolve_device("auto", runtime) == expected
    assert (
        resolve_device("cuda:1", runtime) == "cuda:1"
    )  # a device named is kept (and checked by the command)
    commands = (
        ["score", "x.png", "--model", "m", "--output", "o.jsonl"],
        ["fit", "--normal", "good/", "--out", "fitted/"],
        ["benchmark", "--methods", "winclip", "--datasets", "toy", "--out", "runs/"],
    )
    assert [cli.build_parser().parse_args(command).device for command in commands] == ["auto"] * 3
