"""`hf-fsad score`: scores match the model, bad files are reported and skipped, outputs are atomic."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from hf_fsad import cli
from hf_fsad.cli import main
from hf_fsad.data.toy import toy_records
from hf_fsad.models.winclip.modeling_winclip import WinClipModel


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


def _expected_scores(model_dir, root, queries):
    model = WinClipModel.from_pretrained(model_dir)
    processor = model.image_processor()
    load = lambda paths: (
        processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    )
    with torch.no_grad():
        bank = model.build_reference_bank(load(sorted((root / "refs").iterdir())))
        return model(load(queries), reference_bank=bank).image_scores.tolist()


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
    expected = _expected_scores(saved_winclip_dir, root, queries)
    # the CLI scores in its own batches: float32 rounding ~1e-7 relative, 1e-5 bound
    assert [r["score"] for r in records] == pytest.approx(expected, rel=1e-5)
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

    monkeypatch.setattr("hf_fsad.visualization.heatmap_overlay", failing_overlay)
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
    expanded = cli.expand_inputs([str(tmp_path), str(tmp_path / "notes.txt")])
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
