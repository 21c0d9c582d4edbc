"""Names kept for one release after they moved or were renamed: each use warns where the new one lives.

A module whose public names moved ends with `__getattr__ = moved_names(__name__, {...})` (PEP 562), so the
old import keeps working and says where to import from instead.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any


def warn_deprecated(old: str, new: str, stacklevel: int = 3) -> None:
    """The one deprecation message: `old` still works this release; `new` is what to use."""
    warnings.warn(
        f"`{old}` is deprecated and will be removed in the next release: use `{new}`.",
        DeprecationWarning,
        stacklevel=stacklevel,
    )


@dataclass(frozen=True)
class Replaced:
    """A deprecated name with no single new home: `use` says what replaces it, `value` rebuilds the old value."""

    use: str
    value: Callable[[], Any]


def moved_names(module: str, moved: Mapping[str, str | Replaced]) -> Callable[[str], Any]:
    """A module `__getattr__` serving `module`'s deprecated names: each maps to its new dotted path (imported on
    first use) or to a `Replaced`. Other names raise AttributeError as usual."""

    def __getattr__(name: str) -> Any:
        if name not in moved:
            raise AttributeError(f"module {module!r} has no attribute {name!r}")
        target = moved[name]
        warn_deprecated(f"{module}.{name}", target.use if isinstance(target, Replaced) else target)
        if isinstance(target, Replaced):
            return target.value()
        new_module, _, new_name = target.rpartition(".")
        return getattr(importlib.import_module(new_module), new_name)

    return __getattr__


def renamed_method(old_name: str, new_name: str) -> Callable:
    """A method `old_name` that warns and calls `new_name` (kept for one release after the rename)."""

    def deprecated(self, *args, **kwargs):
        warn_deprecated(old_name, new_name)
        return getattr(self, new_name)(*args, **kwargs)

    deprecated.__name__ = deprecated.__qualname__ = old_name
    deprecated.__doc__ = f"Deprecated: use `{new_name}`."
    return deprecated
