"""`--engine ray` (hf_fsad.ray_engine) on a local Ray cluster of 2 CPUs: the records equal the local engine's,
unreadable inputs become error records, Parquet in and out, resume, a killed actor retried with each input
written once, the exported runtime as the actors' backend, benchmark cells as Ray tasks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from extras import import_extra
from hf_fsad.cli import main
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from test_cli import toy_files  # noqa: F401 (the CLI tests' files, a fixture here too)

ray = import_extra("ray", "ray")

# Scores of the two engines: same model, same batch size (2); float32 kernels may round batches of other
# compositions differently by ~1e-7 relative.
SCORE_TOLERANCE = 1e-6
BATCH = ["--batch-size", "2"]
# Each actor reserves half a CPU: on 2 CPUs the read tasks then always find one.
RAY = ["--engine", "ray", "--num-cpus-per-worker", "0.5"]


# one local cluster at a time on the machine: every Ray test on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group("ray")


@pytest.fixture(scope="module", autouse=True)
def ray_cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def files(toy_files):  # noqa: F811 (the imported fixture, requested by name)
    """`toy_files`' 2 normal references and 4 queries (one not square), and an unreadable file."""
    root, _ = toy_files
    (root / "broken").mkdir()
    (root / "broken" / "broken.png").write_text("not an image")
    return root


def _read(path: Path) -> dict[str, dict]:
    return {record["path"]: record for record in map(json.loads, path.read_text().splitlines())}


def _score(model_dir, root, output, *options):
    return main(
        ["score", str(root / "queries"), str(root / "broken" / "broken.png"), "--model", model_dir,
         "--reference", str(root / "refs"), "--output", str(output), *BATCH, *options]
    )  # fmt: skip


def _assert_same_records(ray_records: dict, local_records: dict) -> None:
    assert ray_records.keys() == local_records.keys()
    for path, expected in local_records.items():
        got, local = dict(ray_records[path]), dict(expected)
        assert got.pop("score") == pytest.approx(local.pop("score"), abs=SCORE_TOLERANCE)
        assert got.pop("branch_scores") == pytest.approx(local.pop("branch_scores"), abs=SCORE_TOLERANCE)
        if "normalized_score" in local:
            normalized = pytest.approx(local.pop("normalized_score"), abs=SCORE_TOLERANCE)
            assert got.pop("normalized_score") == normalized
        heatmaps = got.pop("heatmap"), local.pop("heatmap")
        assert (heatmaps[0] is None) == (heatmaps[1] is None)
        if heatmaps[0] is not None:
            assert Path(heatmaps[0]).name == Path(heatmaps[1]).name and Path(heatmaps[0]).is_file()
        regions = got.pop("regions", None), local.pop("regions", None)
        assert (regions[0] is None) == (regions[1] is None)
        for got_region, region in zip(*(regions if regions[0] is not None else ([], []))):
            got_region, region = dict(got_region), dict(region)
            peak = pytest.approx(region.pop("peak_score"), abs=SCORE_TOLERANCE)
            assert got_region.pop("peak_score") == peak and got_region == region
        assert got == local  # path, label, threshold ...


@pytest.fixture(scope="module")
def local_run(saved_winclip_dir, files, tmp_path_factory):
    """The local engine's records of the queries (calibrated leave-one-out on the 2 references, heatmaps)."""
    folder = tmp_path_factory.mktemp("local_run")
    assert _score(saved_winclip_dir, files, folder / "local.jsonl", "--heatmaps", str(folder / "maps")) == 0
    return _read(folder / "local.jsonl")


def test_ray_records_equal_the_local_engines_and_an_unreadable_file_is_an_error_record(
    saved_winclip_dir, files, local_run, tmp_path, capsys
):
    output = tmp_path / "ray.jsonl"
    status = _score(saved_winclip_dir, files, output, *RAY, "--num-workers", "2", "--heatmaps", str(tmp_path))
    assert status == 0
    records = _read(output)
    broken = records.pop(str(files / "broken" / "broken.png"))
    assert broken["score"] is None and "not an image PIL can read" in broken["error"]
    assert len(local_run) == 4 and "label" in next(iter(local_run.values()))  # calibrated: verdicts compared
    _assert_same_records(records, local_run)
    assert "1 could not be read" in capsys.readouterr().err


