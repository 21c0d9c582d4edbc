"""`import hf_fsad` registers every method with transformers (`AutoConfig` / `AutoModel` / pipeline), and
`registry.METHODS` holds one spec per method."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from transformers import AutoConfig, AutoModel

from hf_fsad.registry import METHODS, method_spec
from hf_fsad.training.recipes import fit_main, fitted_methods, load_config, recipe, recipe_methods, train
from hf_fsad.training.trainer import FsadTrainingArguments

CONFIGS = Path(__file__).resolve().parents[1] / "training" / "configs"

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
    ["import hf_fsad", "from hf_fsad.models.winclip.modeling_winclip import WinClipModel"],
    ids=["hf_fsad", "modeling-only"],
)
def test_methods_are_registered_at_import(imports):
    # a subprocess: this test process has registered everything long ago
    run_python(imports + "\n" + CHECK_REGISTERED)


def test_registration_installs_no_import_hook():
    code = "import sys, hf_fsad; print([type(f).__module__ for f in sys.meta_path])"
    assert "hf_fsad" not in run_python(code)


@pytest.mark.parametrize("model_type", sorted(METHODS))
def test_each_spec_names_classes_of_its_method(model_type):
    spec = METHODS[model_type]
    assert spec.config.model_type == model_type
    assert spec.model.config_class is spec.config
    assert AutoConfig.for_model(model_type).__class__ is spec.config
    assert AutoModel._model_mapping[spec.config] is spec.model
    # what the spec declares for the command line (read without importing the model) is the model's
    assert spec.fits_per_category == spec.model.fits_per_category
    assert spec.needs_anomalous_references == spec.model.needs_anomalous_references
    if spec.trainer is not None:
        assert spec.trainer.__module__ == f"hf_fsad.models.{model_type}.training_{model_type}"
        assert issubclass(spec.training_arguments, FsadTrainingArguments)
    assert (spec.recipe is not None) <= (spec.trainer is not None)  # a recipe needs a trainer


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match="Unknown method 'patchcore'; available: afclip, anomalous_memory"):
        method_spec("patchcore")
    with pytest.raises(ValueError, match="No training recipe for 'winclip'; available: afclip, metacan"):
        recipe("winclip")


def test_a_run_config_says_its_method_or_its_entry_point_does(tmp_path):
    with pytest.raises(
        ValueError, match="does not say its method: add `method: <name>`, one of afclip, metacan"
    ):
        train({"data": {"dataset": "toy"}})
    with pytest.raises(ValueError, match="The config is for 'afclip', but this command runs 'metacan'"):
        train({"method": "afclip"}, "metacan")
    with pytest.raises(ValueError, match="does not run 'winclip'; it runs afclip, metacan"):
        train({"method": "winclip"})
    config = tmp_path / "run.yaml"
    config.write_text("output_dir: runs/fit\n")
    with pytest.raises(
        ValueError, match="does not say its method: add `method: <name>`, one of one_to_normal, vtfusion"
    ):
        fit_main(["--config", str(config)])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("*.yaml")), ids=lambda path: path.name)
def test_every_shipped_config_declares_the_method_it_is_named_for(path):
    method = load_config(path)["method"]
    assert method == path.stem.removesuffix("_toy").removesuffix("_visa").removesuffix("_official")
    assert method in recipe_methods() + fitted_methods()


# The methods whose config picks CLIP blocks.
LAYERED_METHODS = sorted(
    name for name, spec in METHODS.items() if "feature_layers" in spec.config.__dataclass_fields__
)


@pytest.mark.parametrize("method", LAYERED_METHODS)
def test_feature_layers_beyond_the_tower_are_refused_by_name(method):
    from hf_fsad.testing import tiny_clip_config

    with pytest.raises(
        ValueError, match=r"feature layer 3 does not exist: the vision tower has blocks 1\.\.2"
    ):
        method_spec(method).config(clip_config=tiny_clip_config(), feature_layers=[1, 3])
    with pytest.raises(ValueError, match="feature layer 0 does not exist"):
        method_spec(method).config(clip_config=tiny_clip_config(), feature_layers=[0])


def test_default_feature_layers_end_four_equal_groups_of_blocks():
    from hf_fsad.testing import tiny_clip_config, vit_l14_336_config

    assert method_spec("afclip").config(clip_config=vit_l14_336_config()).feature_layers == [6, 12, 18, 24]
    assert method_spec("vtfusion").config(clip_config=vit_l14_336_config(12)).feature_layers == [3, 6, 9, 12]
    # Under four blocks AF-CLIP keeps the four levels (repeating blocks); the others keep distinct blocks.
    assert method_spec("afclip").config(clip_config=tiny_clip_config()).feature_layers == [1, 1, 1, 2]
    assert method_spec("one_to_normal").config(clip_config=tiny_clip_config()).feature_layers == [1, 2]


def test_the_public_names_load_on_first_access():
    code = """
    import sys, hf_fsad
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel
    assert hf_fsad.WinClipModel is WinClipModel and "WinClipModel" in dir(hf_fsad)
    assert all(getattr(hf_fsad, name) is not None for name in hf_fsad.__all__)
    try:
        hf_fsad.NoSuchModel
    except AttributeError as error:
        print(error)
    """
    assert run_python(code).strip() == "module 'hf_fsad' has no attribute 'NoSuchModel'"


def test_auto_model_loads_a_saved_method_after_only_import_hf_fsad(saved_winclip_dir):
    code = f"""
    import hf_fsad
    from transformers import AutoModel
    print(type(AutoModel.from_pretrained({saved_winclip_dir!r})).__name__)
    """
    assert run_python(code).strip() == "WinClipModel"
