"""Every registered method is in each place docs/adding_a_method.md lists: its test file, its sections of
docs/methods.md and docs/faithfulness.md, its rows in the README's "Which method?" tables, and its config
and model classes in `hf_fsad.__all__`. A method added to the registry alone fails here, naming what it
lacks."""

from __future__ import annotations

from pathlib import Path

import pytest

import hf_fsad
from hf_fsad.registry import METHODS
from test_docs import ROOT, _prose

REGISTERED = sorted(METHODS)


def _section(path: Path, title: str) -> list[str]:
    """The lines of `path` under the `## title` heading, up to the next heading of that level."""
    lines = _prose(path)
    start = lines.index(f"## {title}") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return lines[start:end]


def _tables(lines: list[str]) -> list[list[str]]:
    """The Markdown tables among `lines`, each as its rows (header and separator included)."""
    tables, current = [], []
    for line in [*lines, ""]:
        if line.startswith("|"):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


@pytest.mark.parametrize("model_type", REGISTERED)
def test_each_method_has_its_test_file(model_type):
    path = ROOT / "tests" / f"test_{model_type}.py"
    assert path.is_file(), f"{model_type} is registered but has no {path.relative_to(ROOT)}"


@pytest.mark.parametrize("page", ["methods.md", "faithfulness.md"])
@pytest.mark.parametrize("model_type", REGISTERED)
def test_each_method_has_a_section_in_the_docs(model_type, page):
    headings = [line for line in _prose(ROOT / "docs" / page) if line.startswith("## ")]
    assert any(f"`{model_type}`" in heading for heading in headings), (
        f"docs/{page} has no `## ...` heading naming `{model_type}`; its sections: {headings}"
    )


def test_the_readme_has_the_two_method_tables():
    """Guards the test below: a renamed section or a merged table would let it pass on the wrong rows."""
    tables = _tables(_section(ROOT / "README.md", "Which method?"))
    assert [table[0].split("|")[1].strip() for table in tables] == ["method", "method"]


@pytest.mark.parametrize("model_type", REGISTERED)
def test_each_method_has_a_row_in_each_readme_method_table(model_type):
    for table in _tables(_section(ROOT / "README.md", "Which method?")):
        assert any(f"`{model_type}`" in row for row in table[2:]), (
            f"the README's 'Which method?' table headed {table[0]!r} has no row naming `{model_type}`"
        )


@pytest.mark.parametrize("model_type", REGISTERED)
def test_each_method_exports_its_config_and_model(model_type):
    spec = METHODS[model_type]
    for cls in (spec.config, spec.model):
        assert cls.__name__ in hf_fsad.__all__, f"{cls.__name__} ({model_type}) is not in hf_fsad.__all__"
        assert getattr(hf_fsad, cls.__name__) is cls
