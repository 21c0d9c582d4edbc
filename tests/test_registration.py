"""`import hf_fsad` is light and registers every method with transformers, whatever the import order."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

CHECK_REGISTERED = """
from transformers import AutoConfig, AutoModel
from transformers.pipelines import PIPELINE_REGISTRY
from hf_fsad.registry import METHODS
for model_type in METHODS:
    config = AutoConfig.for_model(model_type)
    assert type(config).__module__.startswith("hf_fsad."), type(config)
    assert type(config) in AutoModel._model_mapping, model_type
assert "image-anomaly-detection" in PIPELINE_REGISTRY.get_supported_tasks()
"""


def run_python(code: str) -> str:
    completed = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, check=False
    )
    assert completed.returncode == 0, completed.stderr
    return completed.stdout


@pytest.mark.parametrize(
    "imports",
    [
        "import hf_fsad",
        "import transformers\nimport hf_fsad",
        "from transformers import AutoModel\nimport hf_fsad",
        "from transformers import pipeline\nimport hf_fsad",
        "import hf_fsad\nfrom transformers.pipelines import pipeline",
        "from hf_fsad.models.winclip.modeling_winclip import WinClipModel",
    ],
    ids=[
        "hf_fsad",
        "transformers-first",
        "automodel-first",
        "pipelines-first",
        "pipelines-after",
        "modeling-only",
    ],
)
def test_methods_are_registered_in_any_import_order(imports):
    run_python(imports + "\n" + CHECK_REGISTERED)


def test_import_loads_neither_torch_nor_transformers():
    """What keeps `import hf_fsad` fast (its time is measured in benchmarks/profile_winclip.py)."""
    output = run_python("import sys, hf_fsad; print('torch' in sys.modules, 'transformers' in sys.modules)")
    assert output.split() == ["False", "False"]


LAYERED_METHODS = ["metacan", "afclip", "vtfusion", "one_to_normal"]


@pytest.mark.parametrize("method", LAYERED_METHODS)
def test_feature_layers_beyond_the_tower_are_refused_by_name(method):
    from hf_fsad.registry import config_class
    from hf_fsad.testing import tiny_clip_config

    with pytest.raises(
        ValueError, match=r"feature layer 3 does not exist: the vision tower has blocks 1\.\.2"
    ):
        config_class(method)(clip_config=tiny_clip_config(), feature_layers=[1, 3])
    with pytest.raises(ValueError, match="feature layer 0 does not exist"):
        config_class(method)(clip_config=tiny_clip_config(), feature_layers=[0])


def test_default_feature_layers_end_four_equal_groups_of_blocks():
    from hf_fsad.registry import config_class
    from hf_fsad.testing import tiny_clip_config, vit_l14_336_config

    assert config_class("afclip")(clip_config=vit_l14_336_config()).feature_layers == [6, 12, 18, 24]
    assert config_class("vtfusion")(clip_config=vit_l14_336_config(12)).feature_layers == [3, 6, 9, 12]
    # Under four blocks AF-CLIP keeps the four levels (repeating blocks); the others keep distinct blocks.
    assert config_class("afclip")(clip_config=tiny_clip_config()).feature_layers == [1, 1, 1, 2]
    assert config_class("one_to_normal")(clip_config=tiny_clip_config()).feature_layers == [1, 2]
