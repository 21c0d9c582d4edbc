"""The core install stays CPU-friendly: no torchvision, timm or open_clip in hf-fsad's dependency closure."""

from __future__ import annotations

from importlib import metadata

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

FORBIDDEN = {"torchvision", "timm", "open-clip-torch"}


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
