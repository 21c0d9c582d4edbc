"""Write the reproduced tables' protocols into docs/faithfulness.md (between its `protocols` markers), from
their one encoding (hf_fsad.reproduction.protocols), so the doc and `hf-fsad reproduce` agree; tests/
test_reproduce.py fails when they do not.

    python scripts/faithfulness_tables.py
"""

from __future__ import annotations

from pathlib import Path

from hf_fsad.reproduction.protocols import PAPERS
from hf_fsad.reproduction.report import protocol_markdown

DOCS = Path(__file__).resolve().parents[1] / "docs" / "faithfulness.md"
START, END = "<!-- protocols:start (scripts/faithfulness_tables.py) -->", "<!-- protocols:end -->"
INTRO = """## Reproduced tables: each paper's protocol

What `hf-fsad reproduce PAPER` runs for each table ([reproduce.md](reproduce.md)): each setting with its
source: **paper** (stated in the text), **official code** (the paper is silent; the authors' code decides)
or **ours** (neither says). The same tables head each table of a run's results.md.
"""


def generated_section() -> str:
    """The section between the markers."""
    parts = [INTRO] + [protocol_markdown(paper) for paper in PAPERS.values()]
    return "\n".join(parts)


def write(path: Path = DOCS) -> None:
    text = path.read_text(encoding="utf-8")
    block = f"{START}\n{generated_section()}{END}"
    if START in text:
        before, _, rest = text.partition(START)
        _, _, after = rest.partition(END)
        text = before + block + after
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.write_text(text, encoding="utf-8")


if __name__ == "__main__":
    write()
