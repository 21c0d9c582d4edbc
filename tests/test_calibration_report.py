"""What a calibration's kept scores give: the report a quality engineer reads (its table against a hand count,
the guarantee sentence), `hf-fsad calibrate` and its `--add-normal`, the review band, and the scores through
the bank file."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import CALIBRATION_FORMAT_VERSION, Calibration, fit_calibration, in_review_band
from hf_fsad.calibration_report import (
    guarantee_sentence,
    pooled_calibration,
    threshold_table,
    write_calibration_report,
)
from hf_fsad.cli import main
from hf_fsad.data.toy import toy_records
from hf_fsad.modeling_outputs import AnomalyDetectionOutput
from hf_fsad.pipeline import decision

NORMALS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9]
DEFECTS = [0.35, 0.85, 0.95, 1.2]
DEFECT_FILES = {"roc.png", "precision_recall.png"}
REPORT_FILES = {"report.md", "thresholds.csv", "histogram.png", "calibration.json"}


def held_out(normals=NORMALS, defects=None, **settings) -> Calibration:
    return fit_calibration(
        torch.tensor(normals, dtype=torch.float64),
        None,
        None if defects is None else torch.tensor(defects, dtype=torch.float64),
        normal_source="held_out",
        **{"false_alarm_rate": 0.2} | settings,
    )


def binomial_tail(n: int, rate: float, at_least: int) -> float:
    """P(Binomial(n, rate) >= at_least): P(Beta(n + 1 - c, c) <= rate) with at_least = n + 1 - c."""
    return sum(math.comb(n, i) * rate**i * (1 - rate) ** (n - i) for i in range(at_least, n + 1))


def hand_table(normals, defects, threshold, target):
    """The per-threshold table counted by hand: each normal score (and the threshold) as a cut."""
    n, rows = len(normals), []
    for cut in sorted({*normals, threshold}):
        at_or_below = sum(score <= cut for score in normals)
        misses = sum(score <= cut for score in defects)
        rows.append(
            {
                "threshold": cut,
                "chosen": cut == threshold,
                "normals_at_or_below": at_or_below,
                "false_alarms": n - at_or_below,
                "false_alarm_rate": (n - at_or_below) / n,
                "false_alarm_bound": (n + 1 - at_or_below) / (n + 1),
                "probability_within_target": binomial_tail(n, target, n + 1 - at_or_below)
                if at_or_below
                else 0.0,
                "misses": misses,
                "miss_rate": misses / len(defects),
            }
        )
    return rows


def read_table(path):
    """thresholds.csv as typed rows (every column a number but `chosen`)."""
    rows = []
    for row in csv.DictReader(path.open()):
        typed = {name: float(value) for name, value in row.items() if name != "chosen"}
        rows.append(typed | {"chosen": row["chosen"] == "True"})
    return rows


def assert_table_matches(rows, expected):
    # the probability: a binomial sum against scipy's Beta cdf, two exact formulas in float64, so the
    # difference is rounding over at most a few dozen terms
    rounding = 1e-12
    assert len(rows) == len(expected)
    for row, hand in zip(rows, expected):
        assert row["probability_within_target"] == pytest.approx(
            hand.pop("probability_within_target"), abs=rounding
        )
        assert {name: row[name] for name in hand} == hand


# --- the report of known scores --------------------------------------------------------------------------


def test_the_table_is_the_hand_count_of_the_kept_scores():
    calibration = held_out(defects=DEFECTS)
    # 9 normals at 20 %: the 8th smallest, 0.8, promising (9 - 8 + 1) / 10
    assert (calibration.image_threshold, calibration.false_alarm_bound) == (0.8, 0.2)
    rows = [dataclasses.asdict(row) for row in threshold_table(calibration)]
    assert_table_matches(rows, hand_table(NORMALS, DEFECTS, 0.8, 0.2))


def test_the_report_folder_holds_the_table_the_sentence_and_the_figures(tmp_path):
    calibration = held_out(defects=DEFECTS)
    written = write_calibration_report(calibration, tmp_path / "report", title="Tile line 3")
    assert {path.name for path in written} == REPORT_FILES | DEFECT_FILES
    folder = tmp_path / "report"
    assert_table_matches(read_table(folder / "thresholds.csv"), hand_table(NORMALS, DEFECTS, 0.8, 0.2))
    report = (folder / "report.md").read_text()
    sentence = (
        "At most 20.0% of normal parts are flagged, on average over the draw of the 9 held-out normal images "
        "that set the threshold."
    )
    assert guarantee_sentence(calibration) == sentence
    assert report.startswith(f"# Tile line 3\n\n{sentence}\n")
    # 0.35 is the one defect at or below 0.8
    assert "At the threshold, 1 of the 4 defective images given are missed (25.0%)" in report
    assert "| **0.8** | **1 of 9 (11.1%)** | **20.0%** |" in report
    assert Calibration.from_json((folder / "calibration.json").read_text()) == calibration
    for name in ("histogram.png", *DEFECT_FILES):
        with Image.open(folder / name) as figure:
            assert figure.format == "PNG" and min(figure.size) > 100

    # without defects: no curves, no miss column
    write_calibration_report(held_out(), folder)
    assert {path.name for path in folder.iterdir()} == REPORT_FILES
    assert "misses on the defects" not in (folder / "report.md").read_text()
    assert {row["misses"] for row in csv.DictReader((folder / "thresholds.csv").open())} == {""}


def test_the_sentence_says_what_each_rule_promises():
    # with confidence: 9 normals cannot keep 20 % with 95 % (the maximum keeps it with 1 - 0.8^9 = 86.6 %)
    short = held_out(confidence=0.95)
    assert guarantee_sentence(short) == (
        f"With probability only {1 - 0.8**9:.1%} over the draw of the 9 held-out normal images that set the "
        "threshold, at most 20.0% of normal parts are flagged (on average at most 10.0%)."
    )
    assert guarantee_sentence(held_out(confidence=0.5)).startswith(
        "With probability 50% over the draw of the 9"
    )
    leave_one_out = dataclasses.replace(held_out(), normal_source="leave_one_out")
    assert "draw of the 9 references, each scored against a bank of the others" in guarantee_sentence(
        leave_one_out
    )
    best_f1 = held_out(defects=DEFECTS, rule="best_f1")
    assert guarantee_sentence(best_f1).startswith(
        "No false-alarm rate is guaranteed: the threshold has the best F1 on 9 normal and 4 defective images"
    )


def test_a_calibration_without_kept_scores_cannot_be_reported(tmp_path):
    with pytest.raises(ValueError, match="keeps no calibration scores"):
        write_calibration_report(dataclasses.replace(held_out(), normal_scores=None), tmp_path / "report")
    assert not (tmp_path / "report").exists()


# --- pooling held-out normals -------------------------------------------------------------------------------


def test_pooling_gives_the_calibration_of_all_the_normals_at_once():
    scores = torch.rand(30, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    maps = torch.rand(30, 4, 4, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    defects = torch.tensor(DEFECTS, dtype=torch.float64)

    def fitted(rows, with_defects, confidence=0.6):
        return fit_calibration(
            scores[rows], maps[rows], defects if with_defects else None,
            normal_source="held_out", false_alarm_rate=0.1, confidence=confidence,
        )  # fmt: skip

    first, second = fitted(slice(0, 12), True), fitted(slice(12, None), False)
    pooled = pooled_calibration(first, second)
    assert pooled == fitted(slice(None), True)
    assert pooled.normal_scores == tuple(scores.tolist()) and pooled.anomalous_scores == tuple(DEFECTS)
    # the pooled calibration keeps the rate and confidence asked, unless told otherwise
    assert pooled_calibration(first, second, confidence=None) == fitted(slice(None), True, confidence=None)


def test_pooling_is_refused_where_it_would_break_the_promise():
    base, more = held_out(), held_out([0.15, 0.25])
    with pytest.raises(ValueError, match="leave-one-out, against banks of the other k - 1"):
        pooled_calibration(dataclasses.replace(base, normal_source="leave_one_out"), more)
    with pytest.raises(ValueError, match="saved before calibration format version 3"):
        pooled_calibration(dataclasses.replace(base, normal_scores=None), more)
    with pytest.raises(
        ValueError, match="fitted on torch at float32, the added scores were computed on torch at"
    ):
        pooled_calibration(base, dataclasses.replace(more, precision="bfloat16"))
    with_maps = fit_calibration(
        torch.tensor([0.1, 0.2]), torch.rand(2, 3, 3), normal_source="held_out", false_alarm_rate=0.2
    )
    with pytest.raises(ValueError, match="different models"):
        pooled_calibration(with_maps, more)
    best_pixel_f1 = fit_calibration(
        torch.tensor([0.1, 0.2]), torch.rand(2, 3, 3), torch.tensor([0.9]), torch.rand(1, 3, 3),
        torch.ones(1, 3, 3, dtype=torch.bool), normal_source="held_out", false_alarm_rate=0.2, rule="best_f1",
    )  # fmt: skip
    with pytest.raises(ValueError, match="best pixel F1 on the defect masks .* keeps no maps or masks"):
        pooled_calibration(best_pixel_f1, with_maps)


# --- the review band ----------------------------------------------------------------------------------------


def test_the_review_band_includes_both_ends_exactly():
    band = 0.1
    low, high = 0.5 - band, 0.5 + band
    values = torch.tensor(
        [math.nextafter(low, 0), low, 0.5, math.nextafter(0.5, 1), high, math.nextafter(high, 1)],
        dtype=torch.float64,
    )
    assert in_review_band(values, band).tolist() == [False, True, True, True, True, False]
    # float32 scores at ends float32 holds exactly
    values = torch.tensor([0.25, 0.75, np.nextafter(np.float32(0.25), 0), np.nextafter(np.float32(0.75), 1)])
    assert in_review_band(values, 0.25).tolist() == [True, True, False, False]
    for bad in (0.0, 0.5, -0.1, float("nan")):
        with pytest.raises(
            ValueError, match=r"half-width around 0.5 in normalised-score units, in \(0, 0.5\)"
        ):
            in_review_band(values, bad)


def test_decisions_read_review_inside_the_band_and_the_label_outside():
    calibration = held_out()
    normalized = [0.25, np.nextafter(np.float32(0.25), 0), 0.5, 0.75, np.nextafter(np.float32(0.75), 1)]
    output = AnomalyDetectionOutput(
        image_scores=torch.tensor([0.5, 0.4, 0.8, 0.9, float("nan")]),
        normalized_scores=torch.tensor(normalized, dtype=torch.float32),
        labels=torch.tensor([0, 0, 0, 1, 1]),
    )
    labels = [decision(output, index, calibration, review_band=0.25)["label"] for index in range(5)]
    assert labels == ["review", "normal", "review", "review", "anomalous"]
    assert "error" in decision(output, 4, calibration, review_band=0.25)
    assert [decision(output, index, calibration)["label"] for index in range(5)] == [
        "normal", "normal", "normal", "anomalous", "anomalous"
    ]  # fmt: skip


# --- the calibration scores through the bank file -----------------------------------------------------------


def test_the_kept_scores_survive_the_bank_file_and_an_older_file_loads_without_them(tmp_path):
    calibration = fit_calibration(
        torch.tensor(NORMALS, dtype=torch.float64), torch.rand(9, 3, 3),
        torch.tensor(DEFECTS, dtype=torch.float64), normal_source="held_out", false_alarm_rate=0.2,
    )  # fmt: skip
    bank = ReferenceBank("winclip", "hash", "tile", 2, {"patches": torch.zeros(2, 4)}, calibration)
    bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(tmp_path / "bank.safetensors").calibration
    assert loaded == calibration and loaded.normal_scores == tuple(NORMALS)
    assert len(loaded.normal_map_maxima) == 9 and loaded.anomalous_scores == tuple(DEFECTS)

    fields = json.loads(calibration.to_json())
    assert fields["format_version"] == CALIBRATION_FORMAT_VERSION == 3
    version_2 = {
        name: value
        for name, value in fields.items()
        if name not in ("normal_scores", "normal_map_maxima", "anomalous_scores")
    } | {"format_version": 2}
    old = Calibration.from_json(json.dumps(version_2))
    assert old == dataclasses.replace(
        calibration, normal_scores=None, normal_map_maxima=None, anomalous_scores=None
    )
    with pytest.raises(ValueError, match="normal_scores holds 2 scores for 9 calibration images"):
        Calibration.from_json(json.dumps(fields | {"normal_scores": [0.1, 0.2]}))
    with pytest.raises(ValueError, match="anomalous_scores must hold finite numbers only"):
        Calibration.from_json(json.dumps(fields | {"anomalous_scores": [0.1, None, 0.3, 0.4]}))


# --- hf-fsad calibrate --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """refs/ (3 normal), held_a/ and held_b/ (3 normal each), defects/ (2 anomalous) and queries/ (2 good, 2
    anomalous), as PNG files."""
    root = tmp_path_factory.mktemp("report_files")
    splits = toy_records("stripes", num_train=9, num_test_good=2, num_test_anomalous=4, seed=5)
    folders = {name: root / name for name in ("refs", "held_a", "held_b", "defects", "queries")}
    for folder in folders.values():
        folder.mkdir()
    for index, example in enumerate(splits["train"]):
        example.image.save(folders[("refs", "held_a", "held_b")[index // 3]] / f"normal{index}.png")
    defective = [example for example in splits["test"] if example.mask is not None]
    for index, example in enumerate(defective[:2]):
        example.image.save(folders["defects"] / f"{index:03d}.png")
    for index, example in enumerate(splits["test"]):
        example.image.save(folders["queries"] / f"{example.defect_type}{index}.png")
    return {name: str(folder) for name, folder in folders.items()}


def calibrate(model_dir, tmp_path, name, *options):
    bank, report = tmp_path / f"{name}.safetensors", tmp_path / f"{name}_report"
    status = main(
        ["calibrate", "--model", model_dir, "--save-bank", str(bank), "--report", str(report), *options]
    )
    return status, bank, report


def test_calibrate_writes_the_bank_and_a_report_of_its_scores(saved_winclip_dir, files, tmp_path, capsys):
    status, bank, report = calibrate(
        saved_winclip_dir, tmp_path, "calibrated",
        "--reference", files["refs"], "--calibration-normal", files["held_a"], files["held_b"],
        "--calibration-anomalous", files["defects"], "--false-alarm-rate", "0.3",
    )  # fmt: skip
    assert status == 0
    calibration = ReferenceBank.load(bank).calibration
    assert (calibration.normal_source, calibration.num_normal, calibration.num_anomalous) == (
        "held_out",
        6,
        2,
    )
    assert {path.name for path in report.iterdir()} == REPORT_FILES | DEFECT_FILES
    normals, defects = list(calibration.normal_scores), list(calibration.anomalous_scores)
    # 6 normals at 30 %: the ceil(7 * 0.7) = 5th smallest, promising (6 - 5 + 1) / 7
    assert calibration.image_threshold == sorted(normals)[4]
    expected = hand_table(normals, defects, calibration.image_threshold, 0.3)
    assert_table_matches(read_table(report / "thresholds.csv"), expected)
    text = (report / "report.md").read_text()
    assert text.startswith(
        "# Calibration report: object\n\nAt most 28.6% of normal parts are flagged, on average over the draw "
        "of the 6 held-out normal images that set the threshold.\n"
    )
    assert f"calibration: {calibration.describe()}" in capsys.readouterr().err


def test_add_normal_gives_the_calibration_of_all_the_normals_at_once(
    saved_winclip_dir, files, tmp_path, capsys
):
    # --batch-size 1: each image is scored alone in every run, so the pooled and the joint scores are equal
    one = ["--batch-size", "1", "--false-alarm-rate", "0.3"]
    status, leave_one_out, _ = calibrate(
        saved_winclip_dir, tmp_path, "loo", "--reference", files["refs"], *one
    )
    assert status == 0 and ReferenceBank.load(leave_one_out).calibration.normal_source == "leave_one_out"
    status, first, _ = calibrate(
        saved_winclip_dir, tmp_path, "first", "--bank", str(leave_one_out),
        "--calibration-normal", files["held_a"], *one,
    )  # fmt: skip
    assert status == 0
    status, added, report = calibrate(
        saved_winclip_dir,
        tmp_path,
        "added",
        "--bank",
        str(first),
        "--add-normal",
        files["held_b"],
        "--batch-size",
        "1",
    )
    assert status == 0
    status, once, _ = calibrate(
        saved_winclip_dir, tmp_path, "once", "--bank", str(leave_one_out),
        "--calibration-normal", files["held_a"], files["held_b"], *one,
    )  # fmt: skip
    assert status == 0
    pooled, joint = ReferenceBank.load(added).calibration, ReferenceBank.load(once).calibration
    assert pooled == joint and pooled.num_normal == 6
    assert "6 held-out normal images" in (report / "report.md").read_text()
    assert "(3 added to 3)" in capsys.readouterr().err

    # the leave-one-out calibration cannot be pooled with held-out normals
    status, _, _ = calibrate(
        saved_winclip_dir, tmp_path, "refused", "--bank", str(leave_one_out), "--add-normal", files["held_b"]
    )
    assert status == 2
    expected = "error: --add-normal: the --bank's calibration scored its references leave-one-out"
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "refused.safetensors").exists()


def test_calibrate_refuses_what_it_cannot_do(saved_winclip_dir, files, tmp_path, capsys):
    for options, message in [
        (
            ["--add-normal", files["held_a"]],
            "--add-normal adds normal images to the calibration of a saved --bank",
        ),
        (["--bank", "b.safetensors"], "a saved --bank has no references to leave out"),
        ([], "give --calibration-normal images, or --reference images"),
        (
            [
                "--bank",
                "b.safetensors",
                "--add-normal",
                files["held_a"],
                "--calibration-anomalous",
                files["defects"],
            ],
            "--add-normal keeps the --bank's calibration images and rule: leave out --calibration-anomalous",
        ),
    ]:
        status, _, _ = calibrate(saved_winclip_dir, tmp_path, "refused", *options)
        assert status == 2
        assert message in capsys.readouterr().err


# --- the review band in hf-fsad score and the pipeline ------------------------------------------------------


def test_score_and_the_pipeline_label_the_review_band(saved_winclip_dir, files, tmp_path, capsys):
    from transformers import pipeline

    status, bank, _ = calibrate(
        saved_winclip_dir, tmp_path, "bank",
        "--reference", files["refs"], "--calibration-normal", files["held_a"], "--false-alarm-rate", "0.3",
    )  # fmt: skip
    assert status == 0

    def score(*options):
        output = tmp_path / "results.jsonl"
        command = ["score", "--model", saved_winclip_dir, "--bank", str(bank), "--output", str(output)]
        assert main([*command, files["queries"], *options]) == 0
        return [json.loads(line) for line in output.read_text().splitlines()]

    plain = score()
    distances = sorted(abs(record["normalized_score"] - 0.5) for record in plain)
    band = (distances[1] + distances[2]) / 2  # two parts inside, the others outside
    banded = score("--review-band", str(band))
    for before, after in zip(plain, banded):
        inside = abs(after["normalized_score"] - 0.5) <= band
        assert after["label"] == ("review" if inside else before["label"])
    assert sum(record["label"] == "review" for record in banded) == 2
    assert ", 2 review" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        score("--review-band", "0.5")
    assert "--review-band: must lie between 0 and 0.5" in capsys.readouterr().err
    output = tmp_path / "refused.jsonl"
    refused = [*("score", "--model", saved_winclip_dir, "--bank", str(bank), "--output", str(output))]
    assert main([*refused, files["queries"], "--review-band", "0.1", "--threshold", "0.3"]) == 2
    assert "--review-band lies around the calibrated threshold" in capsys.readouterr().err

    pipe = pipeline("image-anomaly-detection", model=saved_winclip_dir)
    paths = [record["path"] for record in banded]
    results = pipe(paths, reference_bank=ReferenceBank.load(bank), review_band=band)
    assert [result["label"] for result in results] == [record["label"] for record in banded]
    with pytest.raises(ValueError, match="half-width around 0.5"):
        pipe(paths[:1], reference_bank=ReferenceBank.load(bank), review_band=0.5)


def test_a_review_band_asks_for_a_calibration_it_cannot_do_without(
    saved_winclip_dir, files, tmp_path, capsys
):
    # One reference cannot be left out: without the band the images are scored without verdicts; with it, the
    # run stops instead of dropping the band silently.
    one_reference = str(min(Path(files["refs"]).iterdir()))
    output = tmp_path / "results.jsonl"
    command = ["score", "--model", saved_winclip_dir, "--reference", one_reference, "--output", str(output)]
    assert main([*command, files["queries"]]) == 0
    assert "not calibrated:" in capsys.readouterr().err
    assert main([*command, files["queries"], "--review-band", "0.1"]) == 2
    assert (
        "--review-band lies around a calibrated threshold, and the bank has none: " in capsys.readouterr().err
    )
