"""Which methods exist, and their registration with transformers' Auto classes and pipeline registry.

`import hf_fsad` stays light (transformers' modeling stack takes several seconds to import on a small
machine): it installs post-import hooks, and the classes are registered the moment transformers loads
`AutoConfig`, `AutoModel` or its pipeline registry (at once if already loaded). So after `import hf_fsad`,
`AutoModel.from_pretrained` and `pipeline("image-anomaly-detection")` work without `trust_remote_code`.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
from collections.abc import Callable

# model_type -> (module, config class name, model class name); a new method adds one line.
METHODS: dict[str, tuple[str, str, str]] = {
    "winclip": ("hf_fsad.models.winclip", "WinClipConfig", "WinClipModel"),
    "anomalous_memory": ("hf_fsad.models.anomalous_memory", "AnomalousMemoryConfig", "AnomalousMemoryModel"),
    "metacan": ("hf_fsad.models.metacan", "MetaCanConfig", "MetaCanModel"),
    "afclip": ("hf_fsad.models.afclip", "AfClipConfig", "AfClipModel"),
    "vtfusion": ("hf_fsad.models.vtfusion", "VtFusionConfig", "VtFusionModel"),
    "one_to_normal": ("hf_fsad.models.one_to_normal", "OneToNormalConfig", "OneToNormalModel"),
}


def config_class(model_type: str) -> type:
    module, config_name, _ = _method(model_type)
    return getattr(importlib.import_module(f"{module}.configuration_{model_type}"), config_name)


def model_class(model_type: str) -> type:
    module, _, model_name = _method(model_type)
    return getattr(importlib.import_module(f"{module}.modeling_{model_type}"), model_name)


def _method(model_type: str) -> tuple[str, str, str]:
    if model_type not in METHODS:
        raise ValueError(f"Unknown method {model_type!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[model_type]


def register_configs() -> None:
    from transformers import AutoConfig

    for model_type in METHODS:
        AutoConfig.register(model_type, config_class(model_type), exist_ok=True)


def register_models() -> None:
    from transformers import AutoModel

    register_configs()
    for model_type in METHODS:
        AutoModel.register(config_class(model_type), model_class(model_type), exist_ok=True)


def register_pipeline() -> None:
    from .pipeline import register_pipeline as register

    register()


_HOOKS: dict[str, Callable[[], None]] = {
    "transformers.models.auto.configuration_auto": register_configs,
    "transformers.models.auto.modeling_auto": register_models,
    "transformers.pipelines": register_pipeline,
}
_pending: set[str] = set()
_running = False


_WATCHED = ("transformers.", "hf_fsad.")


def _imports_settled(just_loaded: str | None = None) -> bool:
    """True when no transformers or hf_fsad module is half-way through its import (registering then would
    recurse into partially initialised modules)."""
    for name, module in list(sys.modules.items()):
        initializing = getattr(getattr(module, "__spec__", None), "_initializing", False)
        if initializing and name.startswith(_WATCHED) and name != just_loaded:
            return False
    return True


def _run_ready_hooks(just_loaded: str | None = None) -> None:
    global _running
    if _running or not _imports_settled(just_loaded):
        return
    _running = True
    try:
        for module_name, hook in _HOOKS.items():
            if module_name in _pending and module_name in sys.modules:
                _pending.discard(module_name)
                hook()
    finally:
        _running = False


class _RunHooksAfterExec(importlib.abc.Loader):
    """Wraps a watched module's loader to run ready registration hooks once it has executed."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module) -> None:
        self._loader.exec_module(module)
        _run_ready_hooks(just_loaded=module.__name__)

    def __getattr__(self, name):
        return getattr(self._loader, name)


class _ImportWatcher(importlib.abc.MetaPathFinder):
    def find_spec(self, fullname, path, target=None):
        if not _pending or not fullname.startswith(_WATCHED):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is None or spec.loader is None:
            return None
        spec.loader = _RunHooksAfterExec(spec.loader)
        return spec


def install_registration_hooks() -> None:
    """Register with whatever transformers has loaded already; register the rest as soon as it loads."""
    _pending.update(_HOOKS)
    _run_ready_hooks()
    if _pending and not any(isinstance(finder, _ImportWatcher) for finder in sys.meta_path):
        sys.meta_path.insert(0, _ImportWatcher())
