"""Print pyproject.toml's core dependencies pinned at their floors (`torch>=2.7` -> `torch==2.7`), one a line.

`make test-floor` installs these into `.venv-floor`, so the environment it tests is the oldest one the
package declares it supports. Run with Python >= 3.11 (tomllib).
"""

from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"
FLOOR = re.compile(r"^(?P<name>[A-Za-z0-9_.\-]+)\s*>=\s*(?P<version>[0-9][0-9.]*)")


def floor_pins(pyproject: Path = PYPROJECT) -> list[str]:
    """`name==floor` for every core dependency; a dependency without a `>=` floor is an error."""
    pins = []
    for requirement in tomllib.loads(pyproject.read_text())["project"]["dependencies"]:
        match = FLOOR.match(requirement)
        if match is None:
            raise ValueError(f"{pyproject}: dependency {requirement!r} declares no `>=` floor")
        pins.append(f"{match['name']}=={match['version']}")
    return pins


def python_floor(pyproject: Path = PYPROJECT) -> str:
    """The oldest Python that `requires-python` admits (`>=3.11` -> `3.11`)."""
    requires = tomllib.loads(pyproject.read_text())["project"]["requires-python"]
    if not requires.startswith(">="):
        raise ValueError(f"{pyproject}: requires-python {requires!r} declares no `>=` floor")
    return requires.removeprefix(">=")


if __name__ == "__main__":
    sys.stdout.write("".join(pin + "\n" for pin in floor_pins()))
