"""One bank policy (`hf_fsad.calibration_policy.calibrated_bank`) behind the CLI, the pipeline, the Space and the
benchmark runner: the same inputs give the same bank and threshold everywhere, masks pair with their images by
file name, and the anomalous memory's weight search runs wherever defects are given unless it is skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from hf_fsad.bank import ReferenceBank
from hf_fsad.cli import main
from hf_fsad.data.toy import toy_records
from hf_fsad.models.anomalous_memory.functional_anomalous_memory import baseline_score_weights
from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel

CLASS = "fabric"


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[Path]]:
    """A `folder` benchmark layout (ROOT/good, ROOT/crack, ROOT/masks/crack) of toy images, listed as the
    policy's inputs: 3 references, 2 held-out normals, 2 defects and their masks (`<stem>_mask.png`), a query."""
    root = tmp_path_factory.mktemp("policy") / "weave"
    folders = {name: root / name for name in ("good", "crack", "masks/crack")}
    for folder in folders.values():
        folder.mkdir(parents=True)
    records = toy_records("weave", num_train=6, num_test_good=0, num_test_anomalous=2, seed=3)
    normals = []
    for index, record in enumerate(records["train"]):
        normals.append(folders["good"] / f"normal{index}.png")
        record.image.save(normals[-1])
    defects, masks = [], []
    for index, record in enumerate(records["test"]):
        defects.append(folders["crack"] / f"{index:03d}.png")
        masks.append(folders["masks/crack"] / f"{index:03d}_mask.png")
        record.image.save(defects[-1])
        record.mask.save(masks[-1])
    return {
        "root": [root],
        "references": normals[:3],
        "held_out": normals[3:5],
        "query": normals[5:],
        "defects": defects,
        "masks": masks,
    }


def _space():
    from extras import import_extra

    import_extra("gradio", "space")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))
    import app

    return app


def _strings(paths: list[Path]) -> list[str]:
    return [str(path) for path in paths]


def _cli_bank(tiny_clip_dir, files, tmp_path, *options: str) -> ReferenceBank:
    """The bank `hf-fsad score` saves from `files` with `options`."""
    bank_path, output = tmp_path / "bank.safetensors", tmp_path / "scores.jsonl"
    arguments = ["score", *_strings(files["query"]), "--model", f"anomalous_memory@{tiny_clip_dir}"]
    arguments += ["--reference", *_strings(files["references"]), "--class-name", CLASS]
    arguments += ["--defect", *_strings(files["defects"]), "--defect-mask", *_strings(files["masks"])]
    arguments += ["--save-bank", str(bank_path), "--output", str(output), *options]
    assert main(arguments) == 0
    return ReferenceBank.load(bank_path)


def _runner_bank(model, files) -> ReferenceBank:
    """The bank the benchmark runner makes for a cell whose references, anomalous references and validation
    normals are these files, read by the `folder` loader (references encoded through the feature cache)."""
    from datasets import concatenate_datasets

    from hf_fsad.calibration_policy import EncodedReferences
    from hf_fsad.data import load_benchmark
    from hf_fsad.evaluation import Protocol
    from hf_fsad.evaluation.runner import _calibrated_bank, _rgb_images
    from hf_fsad.features import FeatureCache

    data = load_benchmark("folder", root=str(files["root"][0]))
    images = concatenate_datasets([data["train"], data["test"]])
    root = files["root"][0]

    def rows(paths: list[Path]):
        return images.select([images["path"].index(str(path.relative_to(root))) for path in paths])

    references = FeatureCache().features(model, rows(files["references"]), range(3), 8, "references")
    bank, _ = _calibrated_bank(
        model,
        EncodedReferences(references),
        CLASS,
        rows(files["defects"]),
        _rgb_images(rows(files["held_out"])),
        Protocol(),
        batch_size=8,
    )
    return bank


def _assert_same_bank(bank: ReferenceBank, expected: ReferenceBank, path: str) -> None:
    assert bank.tensors.keys() == expected.tensors.keys(), path
    for name, tensor in expected.tensors.items():
        assert torch.equal(bank.tensors[name], tensor), f"{path}: {name}"
    assert bank.calibration == expected.calibration, path


