"""Optional extras in tests: `make test` installs every extra, so a missing one means a broken install."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import pytest


def import_extra(module: str, extra: str) -> ModuleType:
    """Import `module`, which the `extra` extra installs. When it is missing the test (or test module) that
    asks for it fails, unless HF_FSAD_ALLOW_MISSING_EXTRAS=1 is set outside CI: then it is skipped."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        in_ci = os.environ.get("CI", "").lower() not in ("", "0", "false")
        if os.environ.get("HF_FSAD_ALLOW_MISSING_EXTRAS") == "1" and not in_ci:
            pytest.skip(f"the `{extra}` extra is not installed ({error})", allow_module_level=True)
        raise ImportError(
            f"{module} is missing: install the `{extra}` extra (`make test` installs every extra), or set "
            "HF_FSAD_ALLOW_MISSING_EXTRAS=1 to skip the tests that need it."
        ) from error
