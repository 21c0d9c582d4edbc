"""hf_fsad's progress bars (tqdm), which `hf-fsad --quiet` turns off as transformers' `disable_progress_bar`
does for its own."""

from __future__ import annotations

from typing import Any

from tqdm.auto import tqdm

_bars_enabled = True


def progress_bar(*args: Any, disable: bool = False, **kwargs: Any) -> tqdm:
    """`tqdm.auto.tqdm(*args, **kwargs)`, off when `disable` or while `disable_progress_bars` holds."""
    return tqdm(*args, disable=disable or not _bars_enabled, **kwargs)


def are_progress_bars_enabled() -> bool:
    return _bars_enabled


def enable_progress_bars() -> None:
    global _bars_enabled
    _bars_enabled = True


def disable_progress_bars() -> None:
    global _bars_enabled
    _bars_enabled = False
