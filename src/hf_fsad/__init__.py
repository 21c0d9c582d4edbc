"""hf_fsad: few-shot image anomaly detection with CLIP, the Hugging Face way.

Importing the package registers every method with `AutoConfig`/`AutoModel` and the
`image-anomaly-detection` pipeline task (`hf_fsad.registry.register`), so `AutoModel.from_pretrained` needs
no `trust_remote_code`.
"""

from __future__ import annotations

from .configuration_base import FsadConfig
from .modeling_base import AnomalyDetectionOutput, FsadPreTrainedModel, ReferenceBank
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
from .registry import METHODS, MethodSpec, method_spec, register

__version__ = "0.1.0"

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

register()
