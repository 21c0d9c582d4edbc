"""The docs hold: tests they name as evidence exist (docs/faithfulness.md), and their examples run."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# `tests/test_x.py::test_name`, and `::test_other` in the same cell meaning the same file.
REFERENCE = re.compile(r"(tests/[\w/]+\.py)?::(\w+)")


def _test_names(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return {node.name for node in ast.walk(tree) if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)}


def test_every_test_named_in_the_faithfulness_tables_exists():
    missing, checked = [], 0
    for line in (ROOT / "docs" / "faithfulness.md").read_text(encoding="utf-8").splitlines():
        for cell in line.split("|"):
            current = None
            for file, name in REFERENCE.findall(cell):
                current = file or current
                assert current, f"`::{name}` without a file before it in: {cell.strip()}"
                checked += 1
                if name not in _test_names(ROOT / current):
                    missing.append(f"{current}::{name}")
    assert checked > 50 and not missing, missing


def test_the_first_calibration_snippet_runs_and_decides(tmp_path, monkeypatch):
    """docs/calibration.md's Python example, executed as written (it builds its own tiny random model)."""
    text = (ROOT / "docs" / "calibration.md").read_text(encoding="utf-8")
    snippet = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(snippet, "docs/calibration.md", "exec"), namespace)  # noqa: S102 - the repository's own docs
    output, bank = namespace["output"], namespace["bank"]
    assert (tmp_path / "tile_bank.safetensors").is_file()
    assert (
        output.labels.tolist()
        == (output.image_scores.double() > bank.calibration.image_threshold).long().tolist()
    )


def test_the_own_data_snippets_run_on_a_generated_folder(tiny_clip_dir, tmp_path, monkeypatch):
    """docs/own_data.md's Python and command-line examples, on a generated parts/ folder, with a tiny random
    CLIP in place of the Hub checkpoint they name (no network in tests)."""
    import json
    import shlex

    from hf_fsad.cli import main
    from hf_fsad.data import load_benchmark
    from test_data import make_folder_root

    text = (ROOT / "docs" / "own_data.md").read_text(encoding="utf-8")
    snippets = re.findall(r"```(python|bash)\n(.*?)```", text, re.DOTALL)
    assert [kind for kind, _ in snippets] == ["python", "bash", "python"]
    monkeypatch.chdir(tmp_path)
    make_folder_root(tmp_path / "parts", ("bracket", "plate"))
    for kind, snippet in snippets:
        snippet = snippet.replace("openai/clip-vit-base-patch16", tiny_clip_dir)
        if kind == "python":
            exec(compile(snippet, "docs/own_data.md", "exec"), {})  # noqa: S102 - the repository's own docs
        else:
            command = shlex.split(snippet.replace("\\\n", " "))
            assert command[:2] == ["hf-fsad", "benchmark"] and main(command[1:]) == 0
    for out, split in (("parts", {}), ("parts-half", {"train_fraction": 0.5, "seed": 1})):
        cells = json.loads((tmp_path / "runs" / out / "results.json").read_text())["cells"]
        # 2 categories x k in (2, 4) x 3 seeds, none failed
        assert len(cells) == 12 and not any("error" in cell for cell in cells)
        train = set(load_benchmark("folder", root="parts", category="bracket", **split)["train"]["path"])
        references = {i for c in cells if c["category"] == "bracket" for i in c["reference_ids"]}
        assert references <= train and len(train) == (6 if out == "parts" else 4)
