"""Which methods exist: one `MethodSpec` per method, and their registration with transformers.

`register()` (run by `import hf_fsad`; in the `hf-fsad` console script, when its command runs) registers every method's config and model with `AutoConfig` /
`AutoModel` and the `image-anomaly-detection` task with the pipeline registry, the way transformers documents
for custom models, so `AutoModel.from_pretrained` and `pipeline("image-anomaly-detection")` work without
`trust_remote_code`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


@dataclass(frozen=True, kw_only=True)
class MethodSpec:
    """One method: its classes, found by name in `hf_fsad.models.<model_type>.<kind>_<model_type>`.

    trainer / training_arguments: the class that trains or fits the model and its arguments (in
    `training_<model_type>.py`), None for methods that only build banks. recipe: what
    `hf_fsad.training.recipes.train` calls the training in a model card ("AD meta-learning"), None for
    methods that YAML training recipes do not train (those fitted per category train through `model.fit`).
    Trainers load on first use: they import the training stack (accelerate, datasets).

    fits_per_category / needs_anomalous_references: the model class's capability flags of those names,
    declared here too so that the command line's help lists the methods without importing them (and torch);
    tests/test_registration.py checks that both say the same.
    """

    model_type: str
    config_name: str
    model_name: str
    trainer_name: str | None = None
    training_arguments_name: str | None = None
    recipe: str | None = None
    fits_per_category: bool = False
    needs_anomalous_references: bool = False

    def _load(self, kind: str, name: str | None) -> type | None:
        if name is None:
            return None
        module = importlib.import_module(f"hf_fsad.models.{self.model_type}.{kind}_{self.model_type}")
        return getattr(module, name)

    @property
    def config(self) -> type:
        return self._load("configuration", self.config_name)

    @property
    def model(self) -> type:
        return self._load("modeling", self.model_name)

    @property
    def trainer(self) -> type | None:
        return self._load("training", self.trainer_name)

    @property
    def training_arguments(self) -> type | None:
        return self._load("training", self.training_arguments_name)


# model_type -> its spec; a new method adds one entry.
METHODS: dict[str, MethodSpec] = {
    spec.model_type: spec
    for spec in (
        MethodSpec(model_type="winclip", config_name="WinClipConfig", model_name="WinClipModel"),
        MethodSpec(
            model_type="anomalous_memory",
            config_name="AnomalousMemoryConfig",
            model_name="AnomalousMemoryModel",
            needs_anomalous_references=True,
        ),
        MethodSpec(
            model_type="metacan",
            config_name="MetaCanConfig",
            model_name="MetaCanModel",
            trainer_name="MetaLearner",
            training_arguments_name="MetaCanTrainingArguments",
            recipe="AD meta-learning",
        ),
        MethodSpec(
            model_type="afclip",
            config_name="AfClipConfig",
            model_name="AfClipModel",
            trainer_name="AfClipTrainer",
            training_arguments_name="AfClipTrainingArguments",
            recipe="prompt and adapter training",
        ),
        MethodSpec(
            model_type="vtfusion",
            config_name="VtFusionConfig",
            model_name="VtFusionModel",
            trainer_name="VtFusionTrainer",
            training_arguments_name="VtFusionTrainingArguments",
            fits_per_category=True,
        ),
        MethodSpec(
            model_type="one_to_normal",
            config_name="OneToNormalConfig",
            model_name="OneToNormalModel",
            trainer_name="DreamBoothLoraTrainer",
            training_arguments_name="OneToNormalTrainingArguments",
            fits_per_category=True,
        ),
    )
}


def method_spec(model_type: str) -> MethodSpec:
    """The spec of `model_type`; a ValueError lists the known methods."""
    if model_type not in METHODS:
        raise ValueError(f"Unknown method {model_type!r}; available: {', '.join(sorted(METHODS))}.")
    return METHODS[model_type]


def register() -> None:
    """Register every method with `AutoConfig`, `AutoModel` and the pipeline registry."""
    from transformers import AutoConfig, AutoModel

    from .pipeline import register_pipeline

    for spec in METHODS.values():
        AutoConfig.register(spec.model_type, spec.config, exist_ok=True)
        AutoModel.register(spec.config, spec.model, exist_ok=True)
    register_pipeline()
