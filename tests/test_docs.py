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
