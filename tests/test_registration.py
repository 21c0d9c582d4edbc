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
