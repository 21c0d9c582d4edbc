"""Methods whose own parts must be trained (MetaCAN's differentiator and detector, AF-CLIP's adapter and
prompts) are not scored with random weights without a word: the CLI and the Space refuse them with how to
get weights unless allowed, Python warns once per model, and a model saved before `config.trained_parts`
existed warns instead of being refused."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import pytest
import torch

from extras import import_extra
from hf_fsad.cli import main
from hf_fsad.configuration_base import FsadConfig
from hf_fsad.data.toy import toy_records
from hf_fsad.loading import ModelLoadError, load_method
from hf_fsad.modeling_base import UntrainedWeightsWarning
from hf_fsad.registry import METHODS, method_spec
from model_tester import method_tester
from test_afclip import AfClipModelTester
from test_metacan import MetaCanModelTester

TESTERS = {"metacan": MetaCanModelTester, "afclip": AfClipModelTester}
HOW_TO_GET_WEIGHTS = {
    "metacan": "accelerate launch training/train_metacan.py",
    "afclip": "hf-fsad convert --afclip-official",
}


@pytest.fixture(scope="module")
def toy_files(tmp_path_factory):
    """Two normal references (`refs/`) and one query as PNG files."""
    root = tmp_path_factory.mktemp("untrained_toy")
    splits = toy_records("stripes", num_train=2, num_test_good=1, num_test_anomalous=0, seed=3)
    (root / "refs").mkdir()
    for index, example in enumerate(splits["train"]):
        example.image.save(root / "refs" / f"ref{index}.png")
    splits["test"][0].image.save(root / "query.png")
    return root


def saved_model(model_type: str, directory: Path, **fields) -> str:
    """The tester's tiny random `model_type` model with config `fields` set, saved to `directory`."""
    model = TESTERS[model_type].tiny_model()
    for name, value in fields.items():
        setattr(model.config, name, value)
    model.save_pretrained(directory)
    return str(directory)


def saved_before_the_field(model_type: str, directory: Path) -> str:
    """A saved model whose config.json has no `trained_parts`, as hf_fsad wrote before it existed."""
    saved_model(model_type, directory)
    config_file = directory / "config.json"
    config = json.loads(config_file.read_text())
    del config["trained_parts"]
    config_file.write_text(json.dumps(config))
    return str(directory)


def score(model: str, root: Path, output: Path, *options: str) -> int:
    return main(
        ["score", str(root / "query.png"), "--model", model, "--reference", str(root / "refs")]
        + ["--output", str(output), *options]
    )


def untrained_warnings(caught) -> list[str]:
    return [str(warning.message) for warning in caught if warning.category is UntrainedWeightsWarning]


# --- which methods, and what their config records -----------------------------------------------------------


def test_exactly_the_methods_with_trained_parts_need_training():
    assert {method for method in METHODS if method_spec(method).model.needs_training} == {"metacan", "afclip"}


def test_the_config_records_fresh_saved_and_pre_field_models(tmp_path):
    assert FsadConfig.__dataclass_fields__["trained_parts"].default == "random"
    fresh = load_method(saved_model("metacan", tmp_path / "fresh"), allow_untrained=True)
    assert (fresh.config.trained_parts, fresh.untrained_weights) == ("random", "random")  # saved, still fresh
    old = load_method(saved_before_the_field("metacan", tmp_path / "old"))
    assert (old.config.trained_parts, old.untrained_weights) == ("unrecorded", "unrecorded")
    # the field is provenance: it leaves the bank fingerprint as it was, so banks of old saves still fit
    assert old.config_hash() == fresh.config_hash()
    with pytest.raises(ValueError, match="trained_parts must be one of"):
        MetaCanModelTester.tiny_model(trained_parts="yes")


# --- the CLI ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TESTERS))
def test_the_cli_refuses_a_fresh_method_at_clip_in_one_line_with_how_to_get_weights(
    model_type, tiny_clip_dir, toy_files, tmp_path, capsys
):
    output = tmp_path / "results.jsonl"
    assert score(f"{model_type}@{tiny_clip_dir}", toy_files, output) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: --model: {model_type}@")
    assert "were never trained (random weights)" in errors[0]
    assert HOW_TO_GET_WEIGHTS[model_type] in errors[0] and "pass --allow-untrained" in errors[0]
    assert not output.exists()


def warning_lines(capsys) -> list[str]:
    return [
        line
        for line in capsys.readouterr().err.splitlines()
        if "UntrainedWeightsWarning" in line or (line.startswith("warning: ") and "trained" in line)
    ]


