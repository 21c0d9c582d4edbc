"""`hf-fsad reproduce`: the shipped published cells, the comparison's units and tolerances by hand, the
averaging, `--list`, and every paper's smoke run end to end on generated data with tiny models (resumed)."""

from __future__ import annotations

import csv
import fnmatch
import importlib.util
import json
import tomllib
from pathlib import Path

import pytest

from dataset_layouts import LAYOUT_WRITERS
from hf_fsad.cli import main
from hf_fsad.reproduction import PAPERS, comparison, paper_cells
from hf_fsad.reproduction.harness import ours_value
from hf_fsad.reproduction.tables import TABLES_DIR, read_cells

REPO = Path(__file__).resolve().parents[1]
COLUMNS = ["table", "method", "dataset", "category", "setting", "metric", "value", "value_std", "unit"]
COLUMNS += ["source_file", "source_line"]

# The tiny models' settings per method (a 2-block CLIP, a tiny Stable Diffusion), as --set entries.
TINY = {
    "metacan": [
        "metacan.model.feature_layers=[1,2]",
        "metacan.model.differentiator_hidden_size=16",
        "metacan.model.detector_hidden_sizes=[8,4]",
        "metacan.training.support_normal=1",
        "metacan.training.support_anomalous=1",
        "metacan.training.query_normal=2",
        "metacan.training.query_anomalous=2",
    ],
    "afclip": [
        "afclip.model.feature_layers=[1,2]",
        "afclip.model.image_size=64",
        "afclip.model.adapter_num_heads=2",
        "afclip.model.adapter_head_dim=8",
        "afclip.model.num_context_tokens=3",
        "afclip.training.batch_size=2",
    ],
    "vtfusion": [
        "vtfusion.model.feature_layers=[1,2]",
        "vtfusion.model.fusion_channels=4",
        "vtfusion.model.segmentation_channels=8",
    ],
    "one_to_normal": [
        "one_to_normal.model.diffusion_resolution=32",
        "one_to_normal.model.num_inference_steps=10",  # strength 0.3: 3 denoising steps
        "one_to_normal.model.pool_size=3",
        "one_to_normal.training.num_class_images=1",
        "one_to_normal.training.class_image_steps=2",
    ],
}


