"""Write docs/cli.md, the `hf-fsad` command reference: the `--help` of the command and of each subcommand,
as the parser prints it at a fixed width of 100 columns (`make cli-docs`). tests/test_cli.py fails when the
file and the parser disagree.

    python scripts/cli_reference.py [OUTPUT]   # default: docs/cli.md
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

from hf_fsad.cli import build_parser

WIDTH = 100
DOCS = Path(__file__).resolve().parents[1] / "docs" / "cli.md"

HEADER = """# Command-line reference

Every `hf-fsad` command with its options, as `hf-fsad COMMAND --help` prints them (wrapped at 100
columns in this page; in a terminal, at its width). The Python API and the methods are described in the
[README](../README.md).

`hf-fsad --help` and every `hf-fsad COMMAND --help` (also as `python -m hf_fsad.cli`) load neither torch
nor transformers nor datasets (they load when a command runs): `time hf-fsad --help` takes 0.13 s, against
4.9 s before the command line was split (issue 26; both measured in one run on a 2-core CPU machine), and
`time python -m hf_fsad.cli --help` 0.14-0.21 s (4.6 s before).
"""


def _help(parser: argparse.ArgumentParser) -> str:
    """`parser`'s help text, wrapped at WIDTH columns whatever the terminal."""
    parser.formatter_class = functools.partial(argparse.HelpFormatter, width=WIDTH)
    if hasattr(parser, "color"):
        parser.color = False  # Python >= 3.14 colours help text on a terminal
    return parser.format_help().rstrip()


def reference() -> str:
    """The Markdown of docs/cli.md: one section per command, its help text in a code block."""
    parser = build_parser()
    (commands,) = [action for action in parser._actions if isinstance(action, argparse._SubParsersAction)]
    sections = [("hf-fsad", parser)] + [(f"hf-fsad {name}", sub) for name, sub in commands.choices.items()]
    parts = [HEADER]
    for title, command in sections:
        parts.append(f"## `{title}`\n\n```text\n{_help(command)}\n```\n")
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    arguments = sys.argv[1:] if argv is None else argv
    output = Path(arguments[0]) if arguments else DOCS
    output.write_text(reference(), encoding="utf-8")
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
