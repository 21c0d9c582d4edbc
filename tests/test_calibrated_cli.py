"""`hf-fsad score` with calibrated decisions: labels in the JSON lines, the calibration kept in saved banks,
held-out and anomalous calibration files, and runs that cannot be calibrated."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from calibration_checks import BATCHING_ABS, BATCHING_REL, assert_same_calibration
from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import normalize_around
from hf_fsad.cli import main
from hf_fsad.data.toy import toy_records
from hf_fsad.models.winclip.modeling_winclip import WinClipModel
from hf_fsad.visualization import mask_array, outline_region

BEST_F1 = ["--threshold-rule", "best-f1"]
# The CLI scores and calibrates in batches of 2 where a test compares its calibration with `calibrate`'s (in
# batches of 8): the comparison then shows that batching does not change it beyond rounding.
BATCHES_OF_2 = ["--batch-size", "2"]
UNCALIBRATED_KEYS = {"path", "score", "branch_scores", "heatmap"}
CALIBRATED_KEYS = UNCALIBRATED_KEYS | {"label", "normalized_score", "threshold", "regions"}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """refs/ (3 normal), held_out/ (3 normal), defects/ (2 anomalous) with masks/ (`<stem>_mask.png`) and
    queries/ (2 good, 2 anomalous), as PNG files."""
    root = tmp_path_factory.mktemp("calibration_files")
    splits = toy_records("stripes", num_train=6, num_test_good=2, num_test_anomalous=4, seed=4)
    folders = {name: root / name for name in ("refs", "held_out", "defects", "masks", "queries")}
    for folder in folders.values():
        folder.mkdir()
    for index, example in enumerate(splits["train"]):
        example.image.save(folders["refs" if index < 3 else "held_out"] / f"normal{index}.png")
    good = [example for example in splits["test"] if example.mask is None]
    defective = [example for example in splits["test"] if example.mask is not None]
    for index, example in enumerate(defective[:2]):
        example.image.save(folders["defects"] / f"{index:03d}.png")
        example.mask.save(folders["masks"] / f"{index:03d}_mask.png")
    for index, example in enumerate([*good, *defective[2:]]):
        example.image.save(folders["queries"] / f"{example.defect_type}{index}.png")
    return folders


def _read(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def _pixels(model, folder):
    images = [Image.open(path).convert("RGB") for path in sorted(folder.iterdir())]
    return model.image_processor()(images, return_tensors="pt").pixel_values


def _score(model_dir, files, tmp_path, *options):
    output = tmp_path / "results.jsonl"
    status = main(["score", "--model", model_dir, "--output", str(output), str(files["queries"]), *options])
    return status, (_read(output) if status == 0 else None)


def _assert_verdicts(records, calibration, errors):
    assert all(set(record) == CALIBRATED_KEYS for record in records)
    assert all(record["threshold"] == calibration.image_threshold for record in records)
    scores = torch.tensor([record["score"] for record in records])
    assert [record["label"] for record in records] == [
        "anomalous" if score > calibration.image_threshold else "normal" for score in scores.double().tolist()
    ]
    # the JSON score is the float32 score the model normalised, through the same function: exact
    assert [record["normalized_score"] for record in records] == calibration.normalize(scores).tolist()
    failed = sum(record["label"] == "anomalous" for record in records)
    assert f"{len(records)} images: {failed} fail (anomalous), {len(records) - failed} pass" in errors
    assert f"calibration: {calibration.describe()}" in errors


def test_references_are_calibrated_leave_one_out_and_the_bank_keeps_it(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    status, records = _score(
        saved_winclip_dir, files, tmp_path, "--reference", str(files["refs"]), "--save-bank", str(bank_path),
        *BATCHES_OF_2,
    )  # fmt: skip
    assert status == 0
    errors = capsys.readouterr().err
    calibration = ReferenceBank.load(bank_path).calibration
    assert (calibration.normal_source, calibration.num_normal, calibration.rule) == (
        "leave_one_out", 3, "false_alarm_rate"
    )  # fmt: skip
    _assert_verdicts(records, calibration, errors)
    # both verdicts occur (fixed seeds), so the label check tells them apart
    assert {record["label"] for record in records} == {"normal", "anomalous"}
    # 3 normals cannot reach 5 %: the warning says so on one line
    assert "warning: 3 normal scores cannot guarantee a false-alarm rate of 5.0%" in errors
    # the calibration is model.calibrate's on the same references, in its batches of 8
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    references = _pixels(model, files["refs"])
    with torch.no_grad():
        expected = model.calibrate(model.build_reference_bank(references), references).calibration
    assert_same_calibration(calibration, expected)

    # the saved bank scores the same verdicts again
    status, reused = _score(saved_winclip_dir, files, tmp_path, "--bank", str(bank_path), *BATCHES_OF_2)
    assert status == 0 and reused == records


def test_a_saved_bank_is_calibrated_on_held_out_normals(saved_winclip_dir, files, tmp_path, capsys):
    plain, calibrated = tmp_path / "plain.safetensors", tmp_path / "calibrated.safetensors"
    status, records = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--no-calibration", "--save-bank", str(plain),
    )  # fmt: skip
    assert status == 0 and all(set(record) == UNCALIBRATED_KEYS for record in records)
    assert ReferenceBank.load(plain).calibration is None
    errors = capsys.readouterr().err
    assert "calibration" not in errors and "fail (anomalous)" not in errors

    status, records = _score(
        saved_winclip_dir, files, tmp_path,
        "--bank", str(plain), "--calibration-normal", str(files["held_out"]),
        "--false-alarm-rate", "0.25", "--save-bank", str(calibrated), *BATCHES_OF_2,
    )  # fmt: skip
    assert status == 0
    calibration = ReferenceBank.load(calibrated).calibration
    assert (calibration.normal_source, calibration.num_normal) == ("held_out", 3)
    assert calibration.target_false_alarm_rate == 0.25
    _assert_verdicts(records, calibration, capsys.readouterr().err)
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    with torch.no_grad():
        held_out = model(_pixels(model, files["held_out"]), reference_bank=ReferenceBank.load(plain))
    # 3 normals at 25 %: j = ceil(4 * 0.75) = 3, the largest score (the CLI's in batches of 2, these in one)
    assert calibration.image_threshold == pytest.approx(
        held_out.image_scores.max().item(), rel=BATCHING_REL, abs=BATCHING_ABS
    )

    # --no-calibration leaves a calibrated bank's calibration out
    status, records = _score(
        saved_winclip_dir, files, tmp_path, "--bank", str(calibrated), "--no-calibration"
    )
    assert status == 0 and all(set(record) == UNCALIBRATED_KEYS for record in records)


def test_anomalous_images_report_their_miss_rate_at_the_false_alarm_threshold(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    status, records = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--calibration-anomalous", str(files["defects"]),
        "--save-bank", str(bank_path), *BATCHES_OF_2,
    )  # fmt: skip
    assert status == 0
    calibration = ReferenceBank.load(bank_path).calibration
    assert (calibration.rule, calibration.pixel_rule, calibration.num_anomalous) == (
        "false_alarm_rate",
        "false_alarm_rate",
        2,
    )
    errors = capsys.readouterr().err
    assert f"calibration: {calibration.describe()}" in errors and "misses" in errors
    _assert_verdicts(records, calibration, errors)
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    references = _pixels(model, files["refs"])
    with torch.no_grad():
        bank = model.build_reference_bank(references)
        expected = model.calibrate(
            bank, references, anomalous_pixel_values=_pixels(model, files["defects"])
        ).calibration
        normals_only = model.calibrate(bank, references).calibration
    assert_same_calibration(calibration, expected)
    # the anomalous images leave the normals' threshold as it is (both computed in calibrate's batches)
    assert expected.image_threshold == normals_only.image_threshold
    assert calibration.calibration_miss_rate is not None


def test_threshold_rule_best_f1_with_masks_gives_best_f1_thresholds(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    status, records = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--calibration-anomalous", str(files["defects"]),
        "--calibration-masks", str(files["masks"]), "--save-bank", str(bank_path), *BEST_F1, *BATCHES_OF_2,
    )  # fmt: skip
    assert status == 0
    calibration = ReferenceBank.load(bank_path).calibration
    assert (calibration.rule, calibration.pixel_rule, calibration.num_anomalous) == ("best_f1", "best_f1", 2)
    _assert_verdicts(records, calibration, capsys.readouterr().err)
    model = WinClipModel.from_pretrained(saved_winclip_dir)
    references = _pixels(model, files["refs"])
    size = model.config.image_size
    masks = torch.stack(
        [torch.from_numpy(mask_array(Image.open(path), size)) for path in sorted(files["masks"].iterdir())]
    )
    with torch.no_grad():
        expected = model.calibrate(
            model.build_reference_bank(references),
            references,
            anomalous_pixel_values=_pixels(model, files["defects"]),
            anomalous_masks=masks,
            rule="best_f1",
        ).calibration
    assert_same_calibration(calibration, expected)


def test_one_reference_is_reported_and_scored_uncalibrated(saved_winclip_dir, files, tmp_path, capsys):
    one = str(files["refs"] / "normal0.png")
    status, records = _score(saved_winclip_dir, files, tmp_path, "--reference", one)
    assert status == 0 and all(set(record) == UNCALIBRATED_KEYS for record in records)
    errors = capsys.readouterr().err
    assert "not calibrated: leave-one-out needs at least 2 reference images, got 1;" in errors
    assert "fail (anomalous)" not in errors
    # asked for explicitly, the same calibration stops the run
    status, _ = _score(saved_winclip_dir, files, tmp_path, "--reference", one, "--false-alarm-rate", "0.1")
    assert status == 2
    assert "error: calibration: Cannot calibrate by leave-one-out: leave-one-out needs at least 2" in (
        capsys.readouterr().err
    )


def test_a_manual_threshold_overrides_the_calibrated_one_and_says_so(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    references = ["--reference", str(files["refs"])]
    status, calibrated = _score(
        saved_winclip_dir, files, tmp_path, *references, "--save-bank", str(bank_path)
    )
    assert status == 0 and {record["label"] for record in calibrated} == {"normal", "anomalous"}
    scale = ReferenceBank.load(bank_path).calibration.image_scale
    scores = [record["score"] for record in calibrated]
    capsys.readouterr()
    for manual, label in ((max(scores) + 1, "normal"), (min(scores) - 1, "anomalous")):
        status, records = _score(saved_winclip_dir, files, tmp_path, *references, "--threshold", str(manual))
        assert status == 0 and [record["score"] for record in records] == scores
        assert [record["label"] for record in records] == [label] * len(records)
        assert all(
            record["threshold"] == manual and record["threshold_source"] == "manual" for record in records
        )
        # normalised around the manual threshold on the calibration's scale: 0.5 at it, above it exactly
        # where the verdict fails
        expected = normalize_around(torch.tensor(scores, dtype=torch.float64), manual, scale).tolist()
        assert [record["normalized_score"] for record in records] == expected
        assert all((record["normalized_score"] > 0.5) == (label == "anomalous") for record in records)
        errors = capsys.readouterr().err
        assert f"threshold: manual {manual:.6g} (--threshold) decides the verdicts" in errors
        assert f"{len(records)} images: " in errors
    # without a calibration (one reference) the manual threshold still gives verdicts, with no scale to
    # normalise on
    one = str(files["refs"] / "normal0.png")
    status, records = _score(
        saved_winclip_dir, files, tmp_path, "--reference", one, "--threshold", str(manual)
    )
    assert status == 0 and all(record["label"] == "anomalous" for record in records)
    assert all(record["normalized_score"] is None for record in records)


def test_a_threshold_that_is_not_a_finite_number_is_refused_by_the_parser(capsys):
    with pytest.raises(SystemExit):
        main(["score", "x.png", "--model", "m", "--output", "o.jsonl", "--threshold", "nan"])
    assert "--threshold: must be a finite number, got nan" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (["--calibration-masks", "{masks}"], "--calibration-masks needs --calibration-anomalous"),
        (
            [*BEST_F1, "--calibration-anomalous", "{defects}", "--calibration-masks", "{masks}/000_mask.png"],
            "--calibration-masks has no mask for {defects}/001.png",
        ),
        (
            [*BEST_F1, "--calibration-anomalous", "{defects}/000.png", "--calibration-masks", "{masks}"],
            "--calibration-masks {masks}/001_mask.png match no --calibration-anomalous image",
        ),
        (
            [
                *BEST_F1,
                "--calibration-anomalous",
                "{defects}/000.png",
                "--calibration-masks",
                "{masks}/000_mask.png",
                "{defects}/000.png",
            ],
            "--calibration-masks {masks}/000_mask.png and {defects}/000.png both match the image stem '000'",
        ),
        (
            ["--calibration-anomalous", "{defects}", "--calibration-masks", "{masks}"],
            "--calibration-masks set the pixel threshold by best pixel F1: add --threshold-rule best-f1",
        ),
        (BEST_F1, "--threshold-rule best-f1 needs --calibration-anomalous"),
        ([*BEST_F1, "--no-calibration"], "--no-calibration goes with no other"),
        (["--calibration-normal", "{broken}"], "--calibration-normal {broken}: not an image PIL can read"),
        (["--calibration-normal", "{empty}"], "--calibration-normal holds no image files"),
        (["--calibration-normal", "{held_out}", "--no-calibration"], "--no-calibration goes with no other"),
    ],
)
def test_calibration_files_that_cannot_be_used_stop_the_run(
    saved_winclip_dir, files, tmp_path, capsys, options, message
):
    (tmp_path / "broken.png").write_text("not an image")
    (tmp_path / "empty").mkdir()
    paths = {name: str(folder) for name, folder in files.items()}
    paths |= {"broken": str(tmp_path / "broken.png"), "empty": str(tmp_path / "empty")}
    status, _ = _score(saved_winclip_dir, files, tmp_path, *(option.format(**paths) for option in options))
    assert status == 2
    assert f"error: {message.format(**paths)}" in capsys.readouterr().err


def test_a_method_that_keeps_its_references_says_why_and_can_use_held_out_normals(files, tmp_path, capsys):
    from test_vtfusion import VtFusionModelTester

    model = VtFusionModelTester.tiny_model()
    model.fit([Image.open(path) for path in sorted(files["refs"].iterdir())], class_name="tile", steps=1)
    model.save_pretrained(tmp_path / "vtfusion")
    status, records = _score(str(tmp_path / "vtfusion"), files, tmp_path)
    assert status == 0 and all(set(record) == UNCALIBRATED_KEYS for record in records)
    errors = capsys.readouterr().err
    assert "not calibrated: VtFusionModel keeps what it learnt from its normal images" in errors
    status, records = _score(
        str(tmp_path / "vtfusion"), files, tmp_path, "--calibration-normal", str(files["held_out"])
    )
    assert status == 0 and all(set(record) == CALIBRATED_KEYS for record in records)


def test_references_given_again_as_held_out_normals_are_left_out_with_a_note(
    saved_winclip_dir, files, tmp_path, capsys
):
    status, _ = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--calibration-normal", str(files["refs"]),
    )  # fmt: skip
    assert status == 2
    assert "error: calibration: all 3 held-out normal images are also reference images" in (
        capsys.readouterr().err
    )
    bank_path = tmp_path / "bank.safetensors"
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--reference", str(files["refs"]),
        "--calibration-normal", str(files["refs"]), str(files["held_out"]), "--save-bank", str(bank_path),
    )  # fmt: skip
    assert status == 0
    assert "note: 3 of the 6 held-out normal images are also reference images" in capsys.readouterr().err
    calibration = ReferenceBank.load(bank_path).calibration
    assert (calibration.normal_source, calibration.num_normal) == ("held_out", 3)


def test_exact_copies_among_the_references_are_left_out_with_a_note(
    saved_winclip_dir, files, tmp_path, capsys
):
    copies = tmp_path / "copies"
    copies.mkdir()
    first = min(files["refs"].iterdir())
    Image.open(first).save(copies / "renamed.png")  # the same pixels in another file
    bank_path = tmp_path / "bank.safetensors"
    status, _ = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), str(copies), "--save-bank", str(bank_path),
    )  # fmt: skip
    assert status == 0
    assert "note: 1 of the 4 reference images are exact copies of others" in capsys.readouterr().err
    bank = ReferenceBank.load(bank_path)
    assert bank.k == 3 and bank.calibration.num_normal == 3


def test_a_calibration_fitted_at_another_precision_is_refused_naming_both(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--reference", str(files["refs"]), "--save-bank", str(bank_path)
    )
    assert status == 0 and ReferenceBank.load(bank_path).calibration.precision == "float32"
    capsys.readouterr()
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--bank", str(bank_path), "--precision", "bfloat16"
    )
    assert status == 2
    assert (
        "error: calibration: the bank's calibration was fitted on torch at float32, but the images are scored "
        "on torch at bfloat16; give held-out --calibration-normal images to calibrate at bfloat16, or "
        "--no-calibration"
    ) in capsys.readouterr().err
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--bank", str(bank_path), "--precision", "bfloat16",
        "--calibration-normal", str(files["held_out"]), "--save-bank", str(bank_path),
    )  # fmt: skip
    assert status == 0 and ReferenceBank.load(bank_path).calibration.precision == "bfloat16"


def test_outline_region_draws_the_inner_border():
    image = Image.new("RGB", (8, 6), (10, 20, 30))
    region = np.zeros((6, 8), dtype=bool)
    region[1:5, 2:7] = True  # a 4 x 5 block inside the image
    region[3:6, 0] = True  # a strip on the image's edge: its pixels are all border
    drawn = np.asarray(outline_region(image, region, colour=(255, 0, 0), width=1))
    expected_border = region.copy()
    expected_border[2:4, 3:6] = False  # the block's interior
    assert ((drawn == (255, 0, 0)).all(axis=-1) == expected_border).all()
    assert (drawn[~expected_border] == (10, 20, 30)).all()
    # width 2 also takes the ring inside: the block's interior (2 x 3) has no pixel two steps from outside
    wide = np.asarray(outline_region(image, region, colour=(255, 0, 0), width=2))
    assert ((wide == (255, 0, 0)).all(axis=-1) == region).all()


def test_heatmaps_outline_the_pipeline_mask(saved_winclip_dir, files, tmp_path):
    from transformers import pipeline

    bank_path = tmp_path / "bank.safetensors"
    common = ["--batch-size", "1"]
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--reference", str(files["refs"]), "--save-bank", str(bank_path),
        "--heatmaps", str(tmp_path / "outlined"), *common,
    )  # fmt: skip
    assert status == 0
    status, _ = _score(
        saved_winclip_dir, files, tmp_path, "--bank", str(bank_path), "--no-calibration",
        "--heatmaps", str(tmp_path / "plain"), *common,
    )  # fmt: skip
    assert status == 0
    pipe = pipeline("image-anomaly-detection", model=saved_winclip_dir)
    queries = sorted(files["queries"].iterdir())
    # one image per forward in both, through the same model: the same maps, so the same masks
    results = pipe(list(map(str, queries)), reference_bank=ReferenceBank.load(bank_path))
    outlined_pixels = 0
    for query, result in zip(queries, results, strict=True):
        name = f"{query.stem}.heatmap.png"
        plain = Image.open(tmp_path / "plain" / name)
        outlined = np.asarray(Image.open(tmp_path / "outlined" / name))
        np.testing.assert_array_equal(outlined, np.asarray(outline_region(plain, result["mask"])))
        outlined_pixels += int((outlined != np.asarray(plain)).any(axis=-1).sum())
    assert outlined_pixels > 0


def test_confidence_is_kept_in_the_bank_and_says_how_many_normals_it_needs(
    saved_winclip_dir, files, tmp_path, capsys
):
    bank_path = tmp_path / "bank.safetensors"
    status, records = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--false-alarm-rate", "0.25", "--confidence", "0.9",
        "--save-bank", str(bank_path),
    )  # fmt: skip
    assert status == 0
    calibration = ReferenceBank.load(bank_path).calibration
    assert (calibration.confidence, calibration.target_false_alarm_rate) == (0.9, 0.25)
    # the maximum of n normals keeps 25 % with probability 1 - 0.75^n: 0.9 needs 1 - 0.75^n >= 0.9, n >= 9
    assert calibration.normals_needed == 9
    errors = capsys.readouterr().err
    assert "with 90% confidence" in errors and "Give at least 9 normal images" in errors
    _assert_verdicts(records, calibration, errors)
    # without --confidence, 3 normals at 25 % reach the promise on average: nothing is missing
    status, _ = _score(
        saved_winclip_dir, files, tmp_path,
        "--bank", str(bank_path), "--false-alarm-rate", "0.25", "--calibration-normal", str(files["held_out"]),
        "--save-bank", str(bank_path),
    )  # fmt: skip
    assert status == 0 and ReferenceBank.load(bank_path).calibration.normals_needed is None


def test_confidence_with_no_calibration_is_refused(saved_winclip_dir, files, tmp_path, capsys):
    status, _ = _score(saved_winclip_dir, files, tmp_path, "--no-calibration", "--confidence", "0.9")
    assert status == 2
    assert "--no-calibration goes with no other calibration option" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "rule"),
    [
        ([], "false_alarm_rate"),
        (["--threshold-rule", "false-alarm-rate"], "false_alarm_rate"),
        (BEST_F1, "best_f1"),
    ],
)
def test_threshold_rule_reaches_the_calibration(
    saved_winclip_dir, files, tmp_path, monkeypatch, options, rule
):
    from hf_fsad import calibration_policy

    asked, calibrated_bank = {}, calibration_policy.calibrated_bank

    def recording_calibrated_bank(*arguments, **keywords):
        asked["rule"] = keywords["rule"]
        return calibrated_bank(*arguments, **keywords)

    monkeypatch.setattr(calibration_policy, "calibrated_bank", recording_calibrated_bank)
    status, _ = _score(
        saved_winclip_dir, files, tmp_path,
        "--reference", str(files["refs"]), "--calibration-anomalous", str(files["defects"]), *options,
    )  # fmt: skip
    assert status == 0 and asked["rule"] == rule


def test_an_unknown_threshold_rule_is_refused_by_the_parser(capsys):
    from hf_fsad.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser().parse_args(["score", "--model", "m", "--threshold-rule", "f1", "q.png"])
    assert "argument --threshold-rule: invalid choice: 'f1'" in capsys.readouterr().err