def test_cli_pipeline_space_and_runner_give_the_same_bank_and_threshold(
    tiny_clip_dir, files, tmp_path, capsys
):
    """References, held-out normals and defects with masks through all four: the same tensors (weights chosen
    on the held-out normals) and the same calibration, exactly (the same code on the same pixels)."""
    from transformers import pipeline

    cli = _cli_bank(tiny_clip_dir, files, tmp_path, "--calibration-normal", *_strings(files["held_out"]))
    printed = capsys.readouterr().err
    model = AnomalousMemoryModel.from_clip(tiny_clip_dir).eval()
    pipe = pipeline("image-anomaly-detection", model=model, image_processor=model.image_processor())
    with pytest.warns(UserWarning, match="3 normal scores cannot guarantee"):
        from_pipeline = pipe.build_reference_bank(
            _strings(files["references"]),
            CLASS,
            calibration_images=_strings(files["held_out"]),
            defect_images=_strings(files["defects"]),
            defect_masks=_strings(files["masks"]),
        )
    space = _space()
    from_space, line = space.build_bank(
        model,
        space.read_images(_strings(files["references"]), "Reference"),
        _strings(files["defects"]),
        _strings(files["masks"]),
        CLASS,
        held_out=space.read_images(_strings(files["held_out"]), "Held-out normal image"),
    )
    from_runner = _runner_bank(model, files)

    # the held-out normals chose the weights, so the references calibrate it, each left out in turn
    assert "validation_auroc" in cli.tensors and "weight search (paper Sec. 4.3) ran" in printed
    assert (cli.calibration.normal_source, cli.calibration.num_normal) == ("leave_one_out", 3)
    assert "Weight search (paper Sec. 4.3) ran" in line
    for path, bank in (("pipeline", from_pipeline), ("space", from_space), ("runner", from_runner)):
        _assert_same_bank(bank, cli, path)


def test_the_space_pairs_masks_with_defects_by_file_name_not_upload_order(tiny_clip_dir, files):
    space = _space()
    model = AnomalousMemoryModel.from_clip(tiny_clip_dir).eval()
    references = space.read_images(_strings(files["references"]), "Reference")
    defects, masks = _strings(files["defects"]), _strings(files["masks"])

    def bank(mask_files: list[str]) -> ReferenceBank:
        return space.build_bank(model, references, defects, mask_files, CLASS, weight_search=False)[0]

    in_order, reversed_upload = bank(masks), bank(masks[::-1])
    _assert_same_bank(reversed_upload, in_order, "masks uploaded in reverse")
    # the two masks differ, so pairing them in upload order would have built other memories
    from hf_fsad.calibration_policy import calibrated_bank
    from hf_fsad.io import read_image, read_mask

    by_order = calibrated_bank(
        model,
        [image for _, image in references],
        class_name=CLASS,
        defects=[read_image(path) for path in defects],
        defect_masks=[read_mask(path) for path in masks[::-1]],
        weight_search=False,
    ).bank
    assert any(not torch.equal(by_order.tensors[name], in_order.tensors[name]) for name in in_order.tensors)
    # the Space's confidence option reaches the calibration and its line
    confident, line = space.build_bank(
        model, references, defects, masks, CLASS, weight_search=False, confidence=0.9
    )
    assert confident.calibration.confidence == 0.9 and confident.calibration.describe() in line


def test_the_weight_search_runs_where_defects_are_given_and_is_skipped_when_asked(
    tiny_clip_dir, files, tmp_path, capsys
):
    """CLI and pipeline: the score weights leave the baseline when defects are given (chosen on the references
    without held-out normals, which then cannot calibrate by leave-one-out), and stay there when skipped."""
    from transformers import pipeline

    kept = _cli_bank(tiny_clip_dir, files, tmp_path, "--no-weight-search")
    errors = capsys.readouterr().err
    model = AnomalousMemoryModel.from_clip(tiny_clip_dir).eval()
    baseline = baseline_score_weights(model.config.num_levels, model.available_scores(kept.tensors))
    assert "note: weight search (paper Sec. 4.3) skipped as asked" in errors
    assert torch.equal(kept.tensors["score_weights"], baseline) and "validation_auroc" not in kept.tensors
    assert kept.calibration.normal_source == "leave_one_out"
    searched = _cli_bank(tiny_clip_dir, files, tmp_path)
    errors = capsys.readouterr().err
    assert "note: weight search (paper Sec. 4.3) ran" in errors and "of 3 reference and 2 defective" in errors
    assert (
        not torch.equal(searched.tensors["score_weights"], baseline)
        and "validation_auroc" in searched.tensors
    )
    assert searched.calibration is None
    assert "not calibrated: the references chose the bank's score weights (weight search)" in errors

    status = main(["score", *_strings(files["query"]), "--model", "m", "--output", "o", "--no-weight-search"])
    assert status == 2 and "--no-weight-search goes with --defect" in capsys.readouterr().err

    pipe = pipeline("image-anomaly-detection", model=model, image_processor=model.image_processor())
    common = {"defect_images": _strings(files["defects"]), "defect_masks": _strings(files["masks"])}
    from_pipeline = pipe.build_reference_bank(_strings(files["references"]), CLASS, **common)
    _assert_same_bank(from_pipeline, searched, "pipeline")
    with pytest.warns(UserWarning, match="3 normal scores cannot guarantee"):
        skipped = pipe.build_reference_bank(
            _strings(files["references"]), CLASS, weight_search=False, **common
        )
    _assert_same_bank(skipped, kept, "pipeline, weight_search=False")