@pytest.mark.slow  # ~25 s: two Ray runs of their own
def test_parquet_inputs_of_datasets_image_structs_and_bytes_to_a_parquet_output(
    saved_winclip_dir, files, local_run, tmp_path
):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from hf_fsad.ray_engine import read_records

    queries = sorted((files / "queries").iterdir())
    # a `datasets` Image column ({bytes, path}), as a Hub dataset's Parquet files hold it
    images = [{"bytes": query.read_bytes(), "path": str(query)} for query in queries[:3]]
    (tmp_path / "table").mkdir()
    pq.write_table(pa.table({"image": images}), tmp_path / "table" / "part-0.parquet")
    # raw bytes and a path column, one of them not an image
    rows = {"path": [str(queries[3]), "garbage.png"], "bytes": [queries[3].read_bytes(), b"garbage"]}
    pq.write_table(pa.table(rows), tmp_path / "more.parquet")
    output = tmp_path / "results.parquet"
    inputs = [str(tmp_path / "table"), str(tmp_path / "more.parquet")]
    status = main(
        ["score", *inputs, "--model", saved_winclip_dir, "--reference", str(files / "refs"), "--output",
         str(output), *BATCH, *RAY]
    )  # fmt: skip
    assert status == 0
    records = {record["path"]: record for record in read_records(output)}
    assert records.pop("garbage.png")["error"].startswith("not an image PIL can read")
    local = {
        path: {key: value for key, value in record.items() if key != "heatmap"}
        for path, record in local_run.items()
    }
    _assert_same_records(
        {path: record | {"heatmap": None} for path, record in records.items()},
        {path: record | {"heatmap": None} for path, record in local.items()},
    )


def test_the_local_engine_refuses_the_ray_options_and_parquet(saved_winclip_dir, files, tmp_path, capsys):
    for options in (["--num-workers", "2"], ["--output", str(tmp_path / "results.parquet")]):
        status = main(
            [
                "score",
                str(files / "queries"),
                "--model",
                saved_winclip_dir,
                "--output",
                str(tmp_path / "r.jsonl"),
                *options,
            ]
        )
        assert status == 2
        assert "--engine ray" in capsys.readouterr().err


def test_ray_refuses_an_int8_export_before_starting(saved_winclip_dir, files, tmp_path, capsys):
    arguments = ["score", str(files / "queries"), "--model", saved_winclip_dir, *RAY]
    status = main(
        [*arguments, "--runtime", "onnxruntime", "--precision", "int8", "--output", str(tmp_path / "r.jsonl")]
    )
    assert status == 2
    assert "--precision int8 runs on --engine local" in capsys.readouterr().err


def _local_bank(model, files):
    """The bank `hf-fsad score --reference refs` builds and calibrates (leave-one-out)."""
    from hf_fsad.calibration_policy import calibrated_bank
    from hf_fsad.io import read_image

    references = [read_image(path) for path in sorted((files / "refs").iterdir())]
    return calibrated_bank(model, references, calibrate="auto").bank


class _DiesOnce(WinClipModel):
    """A WinCLIP whose first forward, in whichever actor, kills its process (no exception: a lost worker)
    and leaves the file `self.marker` behind."""

    def forward(self, *args, **kwargs):
        marker = Path(self.marker)
        if not marker.exists():
            marker.touch()
            os._exit(1)
        return super().forward(*args, **kwargs)


