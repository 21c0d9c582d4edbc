"""hf_fsad: few-shot image anomaly detection with CLIP, the Hugging Face way.

Importing the package registers every method with `AutoConfig`/`AutoModel` and the
`image-anomaly-detection` pipeline task (`hf_fsad.registry.register`), so `AutoModel.from_pretrained` needs
no `trust_remote_code`.
"""

from __future__ import annotations

import importlib

from .registry import METHODS, MethodSpec, method_spec, register

__version__ = "0.1.0"

_LAZY_ATTRIBUTES = {
    "AnomalyDetectionOutput": "hf_fsad.modeling_base",
    "FsadPreTrainedModel": "hf_fsad.modeling_base",
    "ReferenceBank": "hf_fsad.modeling_base",
    "FsadConfig": "hf_fsad.configuration_base",
    "ImageAnomalyDetectionPipeline": "hf_fsad.pipeline",
    "WinClipConfig": "hf_fsad.models.winclip.configuration_winclip",
    "WinClipModel": "hf_fsad.models.winclip.modeling_winclip",
    "AnomalousMemoryConfig": "hf_fsad.models.anomalous_memory.configuration_anomalous_memory",
    "AnomalousMemoryModel": "hf_fsad.models.anomalous_memory.modeling_anomalous_memory",
    "MetaCanConfig": "hf_fsad.models.metacan.configuration_metacan",
    "MetaCanModel": "hf_fsad.models.metacan.modeling_metacan",
    "AfClipConfig": "hf_fsad.models.afclip.configuration_afclip",
    "AfClipModel": "hf_fsad.models.afclip.modeling_afclip",
    "VtFusionConfig": "hf_fsad.models.vtfusion.configuration_vtfusion",
    "VtFusionModel": "hf_fsad.models.vtfusion.modeling_vtfusion",
    "OneToNormalConfig": "hf_fsad.models.one_to_normal.configuration_one_to_normal",
    "OneToNormalModel": "hf_fsad.models.one_to_normal.modeling_one_to_normal",
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


def __getattr__(name: str):
    if name in _LAZY_ATTRIBUTES:
        return getattr(importlib.import_module(_LAZY_ATTRIBUTES[name]), name)
    raise AttributeError(f"module 'hf_fsad' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)


register()
