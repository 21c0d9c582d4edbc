"""The docs name tests as evidence (docs/faithfulness.md): every test they name must exist."""

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