@pytest.mark.slow  # ~25 s: a killed actor restarted, then a resumed run
def test_an_actor_killed_mid_run_is_retried_each_input_written_once_then_resume_skips_the_written(
    saved_winclip_dir, files, local_run, tmp_path
):
    import ray.cloudpickle

    from hf_fsad.ray_engine import RayResources, score_to_file

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the workers cannot import this module
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    bank = _local_bank(model, files)
    dying = _DiesOnce.from_pretrained(saved_winclip_dir)
    marker = tmp_path / "died"
    dying.marker = str(marker)
    output = tmp_path / "results.jsonl"
    queries = [str(path) for path in sorted((files / "queries").iterdir())]
    resources = RayResources(num_workers=1, num_cpus=0.5)
    summary = score_to_file(queries, dying, bank, output, resources=resources, batch_size=2)
    assert marker.exists()  # an actor did die
    lines = output.read_text().splitlines()
    assert sorted(json.loads(line)["path"] for line in lines) == queries  # each input once
    assert summary.scored == 4
    _assert_same_records(_read(output), {path: local_run[path] | {"heatmap": None} for path in queries})

    # resume: the 2 records kept are not scored again (their marked scores stay), the 2 others are
    kept = [json.loads(line) | {"score": 123.0} for line in lines[:2]]
    output.write_text("".join(json.dumps(record) + "\n" for record in kept))
    summary = score_to_file(queries, model, bank, output, resume=True, resources=resources, batch_size=2)
    assert (summary.resumed, summary.scored) == (2, 2)
    records = _read(output)
    assert sorted(records) == queries
    assert [records[record["path"]]["score"] for record in kept] == [123.0, 123.0]


def test_the_exported_runtime_scores_in_the_actors(saved_winclip_dir, files, tmp_path):
    import_extra("onnxruntime", "export")
    # calibrated on the exported graph's scores (held-out images: here the queries, for want of others)
    options = ["--runtime", "onnxruntime", "--calibration-normal", str(files / "queries")]
    assert _score(saved_winclip_dir, files, tmp_path / "local.jsonl", *options) == 0
    assert _score(saved_winclip_dir, files, tmp_path / "ray.jsonl", *options, *RAY) == 0
    records = _read(tmp_path / "ray.jsonl")
    records.pop(str(files / "broken" / "broken.png"))
    local = _read(tmp_path / "local.jsonl")
    assert all(record["branch_scores"] == {} for record in local.values())  # the exported graph scored
    _assert_same_records(records, local)


def test_benchmark_cells_run_as_ray_tasks_and_the_driver_writes_the_results(tiny_clip_dir, tmp_path):
    runs = {}
    for engine in ("local", "ray"):
        out = tmp_path / engine
        options = ["--engine", engine, "--num-cpus-per-worker", "0.5"] if engine == "ray" else []
        status = main(
            ["benchmark", "--methods", f"w=winclip@{tiny_clip_dir}", "--datasets", "toy::grid", "--k", "1",
             "--seeds", "0", "1", "--out", str(out), *options]
        )  # fmt: skip
        assert status == 0
        runs[engine] = json.loads((out / "results.json").read_text())
    local, remote = ({cell["seed"]: cell for cell in run["cells"]} for run in runs.values())
    assert sorted(remote) == [0, 1] and all("error" not in cell for cell in remote.values())
    for seed, cell in local.items():
        assert remote[seed]["reference_ids"] == cell["reference_ids"]
        assert remote[seed]["image_scores"] == pytest.approx(cell["image_scores"], abs=SCORE_TOLERANCE)
    # the cells' feature-cache counts come back to the driver (cells running at once may both miss an image)
    counts = [run["feature_cache"] for run in (runs["local"], runs["ray"])]
    assert counts[0]["hits"] + counts[0]["misses"] == counts[1]["hits"] + counts[1]["misses"]
    assert counts[1]["misses"] >= counts[0]["misses"] > 0


def test_neither_import_hf_fsad_nor_the_cli_help_imports_ray():
    code = "import sys, hf_fsad, hf_fsad.cli; hf_fsad.cli.build_parser(); print('ray' in sys.modules)"
    completed = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert completed.stdout.strip() == "False"
