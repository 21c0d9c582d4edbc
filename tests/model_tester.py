"""Each method's tiny test model, declared beside its tests (transformers' per-model ModelTester).

tests/test_<model_type>.py defines `<Model>Tester` (e.g. `WinClipModelTester`), a `ModelTester` saying how to
build the method's tiny random model and what it needs to be fitted; tests/test_method_contract.py runs the
contract on the tester of every registered method, and fails for a method without one.
"""

from __future__ import annotations

import importlib
from typing import Any, ClassVar

import torch

from hf_fsad.modeling_base import FsadPreTrainedModel
from hf_fsad.registry import method_spec
from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config


class ModelTester:
    """How tests build one method's tiny random model (on `tiny_clip_config`, with the byte-level tokenizer)."""

    model_type: ClassVar[str]
    # Config fields small enough to score in well under a second on one core; the defaults elsewhere.
    config: ClassVar[dict[str, Any]] = {}
    # Config fields a pytest fixture gives: field -> fixture name (One-to-Normal's saved diffusion pipeline).
    config_fixtures: ClassVar[dict[str, str]] = {}
    # `fit` arguments beyond steps and seed that keep fitting the tiny model quick (methods fitted per category).
    fit_arguments: ClassVar[dict[str, Any]] = {}

    @classmethod
    def tiny_model(cls, seed: int = 0, clip_config=None, **config) -> FsadPreTrainedModel:
        """The tiny model in eval mode, its own layers initialised from `seed`; `config` overrides fields."""
        spec = method_spec(cls.model_type)
        torch.manual_seed(seed)
        model = spec.model(
            spec.config(clip_config=clip_config or tiny_clip_config(), **(cls.config | config))
        )
        model.tokenizer = byte_level_clip_tokenizer()
        return model.eval()


def method_tester(model_type: str) -> type[ModelTester]:
    """The `<Model>Tester` that tests/test_<model_type>.py declares for the registered method `model_type`."""
    name = f"{method_spec(model_type).model_name}Tester"
    try:
        module = importlib.import_module(f"test_{model_type}")
    except ModuleNotFoundError as error:
        if error.name != f"test_{model_type}":
            raise
        raise LookupError(f"{model_type} has no tests/test_{model_type}.py declaring its {name}") from error
    tester = getattr(module, name, None)
    if not (isinstance(tester, type) and issubclass(tester, ModelTester) and tester.model_type == model_type):
        raise LookupError(
            f"tests/test_{model_type}.py declares no {name}: a ModelTester subclass with "
            f'model_type = "{model_type}" (tests/model_tester.py)'
        )
    return tester
