"""hf_fsad: few-shot image anomaly detection with CLIP, the Hugging Face way.

Importing the package registers every method with `AutoConfig`/`AutoModel` and the
`image-anomaly-detection` pipeline task (`hf_fsad.registry.register`), so `AutoModel.from_pretrained` needs
no `trust_remote_code`. Registering needs the model classes, hence torch and transformers: the one process
that defers it is the `hf-fsad` console script, which registers when a command runs (`hf_fsad.cli.main`), so
that `hf-fsad --help` loads neither. The public classes below load on first access (PEP 562), as
transformers' own top-level names do.
"""

from __future__ import annotations

import importlib
import sys
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .registry import METHODS, MethodSpec, method_spec, register

if TYPE_CHECKING:
    from .bank import ReferenceBank
    from .configuration_base import FsadConfig
    from .modeling_base import FsadPreTrainedModel
    from .modeling_outputs import AnomalyDetectionOutput
    from .models.afclip.configuration_afclip import AfClipConfig
    from .models.afclip.modeling_afclip import AfClipModel
    from .models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
    from .models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
    from .models.metacan.configuration_metacan import MetaCanConfig
    from .models.metacan.modeling_metacan import MetaCanModel
    from .models.one_to_normal.configuration_one_to_normal import OneToNormalConfig
    from .models.one_to_normal.modeling_one_to_normal import OneToNormalModel
    from .models.vtfusion.configuration_vtfusion import VtFusionConfig
    from .models.vtfusion.modeling_vtfusion import VtFusionModel
    from .models.winclip.configuration_winclip import WinClipConfig
    from .models.winclip.modeling_winclip import WinClipModel
    from .pipeline import ImageAnomalyDetectionPipeline

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it, imported on first access
_LAZY_NAMES = {
    "AnomalyDetectionOutput": "modeling_outputs",
    "FsadPreTrainedModel": "modeling_base",
    "ReferenceBank": "bank",
    "FsadConfig": "configuration_base",
    "ImageAnomalyDetectionPipeline": "pipeline",
    **{
        spec.config_name: f"models.{spec.model_type}.configuration_{spec.model_type}"
        for spec in METHODS.values()
    },
    **{spec.model_name: f"models.{spec.model_type}.modeling_{spec.model_type}" for spec in METHODS.values()},
}

__all__ = [  # noqa: RUF022  (grouped as above)
    "METHODS",
    "MethodSpec",
    "method_spec",
    "__version__",
    "AnomalyDetectionOutput",
    "FsadPreTrainedModel",
    "ReferenceBank",
    "FsadConfig",
    "ImageAnomalyDetectionPipeline",
    "WinClipConfig",
    "WinClipModel",
    "AnomalousMemoryConfig",
    "AnomalousMemoryModel",
    "MetaCanConfig",
    "MetaCanModel",
    "AfClipConfig",
    "AfClipModel",
    "VtFusionConfig",
    "VtFusionModel",
    "OneToNormalConfig",
    "OneToNormalModel",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY_NAMES[name]}", __name__), name)
    globals()[name] = value  # later accesses skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES})


def _started_as_the_command_line() -> bool:
    """Whether this process is the command line: the `hf-fsad` console script (`sys.argv[0]` is the script
    while it imports `hf_fsad.cli`; `hf-fsad.exe` on Windows) or `python -m hf_fsad.cli` (the interpreter's
    own arguments, `sys.orig_argv`, name the module)."""
    command = getattr(sys, "orig_argv", [])
    as_module = ("-m", "hf_fsad.cli") in pairwise(command) or "-mhf_fsad.cli" in command
    return as_module or Path((getattr(sys, "argv", None) or [""])[0]).stem == "hf-fsad"


if not _started_as_the_command_line():
    register()
