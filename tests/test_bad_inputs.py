"""Every kind of bad input a user can hand the CLI or the pipeline: each is reported with the documented
message and exit status, good inputs in the same run are still scored, and no traceback reaches the user.

The CLI runs as a subprocess, as a user runs it, so what is checked is exactly what a terminal shows.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from extras import import_extra
from hf_fsad.io import ImageReadError, read_image, to_rgb

GOOD = np.random.default_rng(0).integers(0, 256, (64, 80, 3), dtype=np.uint8)


def _run(*arguments: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = os.environ | {"HF_HUB_OFFLINE": "1"}  # a Hub id fails at once instead of waiting on the network
    return subprocess.run(
        [sys.executable, "-m", "hf_fsad.cli", *arguments],
        check=False,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def _stderr_until(process: subprocess.Popen, seen, timeout: float = 240) -> bytes:
    """What `process` wrote to its stderr pipe until `seen(text)` holds, it exits or `timeout` s pass."""
    written, deadline = b"", time.monotonic() + timeout
    while (
        not seen(written.decode(errors="replace")) and process.poll() is None and time.monotonic() < deadline
    ):
        if select.select([process.stderr], [], [], 0.05)[0]:
            written += os.read(process.stderr.fileno(), 65536)
    return written


def _no_traceback(result: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr


def _png_declaring(path: Path, width: int, height: int) -> None:
    """A valid 1x1 PNG whose header is rewritten to declare `width` x `height` (a decompression bomb)."""
    Image.new("L", (1, 1)).save(path)
    data = bytearray(path.read_bytes())
    header = struct.pack(">II", width, height) + bytes(data[24:29])
    data[16:29] = header
    data[29:33] = struct.pack(">I", zlib.crc32(b"IHDR" + header))
    path.write_bytes(bytes(data))


def _make_inputs(folder: Path) -> dict[str, tuple[Path, str | None]]:
    """name -> (file, expected skip reason or None when the file must be scored)."""
    folder.mkdir()
    inputs: dict[str, tuple[Path, str | None]] = {}

    def add(name: str, reason: str | None) -> Path:
        inputs[name] = (folder / name, reason)
        return folder / name

    Image.fromarray(GOOD).save(add("good.png", None))
    add("empty.png", "empty file").write_bytes(b"")
    truncated = add("truncated.png", "cannot decode the image")
    Image.fromarray(GOOD).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    add("text.png", "not an image PIL can read").write_text("this is text")
    _png_declaring(add("bomb.png", "decompression bomb"), 20000, 20000)
    Image.new("RGB", (400, 300)).save(add("huge.png", "above the limit of 0.1 Mpx"))
    Image.new("RGB", (1, 1), (200, 10, 10)).save(add("one_pixel.png", None))
    Image.new("RGB", (10000, 10), (20, 200, 20)).save(add("strip.png", None))
    Image.fromarray(np.arange(64 * 80, dtype=np.uint16).reshape(64, 80) * 12).save(add("grey16.png", None))
    Image.fromarray(np.dstack([GOOD, np.full((64, 80), 128, np.uint8)])).save(add("rgba.png", None))
    Image.fromarray(GOOD).convert("P").save(add("palette.png", None))
    Image.fromarray(GOOD).convert("CMYK").save(add("cmyk.jpg", None))
    Image.fromarray(np.linspace(0, 1, 64 * 80, dtype=np.float32).reshape(64, 80)).save(add("float.tif", None))
    Image.fromarray(GOOD).save(add("défaut-ü.png", None))
    add("folder.png", "a directory with no image files").mkdir()
    inputs["missing.png"] = (folder / "missing.png", "file not found")
    return inputs


@pytest.fixture(scope="module")
def scored_run(tmp_path_factory, saved_winclip_dir):
    root = tmp_path_factory.mktemp("bad_inputs")
    inputs = _make_inputs(root / "inputs")
    output = root / "out" / "results.jsonl"  # its folder does not exist yet: it is created
    result = _run(
        "score", "--model", saved_winclip_dir, "--output", str(output), "--heatmaps", str(root / "maps"),
        "--max-pixels", "100000", "--batch-size", "3", *(str(path) for path, _ in inputs.values()),
    )  # fmt: skip
    return inputs, output, result


def test_cli_scores_good_files_and_names_each_bad_one(scored_run):
    inputs, output, result = scored_run
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    records = {
        Path(record["path"]).name: record for record in map(json.loads, output.read_text().splitlines())
    }
    scored = {name for name, (_, reason) in inputs.items() if reason is None}
    assert set(records) == scored
    assert all(
        np.isfinite(record["score"]) and Path(record["heatmap"]).is_file() for record in records.values()
    )
    for name, (path, reason) in inputs.items():
        if reason is not None:
            assert re.search(f"skipped input {re.escape(str(path))}: [^\n]*{reason}", result.stderr), name
    # The empty folder given as an input expands to no file, so it is not among the images counted.
    assert f"scored {len(scored)} of {len(inputs) - 1} images" in result.stderr


def test_the_exported_runner_scores_and_skips_the_same_files_as_the_cli(
    scored_run, saved_winclip_dir, tmp_path
):
    """run_exported.py, beside an export of the same model and (default) bank, run with the CLI's options on
    the same inputs: the same files scored, in the same records, and the same lines for the files skipped."""
    import_extra("onnxruntime", "export")
    from hf_fsad.export import export_model
    from hf_fsad.registry import method_spec

    inputs, cli_output, cli_result = scored_run
    folder = export_model(
        method_spec("winclip").model.from_pretrained(saved_winclip_dir), None, tmp_path / "export"
    )
    output = tmp_path / "out" / "results.jsonl"
    result = subprocess.run(
        [sys.executable, str(folder / "run_exported.py"), str(folder), "--output", str(output),
         "--heatmaps", str(tmp_path / "maps"), "--max-pixels", "100000", "--batch-size", "3",
         *(str(path) for path, _ in inputs.values())],
        check=False, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    _no_traceback(result)
    assert result.returncode == 0, result.stderr
    expected, actual = (list(map(json.loads, path.read_text().splitlines())) for path in (cli_output, output))
    assert [record["path"] for record in actual] == [record["path"] for record in expected]
    assert [list(record) for record in actual] == [list(record) for record in expected]
    # the export's parity bound (tests/test_export.py): float32 sums in another order
    np.testing.assert_allclose(
        [record["score"] for record in actual], [record["score"] for record in expected], rtol=0, atol=1e-4
    )
    skipped = re.findall("skipped [^\n]*", cli_result.stderr)  # the CLI's progress bar may precede them
    assert len(skipped) == sum(reason is not None for _, reason in inputs.values())
    assert re.findall("skipped [^\n]*", result.stderr) == skipped
    scored = f"scored {len(expected)} of {len(inputs) - 1} images"
    assert scored in result.stderr and scored in cli_result.stderr


def test_heatmaps_have_each_images_own_size(scored_run):
    _, output, _ = scored_run
    for record in map(json.loads, output.read_text().splitlines()):
        with Image.open(record["heatmap"]) as heatmap, Image.open(record["path"]) as original:
            assert heatmap.size == original.size and heatmap.mode == "RGB"


def test_sixteen_bit_and_float_images_keep_their_range():
    grey16 = Image.fromarray(np.array([[0, 257, 65535]], dtype=np.uint16))
    assert np.asarray(to_rgb(grey16))[0, :, 0].tolist() == [0, 1, 255]  # v / 257: 65535 -> 255, not clipped
    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(unit))[0, :, 0].tolist() == [0, 128, 255]  # 0..1 scaled by 255, rounded
    wide = Image.fromarray(np.array([[0.0, 300.0]], dtype=np.float32))
    with pytest.raises(ImageReadError, match=r"values 0\.\.300 outside"):
        to_rgb(wide)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    path = tmp_path / "bomb.png"
    _png_declaring(path, 20000, 20000)  # decoding it would need 400 MB; the header alone is refused
    with pytest.raises(ImageReadError, match="decompression bomb"):
        read_image(path, max_pixels=None)  # PIL's own limit holds whatever ours
    _png_declaring(path, 9000, 9000)  # 81 Mpx: under PIL's limit, over the default 67 Mpx
    with pytest.raises(ImageReadError, match=r"9000x9000 pixels \(81.0 Mpx\) is above the limit of 67.1 Mpx"):
        read_image(path)


@pytest.mark.parametrize(
    "content, reason",
    [
        (b"not a safetensors file", "not a safetensors file"),
        (None, "no bank metadata"),  # a foreign safetensors file
        ("truncate", "not a safetensors file"),
    ],
)
def test_cli_reports_a_bad_bank_and_exits_2(saved_winclip_dir, tiny_winclip, tmp_path, content, reason):
    bank = tmp_path / "bank.safetensors"
    if content is None:
        from safetensors.torch import save_file

        save_file({"weights": torch.zeros(2)}, bank)
    elif content == "truncate":
        tiny_winclip.build_reference_bank().save(bank)
        bank.write_bytes(bank.read_bytes()[:100])
    else:
        bank.write_bytes(content)
    image = tmp_path / "good.png"
    Image.fromarray(GOOD).save(image)
    result = _run(
        "score",
        "--model",
        saved_winclip_dir,
        "--bank",
        str(bank),
        "--output",
        str(tmp_path / "o"),
        str(image),
    )
    _no_traceback(result)
    assert result.returncode == 2 and f"error: --bank {bank}:" in result.stderr and reason in result.stderr
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("damage", ["missing", "corrupt_config", "no_weights", "hub_offline"])
def test_cli_reports_a_model_it_cannot_load_in_one_line(saved_winclip_dir, tmp_path, damage):
    model = tmp_path / "model"
    expected = {
        "missing": f"local directory {model} does not exist",
        "corrupt_config": f"local directory {model}: config.json is corrupt (JSONDecodeError",
        "no_weights": f"local directory {model} holds no weights",
        "hub_offline": "someone/not-a-real-model is not a local directory and loading it from the Hub failed",
    }[damage]
    if damage != "missing":
        shutil.copytree(saved_winclip_dir, model)
    if damage == "corrupt_config":
        (model / "config.json").write_text('{"model_type": "winclip",')
    if damage == "no_weights":
        for weights in model.glob("*.safetensors"):
            weights.unlink()
    source = "someone/not-a-real-model" if damage == "hub_offline" else str(model)
    env_free = _run("score", "--model", source, "--output", str(tmp_path / "o.jsonl"), str(tmp_path))
    _no_traceback(env_free)
    error_lines = [line for line in env_free.stderr.splitlines() if line.startswith("error:")]
    assert env_free.returncode == 2 and len(error_lines) == 1 and expected in error_lines[0], env_free.stderr


def test_references_none_of_which_can_be_read_exit_1_naming_the_option(saved_winclip_dir, tmp_path):
    broken = tmp_path / "refs"
    broken.mkdir()
    (broken / "empty.png").write_bytes(b"")
    (broken / "text.png").write_text("this is text")
    image = tmp_path / "good.png"
    Image.fromarray(GOOD).save(image)
    output = tmp_path / "o.jsonl"
    result = _run(
        "score", "--model", saved_winclip_dir, "--reference", str(broken), "--output", str(output), str(image)
    )
    _no_traceback(result)
    assert result.returncode == 1, result.stderr
    assert "error: none of the --reference images could be read" in result.stderr
    assert f"skipped reference {broken / 'empty.png'}: empty file" in result.stderr
    assert not output.exists()


@pytest.mark.parametrize("flag", ["--output", "--heatmaps", "--save-bank"])
def test_unwritable_output_is_refused_before_the_model_loads(tmp_path, flag):
    blocker = tmp_path / "a_file"
    blocker.write_text("")  # nothing can be created under a regular file, whoever runs the test
    target = blocker / "out"
    arguments = ["--output", str(tmp_path / "o.jsonl")] if flag != "--output" else []
    result = _run(
        "score", "--model", str(tmp_path / "no-model"), flag, str(target), *arguments, str(tmp_path)
    )
    _no_traceback(result)
    assert result.returncode == 2 and f"error: {flag} {target} cannot be written" in result.stderr
    assert "does not exist" not in result.stderr  # refused before the (missing) model was looked at


def test_fit_and_benchmark_refuse_an_unwritable_out(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    fit = _run("fit", "--clip", "x", "--normal", str(tmp_path), "--out", str(blocker / "sub" / "model"))
    bench = _run("benchmark", "--methods", "winclip@x", "--datasets", "toy", "--out", str(blocker / "bench"))
    for result in (fit, bench):
        _no_traceback(result)
        assert result.returncode == 2 and "--out" in result.stderr and "cannot be written" in result.stderr


def test_pipeline_names_the_bad_file_and_scores_unusual_good_ones(saved_winclip_dir, tmp_path):
    from transformers import AutoModel, pipeline

    pipe = pipeline("image-anomaly-detection", model=AutoModel.from_pretrained(saved_winclip_dir))
    inputs = _make_inputs(tmp_path / "inputs")
    inputs["huge.png"] = (inputs["huge.png"][0], None)  # the pipeline's limit is the default 67 Mpx
    inputs["folder.png"] = (inputs["folder.png"][0], "is a directory")  # named, not expanded as the CLI does
    for name, (path, reason) in inputs.items():
        if reason is None:
            result = pipe(str(path))
            with Image.open(path) as image:
                assert result["anomaly_map"].shape == (image.height, image.width), name
            assert np.isfinite(result["score"]), name
        else:
            with pytest.raises(ImageReadError, match=f"{re.escape(str(path))}: .*{reason}"):
                pipe(str(path))


@pytest.mark.parametrize("bad, message", [(float("nan"), "NaN values"), (float("inf"), "infinite values")])
def test_non_finite_pixels_are_refused_by_name(tiny_winclip, bad, message):
    pixels = torch.zeros(2, 3, 240, 240, dtype=torch.float64)  # float64 is a valid input
    assert torch.isfinite(tiny_winclip(pixels).image_scores).all()
    pixels[1, 0, 5, 7] = bad
    with pytest.raises(ValueError, match=f"pixel_values contains {message} \\(1 of them\\)"):
        tiny_winclip(pixels)


def test_a_killed_run_leaves_complete_results_and_resume_finishes_them(saved_winclip_dir, tmp_path):
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(1)
    for index in range(60):
        Image.fromarray(rng.integers(0, 256, (48, 48, 3), dtype=np.uint8)).save(inputs / f"{index:02d}.png")
    output = tmp_path / "results.jsonl"
    output.write_text('{"path": "earlier.png", "score": 0.5, "branch_scores": {}, "heatmap": null}\n')
    command = [
        sys.executable,
        "-m",
        "hf_fsad.cli",
        "score",
        "--model",
        saved_winclip_dir,
        "--batch-size",
        "1",
    ]
    command += ["--output", str(output), "--resume", str(inputs)]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    # SIGTERM once the progress bar a user sees counts 2 scored images: the run has started scoring (its
    # handler is in place) and is far from done (60 images, one per batch)
    shown = _stderr_until(process, lambda text: max(map(int, re.findall(r"(\d+)/60", text)), default=0) >= 2)
    process.send_signal(signal.SIGTERM)
    stderr = (shown + process.communicate(timeout=120)[1]).decode()
    assert "Traceback" not in stderr, stderr
    first = [json.loads(line) for line in output.read_text().splitlines()]  # every line whole
    assert process.returncode == 130 and "run again with --resume" in stderr, stderr
    assert first[0]["path"] == "earlier.png" and 3 <= len(first) < 61
    assert not list(tmp_path.glob("*.tmp"))

    resumed = _run("score", "--model", saved_winclip_dir, "--output", str(output), "--resume", str(inputs))
    _no_traceback(resumed)
    final = [json.loads(line) for line in output.read_text().splitlines()]
    assert resumed.returncode == 0 and f"resuming: {len(first) - 1} inputs already in" in resumed.stderr
    assert final[: len(first)] == first  # what the killed run saved is kept as it was
    assert sorted(record["path"] for record in final[1:]) == sorted(str(p) for p in inputs.iterdir())


def test_dataset_files_are_checked_without_decoding_and_broken_ones_named(tmp_path):
    from hf_fsad.io import check_image_file

    inputs = _make_inputs(tmp_path / "inputs")
    for name, (path, reason) in inputs.items():
        if reason is None or name == "huge.png":  # the default limit (67 Mpx) admits 400x300
            check_image_file(path)
        else:
            expected = "is a directory" if name == "folder.png" else reason
            with pytest.raises(ImageReadError, match=expected):
                check_image_file(path, max_pixels=100000)


def test_a_heatmap_with_non_finite_values_draws_them_at_the_top_of_the_scale():
    from hf_fsad.visualization import heatmap_overlay

    image = Image.new("RGB", (4, 4), (0, 0, 0))
    finite = np.linspace(0.0, 1.0, 16, dtype=np.float32).reshape(4, 4)
    broken = finite.copy()
    broken[0, 0], broken[3, 3] = np.nan, np.inf  # the finite range stays 1/15 .. 14/15
    drawn = np.asarray(heatmap_overlay(image, broken))
    # Equal to the drawing of a map whose non-finite pixels are the finite maximum and whose range is the
    # finite values' (same size: the bilinear resize copies pixels).
    expected = finite.copy()
    expected[0, 0] = expected[3, 3] = finite[3, 2]
    reference = np.asarray(heatmap_overlay(image, expected, value_range=(finite[0, 1], finite[3, 2])))
    assert np.array_equal(drawn, reference)