def test_allow_untrained_scores_a_random_model_and_warns_once(toy_files, tmp_path, capsys):
    model = saved_model("metacan", tmp_path / "metacan")
    assert score(model, toy_files, tmp_path / "refused.jsonl") == 2  # saved with random heads: still fresh
    assert "differentiator and detector were never trained" in capsys.readouterr().err
    output = tmp_path / "results.jsonl"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert score(model, toy_files, output, "--allow-untrained") == 0
    assert untrained_warnings(caught) == []  # said once, as the CLI's own line
    (line,) = warning_lines(capsys)
    assert line.startswith("warning: metacan's differentiator and detector were never trained")
    assert len(output.read_text().splitlines()) == 1


def test_a_model_saved_before_the_field_is_scored_with_a_warning_not_refused(toy_files, tmp_path, capsys):
    model = saved_before_the_field("afclip", tmp_path / "afclip")
    output = tmp_path / "results.jsonl"
    assert score(model, toy_files, output) == 0
    (line,) = warning_lines(capsys)
    assert "saved before hf_fsad recorded training" in line and HOW_TO_GET_WEIGHTS["afclip"] in line
    assert len(output.read_text().splitlines()) == 1


@pytest.mark.parametrize(
    "fields", [{"trained_parts": "trained"}, {"trained_parts": "converted"}, {"trained_on": "mvtec_ad"}]
)
def test_a_trained_model_is_scored_without_a_word(fields, toy_files, tmp_path, capsys):
    model = saved_model("metacan", tmp_path / "metacan", **fields)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UntrainedWeightsWarning)
        assert score(model, toy_files, tmp_path / "results.jsonl") == 0
    assert warning_lines(capsys) == []


# --- Python -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model_type", sorted(TESTERS))
def test_python_warns_once_per_untrained_model(model_type):
    pixels = torch.randn(2, 3, 240, 240)
    for _ in range(2):  # a second model warns again, each model once
        model = TESTERS[model_type].tiny_model()
        with warnings.catch_warnings(record=True) as caught, torch.no_grad():
            warnings.simplefilter("always")  # every warning recorded, repeats too: once is the model's doing
            bank = model.build_reference_bank(pixels)
            model(pixels, reference_bank=bank)
            model(pixels, reference_bank=bank)
        (message,) = untrained_warnings(caught)
        assert message == model.untrained_message() and HOW_TO_GET_WEIGHTS[model_type] in message


@pytest.mark.parametrize("model_type", ["winclip", "anomalous_memory", "metacan"])
def test_trained_and_training_free_models_score_without_a_warning(model_type):
    trained = {"trained_parts": "trained"} if model_type == "metacan" else {}
    model = method_tester(model_type).tiny_model(**trained)  # training-free ones keep the default "random"
    pixels = torch.randn(2, 3, 240, 240)
    inputs = {"anomalous_pixel_values": pixels[:1]} if model.needs_anomalous_references else {}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("error", UntrainedWeightsWarning)
        model(pixels, reference_bank=model.build_reference_bank(pixels, **inputs))
    assert model.untrained_weights is None


# --- the Space ----------------------------------------------------------------------------------------------


def test_the_space_offers_and_scores_untrained_models_only_when_allowed(tmp_path):
    gradio = import_extra("gradio", "space")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
    import app as space

    fresh = [choice.split("@")[0] for choice in space.method_choices([])]
    assert fresh[0] == "winclip" and "metacan" not in fresh and "afclip" not in fresh
    assert {"metacan", "afclip"} <= {choice.split("@")[0] for choice in space.method_choices([], True)}
    model = saved_model("afclip", tmp_path / "afclip")
    with pytest.raises(gradio.Error, match="adapter and prompts were never trained.*--allow-untrained"):
        space.get_pipeline(model)
    assert space.get_pipeline(model, allow_untrained=True).model.untrained_weights == "random"
    with pytest.raises(ModelLoadError):  # what the Space turns into its error
        load_method(model)


def test_benchmark_and_export_refuse_it_too_unless_allowed(tiny_clip_dir, tmp_path, capsys):
    fresh = f"metacan@{tiny_clip_dir}"
    benchmark = ["benchmark", "--methods", fresh, "--datasets", "toy", "--out", str(tmp_path / "runs")]
    assert main(benchmark) == 2
    errors = capsys.readouterr().err
    assert (
        "error: --methods metacan@" in errors and "differentiator and detector were never trained" in errors
    )
    assert main(["export", "--model", fresh, "--out", str(tmp_path / "exported")]) == 2
    errors = capsys.readouterr().err
    assert "differentiator and detector were never trained" in errors and "--allow-untrained" in errors
    assert not (tmp_path / "exported").exists()
