"""Loading a method from what a user types (a saved model, a Hub id, or METHOD@CLIP), with errors a user can
act on: one line saying what was tried, what is wrong and what to do (the CLI and the Space print it)."""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


class ModelLoadError(ValueError):
    """A model could not be loaded; the message is one line for the user."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".rstrip(": ")


def check_local_model_dir(path: Path, what: str = "model") -> None:
    """Raise `ModelLoadError` when the directory `path` cannot hold a saved model: a file instead of a
    directory, no `config.json`, a `config.json` that is not JSON, or no safetensors weights."""
    if not path.is_dir():
        raise ModelLoadError(
            f"local path {path} is a file; a {what} is a directory written by save_pretrained."
        )
    config = path / "config.json"
    if not config.is_file():
        raise ModelLoadError(
            f"local directory {path} has no config.json, so it is not a saved {what}: give the directory "
            "save_pretrained (or `hf-fsad fit --out`) wrote."
        )
    try:
        json.loads(config.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ModelLoadError(
            f"local directory {path}: config.json is corrupt ({_first_line(error)}); save the {what} again."
        ) from None
    if not any(path.glob("*.safetensors")):
        raise ModelLoadError(
            f"local directory {path} holds no weights (*.safetensors; pickle weights are never loaded): "
            f"the save is incomplete, save the {what} again."
        )


def _load(loader, source: str, what: str):
    """`loader(source)`, with a local directory checked first and any failure turned into one line."""
    path = Path(source)
    if path.exists():
        check_local_model_dir(path, what)
        try:
            return loader(source)
        except Exception as error:  # noqa: BLE001  (transformers raises many types for a broken save)
            raise ModelLoadError(f"could not load the local {what} {path}: {_first_line(error)}.") from None
    if not _HUB_ID.match(source):
        raise ModelLoadError(f"local directory {source} does not exist (and it is not a Hub id).")
    try:
        return loader(source)
    except Exception as error:  # noqa: BLE001  (network, authentication and missing-repo errors all end here)
        raise ModelLoadError(
            f"{source} is not a local directory and loading it from the Hub failed ({_first_line(error)}): "
            "check the id and the network (offline, use a local copy or the cache)."
        ) from None


def load_method(source: str, *, allow_untrained: bool = False):
    """A model from `PATH_OR_HUB_ID` (a saved hf_fsad model) or `METHOD@CLIP` (a fresh method on a CLIP
    checkpoint); a `ModelLoadError` with a one-line message when it cannot be loaded.

    A method whose own parts must be trained (MetaCAN, AF-CLIP: `needs_training`) built fresh by METHOD@CLIP,
    or saved so, has random weights there and would score without meaning: it is refused with how to get
    weights, unless `allow_untrained` (demos, tests; scoring it then warns). One saved before hf_fsad recorded
    training loads, and warns when it scores.
    """
    from transformers import AutoModel

    import hf_fsad  # noqa: F401  (registers the methods)
    from hf_fsad.registry import METHODS, method_spec

    method, at, clip = source.partition("@")
    if at:
        if method not in METHODS:
            raise ModelLoadError(
                f"unknown method {method!r} in {source!r}; available: {', '.join(sorted(METHODS))}."
            )
        model_class = method_spec(method).model
        if model_class.needs_training and not allow_untrained:  # a fresh model: refused before CLIP loads
            _refuse_untrained(source, model_class.untrained_message_for("random"))
        return _load(model_class.from_clip, clip, "CLIP model")
    model = _load(AutoModel.from_pretrained, source, "model")
    if model.untrained_weights == "random" and not allow_untrained:
        _refuse_untrained(source, model.untrained_message())
    return model


def take_untrained_warning(model) -> str | None:
    """The `UntrainedWeightsWarning` that scoring `model` would give, given now and returned as text instead
    of shown, so a command line prints it once in its own words (`warning: ...`) before scoring, which then
    says nothing more (the warning comes once per model); None when there is none."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.warn_if_untrained()
    return "; ".join(str(warning.message) for warning in caught) or None


def _refuse_untrained(source: str, message: str) -> None:
    raise ModelLoadError(
        f"{source}: {message}; to score it untrained anyway (a demo, a test), pass --allow-untrained."
    )
