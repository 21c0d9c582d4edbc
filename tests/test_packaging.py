"""The core install stays CPU-friendly: no torchvision, timm or open_clip in hf-fsad's dependency closure; the
declared floors admit nothing older than what the code uses."""

from __future__ import annotations

import importlib.util
import subprocess
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

FORBIDDEN = {"torchvision", "timm", "open-clip-torch"}
REPO = Path(__file__).resolve().parents[1]
# What the code uses that sets a floor: (text in src/, distribution or "python", the first release with it).
FLOOR_SETTERS = [
    ("from typing import Self", "python", "3.11"),
    ("torch.compiler.is_exporting", "torch", "2.7"),  # added in torch 2.7 (pytorch#142425)
    ("CLIPImageProcessorPil", "transformers", "5.4"),
]


def core_dependency_closure(root: str = "hf-fsad") -> set[str]:
    """Names of every installed distribution that `pip install hf-fsad` (no extras) pulls in."""
    seen, pending = set(), [root]
    while pending:
        name = canonicalize_name(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        for line in metadata.requires(name) or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen


def test_core_closure_has_no_heavy_vision_stacks():
    closure = core_dependency_closure()
    assert {"torch", "transformers", "datasets", "accelerate", "peft"} <= closure
    assert not closure & FORBIDDEN


def test_heavy_vision_stacks_are_only_in_the_convert_extra():
    extras = [Requirement(line) for line in metadata.requires("hf-fsad")]
    convert = {
        canonicalize_name(r.name) for r in extras if r.marker and r.marker.evaluate({"extra": "convert"})
    }
    assert "open-clip-torch" in convert


def declared_floors() -> dict[str, Version]:
    """pyproject.toml's floors as `make test-floor` installs them (scripts/floor_requirements.py)."""
    spec = importlib.util.spec_from_file_location(
        "floor_requirements", REPO / "scripts" / "floor_requirements.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    pins = (pin.split("==") for pin in module.floor_pins())
    return {canonicalize_name(name): Version(version) for name, version in pins} | {
        "python": Version(module.python_floor())
    }


def test_declared_floors_admit_nothing_older_than_the_code_uses():
    source = "\n".join(path.read_text() for path in (REPO / "src").rglob("*.py"))
    floors = declared_floors()
    for text, name, first_release in FLOOR_SETTERS:
        assert text in source, f"{text!r} is no longer used: drop it from FLOOR_SETTERS"
        assert floors[name] >= Version(first_release), f"{text} needs {name} >= {first_release}"


def make_commands(target: str) -> list[str]:
    """The commands `make TARGET` would run from scratch (`make -n -B`), without running them (the suite runs
    under `make test`, so make is there)."""
    result = subprocess.run(
        ["make", "-n", "-B", target], cwd=REPO, capture_output=True, text=True, check=True
    )
    return result.stdout.splitlines()


def test_make_demo_installs_only_the_core_and_make_test_every_extra_its_tests_need():
    demo_installs = [line for line in make_commands("demo") if "pip install" in line]
    assert any(line.endswith(" -e .") for line in demo_installs), demo_installs
    assert not any("[" in line for line in demo_installs), (
        demo_installs
    )  # no extras: openvino, diffusers, ...
    assert any("-e '.[dev,elpv,diffusers,space,export,ray]'" in line for line in make_commands("test-core"))