def write_table(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def row(value, std="", unit="%", category="mean", setting="2-shot", line="7") -> dict:
    return {
        "table": "Table 2",
        "method": "MetaCAN",
        "dataset": "VisA",
        "category": category,
        "setting": setting,
        "metric": "image AUROC",
        "value": value,
        "value_std": std,
        "unit": unit,
        "source_file": "papers/x.txt",
        "source_line": line,
    }


def test_comparison_in_points_with_the_papers_std_or_one_point_by_hand(tmp_path):
    fraction, percent, no_std = read_cells(
        write_table(
            tmp_path / "t.csv",
            [row("0.896", "0.020", "fraction (0-1)"), row("95.1", "1.0", line="8"), row("92.9", line="9")],
        )
    )
    assert fraction.source == "papers/x.txt:7" and fraction.shots == 2
    # MetaCAN prints fractions: 0.896 ± 0.020 -> 89.6 ± 2.0 points; ours 0.9 -> 90.0, +0.4, within 2.0
    got = comparison(fraction, 0.9)
    assert got["paper_points"] == pytest.approx(89.6) and got["ours_points"] == pytest.approx(90.0)
    assert got["difference_points"] == pytest.approx(0.4) and got["tolerance_points"] == pytest.approx(2.0)
    assert got["within_tolerance"] is True
    # percent with std 1.0: ours 0.94 -> 94.0, -1.1 > 1.0
    got = comparison(percent, 0.94)
    assert got["difference_points"] == pytest.approx(-1.1) and got["within_tolerance"] is False
    # no std printed: one point; ours 0.925 -> -0.4, within
    got = comparison(no_std, 0.925)
    assert got["tolerance_points"] == 1.0 and got["difference_points"] == pytest.approx(-0.4)
    assert got["within_tolerance"] is True
    assert comparison(no_std, None)["within_tolerance"] is None


def test_ours_averages_seeds_per_category_then_categories(tmp_path):
    mean, category = read_cells(
        write_table(tmp_path / "t.csv", [row("90.0"), row("90.0", category="metal nut")])
    )
    run = PAPERS["metacan"].tables[0].runs[0]

    def cell(name, seed, value, k=2):
        return {"dataset": "visa", "category": name, "k": k, "seed": seed, "metrics": {"image_auroc": value}}

    cells = [
        cell("candle", 0, 0.8),
        cell("candle", 1, 0.9),
        cell("metal_nut", 0, 0.6),
        cell("candle", 0, 0.1, k=4),
    ]
    value, note = ours_value(cells, mean, run)
    assert value == pytest.approx((0.85 + 0.6) / 2)  # not the pooled (0.8 + 0.9 + 0.6) / 3
    assert note == "partial: 2 of 12 categories, 2 seeds"  # VisA has 12
    value, _ = ours_value(cells, category, run)
    assert value == pytest.approx(0.6)  # "metal nut" is the loader's metal_nut
    assert ours_value([cell("candle", 0, None) | {"error": "ValueError: x"}], mean, run) == (
        None,
        "no cell ran (ValueError: x)",
    )


def test_shipped_rows_carry_their_source_and_cover_every_table_run():
    for paper in PAPERS.values():
        cells = paper_cells(paper)
        assert all(cell.source.split(":")[-1].isdigit() for cell in cells)
        for table in paper.tables:
            if table.table == "Table IV":  # APPD: the paper's own data set
                continue
            methods = {method for run in table.runs for method in run.methods}
            found = {cell.method for cell in cells if cell.table in table.row_table_names}
            assert found and found <= methods, (paper.name, table.table, found)
    metacan = paper_cells(PAPERS["metacan"])
    assert len(metacan) == 72  # Tables 2 and 3: MetaCAN and WinCLIP, 2 metrics x 3 shots x 6 datasets
    first = next(cell for cell in metacan if cell.method == "MetaCAN")
    assert (first.value, first.std, first.source) == ("0.896", "0.020", "papers/metacan.txt:298")
    logs = [cell for cell in paper_cells(PAPERS["afclip"]) if cell.table.startswith("official repo")]
    assert len(logs) == 443 and all(cell.unit.startswith("fraction") for cell in logs)


def test_the_tables_are_package_data():
    patterns = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    shipped = sorted(path.relative_to(TABLES_DIR.parent).as_posix() for path in TABLES_DIR.iterdir())
    assert len(shipped) == 6
    assert all(any(fnmatch.fnmatch(name, p) for p in patterns["hf_fsad.reproduction"]) for name in shipped)


def test_faithfulness_doc_holds_the_encoded_protocols():
    spec = importlib.util.spec_from_file_location(
        "faithfulness_tables", REPO / "scripts" / "faithfulness_tables.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = (REPO / "docs" / "faithfulness.md").read_text(encoding="utf-8")
    assert f"{module.START}\n{module.generated_section()}{module.END}" in text, (
        "run scripts/faithfulness_tables.py"
    )
    assert "| references | test set | paper |" in text  # MetaCAN draws its references from the test set


def test_list_names_papers_tables_and_what_they_need(capsys):
    assert main(["reproduce", "--list"]) == 0
    printed = capsys.readouterr().out
    for paper in PAPERS.values():
        assert f"{paper.name}: {paper.title}" in printed
    assert "Table IV: APPD (PRO)" in printed and "appd (needs dataset loader appd)" in printed
    assert "--weights afclip:mvtec_ad=DIR afclip:visa=DIR" in printed
    assert "training: vtfusion fitted per category in each cell" in printed


def test_bad_arguments_are_named(tmp_path, capsys):
    base = ["reproduce", "afclip", "--data-root", str(tmp_path), "--out", str(tmp_path / "o")]
    assert main([*base, "--weights", "afclip=dir"]) == 2
    assert "is not METHOD:TRAINED_ON=PATH" in capsys.readouterr().err
    assert main([*base, "--weights", "metacan:visa=dir"]) == 2
    assert "afclip trains no 'metacan'" in capsys.readouterr().err
    assert main([*base, "--table", "Table 9"]) == 2
    assert "afclip has no table 'Table 9'" in capsys.readouterr().err
    assert main(["reproduce", "afclip"]) == 2


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    LAYOUT_WRITERS["mvtec_ad"](root / "mvtec_ad", ["bottle"])
    LAYOUT_WRITERS["visa"](root / "visa", ["candle"])
    return root


def smoke(paper: str, data_root: Path, out: Path, tiny_clip_dir: str, diffusion_dir: str) -> dict:
    """`hf-fsad reproduce PAPER --smoke` with the tiny models; its results.json."""
    methods = {run.method for table in PAPERS[paper].tables for run in table.runs}
    settings = [entry for method in sorted(methods) for entry in TINY.get(method, [])]
    if "one_to_normal" in methods:
        settings.append(f"one_to_normal.model.diffusion_model={diffusion_dir}")
    arguments = ["reproduce", paper, "--smoke", "--data-root", str(data_root), "--out", str(out)]
    arguments += ["--backbone", tiny_clip_dir, "--device", "cpu"] + (["--set", *settings] if settings else [])
    assert main(arguments) == 0
    return json.loads((out / "results.json").read_text())


@pytest.mark.parametrize("paper", list(PAPERS))
def test_smoke_run_end_to_end(paper, data_root, tmp_path, tiny_clip_dir, diffusion_dir):
    """Every table runs its selected cells or says why not; each compared row's difference is ours - paper
    in points; results.md shows the protocol and the plot."""
    results = smoke(paper, data_root, tmp_path / "out", tiny_clip_dir, diffusion_dir)
    rows = results["rows"]
    compared = [row for row in rows if row["ours_points"] is not None]
    own = PAPERS[paper].tables[0].runs[0].method
    assert {own, "winclip"} <= {row["ours_method"] for row in compared}  # each first table has WinCLIP rows
    for row in compared:
        assert row["difference_points"] == pytest.approx(row["ours_points"] - row["paper_points"])
        assert 0 <= row["ours_points"] <= 100
    tables_run = {row["table"] for row in compared}
    for table in PAPERS[paper].tables:
        notes = {row["note"] for row in rows if row["table"] == table.table and row["ours_points"] is None}
        assert table.table in tables_run or notes <= {
            "needs dataset loader appd",
            "not in the --smoke selection",
        } | {note for note in notes if note.startswith(("needs dataset loader", "no data at"))}
    text = (tmp_path / "out" / "results.md").read_text()
    assert "| setting | value | source | note |" in text and "![ours vs the paper](paper_vs_ours.png)" in text
    assert (tmp_path / "out" / "paper_vs_ours.png").is_file()


def test_a_rerun_resumes_trained_weights_and_finished_cells(
    data_root, tmp_path, tiny_clip_dir, diffusion_dir
):
    """The second run trains nothing (the weights saved in out/weights are loaded) and runs no cell again
    (every runner directory keeps its cells as they were); the comparison is the same."""
    out = tmp_path / "out"
    first = smoke("metacan", data_root, out, tiny_clip_dir, diffusion_dir)
    summaries = sorted((out / "weights").glob("*/training_summary.json"))
    assert [path.parent.name for path in summaries] == ["metacan-on-mvtec_ad", "metacan-on-visa"]
    stamps = [path.stat().st_mtime_ns for path in summaries]
    cell_files = sorted((out / "cells").glob("*/results.json"))
    cells = [json.loads(path.read_text())["cells"] for path in cell_files]
    second = smoke("metacan", data_root, out, tiny_clip_dir, diffusion_dir)
    assert [path.stat().st_mtime_ns for path in summaries] == stamps
    # a cell run again would record its own seconds and scores
    assert [json.loads(path.read_text())["cells"] for path in cell_files] == cells and all(cells)
    assert second["rows"] == first["rows"]
    assert "trained here on mvtec_ad" in second["methods"]["metacan (trained on mvtec_ad)"]["weights"]

    # the same weights through --weights: nothing trained, the same numbers
    weights = [f"metacan:{name}={out / 'weights' / f'metacan-on-{name}'}" for name in ("mvtec_ad", "visa")]
    given = tmp_path / "given"
    arguments = ["reproduce", "metacan", "--smoke", "--data-root", str(data_root), "--out", str(given)]
    arguments += [
        "--backbone",
        tiny_clip_dir,
        "--device",
        "cpu",
        "--weights",
        *weights,
        "--set",
        *TINY["metacan"],
    ]
    assert main(arguments) == 0
    third = json.loads((given / "results.json").read_text())
    assert not (given / "weights").exists()
    assert [row["ours_points"] for row in third["rows"]] == [row["ours_points"] for row in first["rows"]]
    assert third["methods"]["metacan (trained on visa)"]["weights"] == f"--weights {weights[1]}"
