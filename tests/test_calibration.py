"""Calibrated decisions: the estimators on hand-worked numbers, the bank round trip, and `model.calibrate`."""

from __future__ import annotations

import dataclasses
import json
import warnings

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import (
    MEDIAN_NORMAL_LEVEL,
    Calibration,
    apply_calibration,
    best_f1_threshold,
    check_review_band,
    conformal_rank,
    conformal_threshold,
    fit_calibration,
    fit_calibration_of_outputs,
    in_review_band,
    logistic_scale,
    normalize_around,
    normals_needed,
    score_at_level,
)
from hf_fsad.modeling_outputs import AnomalyDetectionOutput
from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config

# Scores of one image computed in another batch may differ in the last float32 bits (the GEMM blocking
# follows the batch size); scores here are O(1), so 1e-6 is a few ulps.
BATCH_ORDER_TOLERANCE = 1e-6


def images(count: int, seed: int) -> torch.Tensor:
    return torch.randn(count, 3, 240, 240, generator=torch.Generator().manual_seed(seed))


def calibration(**changes) -> Calibration:
    fields = {
        "image_threshold": 1.0,
        "image_scale": 0.5,
        "rule": "false_alarm_rate",
        "normal_source": "held_out",
        "num_normal": 19,
        "num_anomalous": 0,
        "target_false_alarm_rate": 0.05,
        "false_alarm_bound": 0.05,
        "calibration_false_alarm_rate": 0.0,
    }
    return Calibration(**(fields | changes))


@pytest.mark.parametrize(
    ("n", "alpha", "rank", "bound"),
    [
        (19, 0.05, 19, 1 / 20),  # ceil(20 * 0.95) = 19 exactly: no float rounding up to 20
        (99, 0.05, 95, 5 / 100),  # ceil(100 * 0.95) = 95
        (9, 0.25, 8, 2 / 10),  # ceil(10 * 0.75) = 8
        (3, 0.05, 3, 1 / 4),  # ceil(4 * 0.95) = 4 > 3: capped at the maximum, guarantee 1/(n+1)
    ],
)
def test_conformal_threshold_is_the_order_statistic_with_its_guarantee(n, alpha, rank, bound):
    scores = np.random.default_rng(n).permutation(np.arange(1.0, n + 1))  # the j-th smallest is j
    threshold, guaranteed = conformal_threshold(scores, alpha)
    assert threshold == rank
    assert guaranteed == pytest.approx(bound, abs=1e-15)  # one float division


def test_conformal_threshold_refuses_bad_input():
    with pytest.raises(ValueError, match=r"false_alarm_rate must lie in \(0, 1\)"):
        conformal_threshold([1.0, 2.0], 0.0)
    with pytest.raises(ValueError, match="No normal calibration scores"):
        conformal_threshold([], 0.1)
    with pytest.raises(ValueError, match="NaN or infinite"):
        conformal_threshold([1.0, float("nan")], 0.1)


def test_conformal_rank_at_the_edges_of_its_formula():
    """Rank 1 when (n + 1)(1 - alpha) <= 1; with a confidence, the smallest rank j whose Beta(n + 1 - j, j)
    cdf at alpha reaches it, a tie included (for j = 1 the cdf is alpha^n: 0.5^2 = 0.25 exactly)."""
    assert conformal_rank(2, 0.9) == 1  # ceil(3 x 0.1) = 1
    assert conformal_rank(2, 0.9, confidence=0.5) == 1  # j = 1: 0.9^2 = 0.81 >= 0.5
    assert conformal_rank(2, 0.5, confidence=0.25) == 1  # j = 1: 0.5^2 = 0.25, reached exactly
    assert conformal_rank(2, 0.5, confidence=0.3) == 2  # j = 2: 1 - 0.5^2 = 0.75


def test_normals_needed_is_the_fewest_whose_maximum_keeps_the_promise():
    # on average: the smallest n >= 1 / alpha - 1 (1 / 0.3 - 1 = 2.33 -> 3)
    assert [normals_needed(rate) for rate in (0.05, 0.3, 0.5, 0.9)] == [19, 3, 1, 1]
    # with a confidence: the smallest n with 1 - (1 - alpha)^n >= confidence; 0.9^21 = 0.109, 0.9^22 = 0.098
    assert normals_needed(0.1, confidence=0.9) == 22
    assert normals_needed(0.5, confidence=0.5) == 1  # 1 - 0.5 = 0.5 exactly: reached


@pytest.mark.parametrize("rate", [0.0, 1.0, 1.5])
def test_rates_outside_zero_to_one_are_refused(rate):
    with pytest.raises(ValueError, match="false_alarm_rate must lie in"):
        conformal_rank(10, rate)
    with pytest.raises(ValueError, match="confidence must lie in"):
        conformal_rank(10, 0.1, confidence=rate)


def test_best_f1_threshold_on_a_hand_worked_example():
    # descending: 0.9(a) 0.7(n) 0.6(a) 0.6(a) 0.2(n). Cuts after 0.9: F1 = 2*1/(1+3) = 0.5; after 0.7:
    # 2*1/(2+3) = 0.4; after the two 0.6: 2*3/(4+3) = 6/7; the cut lies halfway between 0.6 and 0.2.
    threshold, f1 = best_f1_threshold([1, 0, 1, 1, 0], [0.9, 0.7, 0.6, 0.6, 0.2])
    assert threshold == pytest.approx(0.4, abs=1e-15)  # (0.6 + 0.2) / 2 in float64
    assert f1 == pytest.approx(6 / 7, abs=1e-15)


def test_best_f1_threshold_prefers_fewer_alarms_among_equal_f1():
    # descending 0.9(a) 0.8(n) 0.7(n) 0.6(a) 0.5(n), 2 anomalies. Cuts: after 0.9: 2*1/(1+2) = 2/3; after 0.8:
    # 2/4; after 0.7: 2/5; after 0.6: 2*2/(4+2) = 2/3 again. The tie goes to the higher cut, (0.9 + 0.8) / 2.
    threshold, f1 = best_f1_threshold([1, 0, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.5])
    assert threshold == pytest.approx(0.85, abs=1e-15)
    assert f1 == pytest.approx(2 / 3, abs=1e-15)


def test_best_f1_threshold_needs_both_classes_and_two_distinct_scores():
    with pytest.raises(ValueError, match="both normal and anomalous"):
        best_f1_threshold([0, 0], [0.1, 0.2])
    with pytest.raises(ValueError, match="All calibration scores are equal"):
        best_f1_threshold([0, 1], [0.5, 0.5])


def test_best_f1_threshold_cuts_only_between_distinct_scores():
    """Scores 5, 3, 3, 1 with labels 1, 1, 0, 0: no cut may split the two 3s (it would read F1 1.0); the best
    of the cuts 5 | 3 (F1 2/3) and 3 | 1 (2 x 2 / (3 + 2) = 0.8) is the second, at 2."""
    assert best_f1_threshold(np.array([1, 1, 0, 0]), np.array([5.0, 3.0, 3.0, 1.0])) == (2.0, 0.8)


def test_best_f1_threshold_lies_strictly_between_two_adjacent_float32_scores():
    low = np.float32(1.0)
    high = np.nextafter(low, np.float32(2.0))  # no float32 between them: the midpoint needs float64
    threshold, _ = best_f1_threshold(np.array([0, 1]), np.array([low, high]))
    assert float(low) < threshold < float(high)  # compared in float64


def test_normalisation_puts_the_threshold_at_half_and_the_median_normal_at_a_tenth():
    normal = np.array([0.1, 0.2, 0.3, 0.4, 1.0])
    scale = logistic_scale(1.0, normal)
    # 1/2 + z / (2 (1 + |z|)) = 0.1 at z = -4
    assert scale == pytest.approx((1.0 - 0.3) / 4, rel=1e-15)  # two float64 operations: a few ulps
    rule = calibration(image_threshold=1.0, image_scale=scale)
    normalized = rule.normalize(torch.tensor([1.0, 0.3], dtype=torch.float64))
    expected = torch.tensor([0.5, MEDIAN_NORMAL_LEVEL], dtype=torch.float64)
    torch.testing.assert_close(normalized, expected, rtol=0, atol=1e-15)  # float64 in, float64 out
    assert rule.normalize(torch.tensor([1.0, 0.3])).dtype == torch.float32
    raw = torch.linspace(-3, 5, 2001, dtype=torch.float64)
    values = rule.normalize(raw)
    assert torch.all(values[1:] >= values[:-1]) and values.min() > 0 and values.max() < 1
    assert torch.equal(rule.labels(raw), (raw > 1.0).long())
    with pytest.raises(ValueError, match="no pixel threshold"):
        rule.normalize_maps(raw[None])
    pixel_rule = calibration(pixel_threshold=0.2, pixel_scale=0.05, pixel_rule="false_alarm_rate")
    maps = torch.tensor([[0.2, 0.2 + 0.05 * 4]])  # at the threshold; 4 scales above it: 1 - 1 / (2 * 5)
    # float32 maps, float64 arithmetic: the input rounding (~1e-8) over the scale 0.05 is < 1e-6
    torch.testing.assert_close(pixel_rule.normalize_maps(maps), torch.tensor([[0.5, 0.9]]), rtol=0, atol=1e-6)


def test_logistic_scale_falls_back_to_a_tenth_of_the_threshold_when_the_median_is_not_below_it():
    # one float64 product each: rel 1e-15 is a few ulps
    assert logistic_scale(0.2, np.array([0.2, 0.2, 0.4])) == pytest.approx(0.02, rel=1e-15)
    assert logistic_scale(-0.5, np.array([-0.5, -0.5])) == pytest.approx(0.05, rel=1e-15)
    assert logistic_scale(0.0, np.array([0.0])) == 1.0  # a zero threshold has no size to take a tenth of


def test_normalize_around_just_above_and_far_above_the_threshold():
    # half a scale above: 1 - 0.5 / (1 + 0.5) = 2/3; float64, two ops: rel 1e-12
    assert normalize_around(torch.tensor([0.5], dtype=torch.float64), 0.0, 1.0).item() == pytest.approx(
        2 / 3, rel=1e-12
    )
    # 1e9 scales above: 1 - 5e-10 rounds to 1.0 in float32, so it reads the float just below 1
    far = normalize_around(torch.tensor([1e9]), 0.0, 1.0)
    assert far.dtype == torch.float32 and far.item() == np.nextafter(np.float32(1), np.float32(0))


@pytest.mark.parametrize("level", [0.0, 1.0, 1.5])
def test_score_at_level_refuses_levels_outside_zero_to_one(level):
    with pytest.raises(ValueError, match="lies in"):
        score_at_level(level, 1.0, 0.5)


def test_the_review_band_includes_both_ends_and_is_a_half_width_below_one_half():
    values = torch.tensor([0.39, 0.4, 0.5, 0.6, 0.61, 1.0], dtype=torch.float64)
    # 0.5 - 0.1 and 0.5 + 0.1 are 0.4 and 0.6 exactly in float64 (the ends, included)
    assert in_review_band(values, 0.1).tolist() == [False, True, True, True, False, False]
    check_review_band(0.25)
    check_review_band(0.4999)
    for band in (0.0, 0.5, 1.5, -0.1, float("nan"), float("inf"), True):
        with pytest.raises(ValueError, match="review_band is a half-width"):
            check_review_band(band)


def test_calibration_json_round_trip_and_validation():
    rule = calibration(pixel_threshold=0.3, pixel_scale=0.1, pixel_rule="best_f1")
    assert Calibration.from_json(rule.to_json()) == rule
    fields = json.loads(rule.to_json())
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\]"):
        Calibration.from_json(json.dumps(fields | {"colour": "red"}))
    with pytest.raises(ValueError, match=r"missing fields \['image_threshold'\]"):
        Calibration.from_json(json.dumps({k: v for k, v in fields.items() if k != "image_threshold"}))
    with pytest.raises(ValueError, match="not JSON"):
        Calibration.from_json("{")
    with pytest.raises(TypeError, match="not a JSON object"):
        Calibration.from_json("[1]")
    for change, message in [
        ({"image_threshold": float("nan")}, "image_threshold must be a finite number"),
        ({"image_scale": -1.0}, "image_scale must be positive"),
        ({"rule": "gut_feeling"}, "rule must be one of"),
        ({"normal_source": "internet"}, "normal_source must be one of"),
        ({"num_normal": -2}, "num_normal must be a non-negative integer"),
        ({"pixel_threshold": 0.3}, "pixel_threshold, pixel_scale and pixel_rule must be given together"),
    ]:
        with pytest.raises(ValueError, match=message):
            calibration(**change)


def test_calibration_validation_at_each_fields_edge():
    for change, message in [
        ({"image_scale": 0.0}, "image_scale must be positive"),
        ({"confidence": 0.0}, "confidence must lie in"),
        ({"confidence": 1.0}, "confidence must lie in"),
        ({"normals_needed": 0}, "normals_needed must be a positive integer"),
        ({"normals_needed": 2.0}, "normals_needed must be a positive integer"),
        ({"normals_needed": True}, "normals_needed must be a positive integer"),
        ({"runtime": ""}, "runtime must be a runtime's name"),
        ({"runtime": 3}, "runtime must be a runtime's name"),
        ({"pixel_threshold": 0.3, "pixel_scale": 0.1}, "must be given together"),
        ({"normal_scores": 0.5}, "normal_scores must be a list of numbers"),
        ({"normal_scores": "0.5"}, "normal_scores must be a list of numbers"),
        ({"normal_scores": [float("nan")] * 19}, "normal_scores must hold finite numbers only"),
        ({"normal_scores": [0.5]}, "normal_scores holds 1 scores for 19 calibration images"),
    ]:
        with pytest.raises(ValueError, match=message):
            calibration(**change)
    assert calibration(normals_needed=1, confidence=0.5).normals_needed == 1


def test_calibration_json_sorts_its_keys_and_reads_a_file_without_a_version_as_version_1():
    """Sorted keys: the text is hashed into the export cache key, so it must not follow the field order."""
    fields = json.loads(calibration().to_json())
    assert list(fields) == sorted(fields)
    del fields["format_version"]
    with pytest.raises(ValueError, match=r"unknown fields \['colour'\] \(format version 1\)"):
        Calibration.from_json(json.dumps(fields | {"colour": "red"}))


def test_masks_and_apply_calibration_without_a_pixel_threshold():
    rule = calibration()
    output = AnomalyDetectionOutput(
        image_scores=torch.tensor([0.5, 2.0]),
        anomaly_maps=torch.zeros(2, 4, 4),
        branch_scores={"zero_shot": torch.tensor([0.1, 0.2])},
    )
    assert rule.masks(output.anomaly_maps) is None
    calibrated = apply_calibration(output, rule)
    assert calibrated.anomaly_masks is None
    assert calibrated.labels.tolist() == [0, 1]
    assert calibrated.branch_scores is output.branch_scores


def test_the_calibration_travels_in_the_bank_file_and_a_broken_one_is_named(tiny_winclip, tmp_path):
    references = images(3, 0)
    bank = tiny_winclip.calibrate(tiny_winclip.build_reference_bank(references), references)
    path = tmp_path / "bank.safetensors"
    bank.save(path)
    loaded = ReferenceBank.load(path)
    assert loaded.calibration == bank.calibration
    assert ReferenceBank.load(path).to("cpu").calibration == bank.calibration

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    broken = tmp_path / "broken.safetensors"
    save_file(bank.tensors, broken, metadata=metadata | {"calibration": '{"image_threshold": 1}'})
    with pytest.raises(ValueError, match=rf"Reference bank {broken}: Invalid calibration: missing fields"):
        ReferenceBank.load(broken)


def test_a_bank_without_calibration_scores_exactly_as_before(tiny_winclip):
    references, queries = images(3, 0), images(2, 1)
    bank = tiny_winclip.build_reference_bank(references)
    assert bank.calibration is None
    output = tiny_winclip(queries, reference_bank=bank)
    assert output.normalized_scores is None and output.labels is None and output.anomaly_masks is None
    assert set(output.keys()) == {"image_scores", "anomaly_maps", "branch_scores"}
    calibrated = tiny_winclip(queries, reference_bank=tiny_winclip.calibrate(bank, references))
    # the calibration adds decisions and changes no score: same model, same batch
    assert torch.equal(calibrated.image_scores, output.image_scores)
    assert torch.equal(calibrated.anomaly_maps, output.anomaly_maps)


def test_leave_one_out_scores_each_reference_against_the_others(tiny_winclip):
    references, queries = images(4, 0), images(3, 1)
    bank = tiny_winclip.build_reference_bank(references, class_name="tile")
    with pytest.warns(UserWarning, match="4 normal scores cannot guarantee a false-alarm rate of 5.0%"):
        calibrated = tiny_winclip.calibrate(bank, references)
    left_out = []
    for index in range(4):
        others = torch.cat([references[:index], references[index + 1 :]])
        own_bank = tiny_winclip.build_reference_bank(others, class_name="tile")
        left_out.append(tiny_winclip(references[index : index + 1], reference_bank=own_bank))
    scores = torch.cat([output.image_scores for output in left_out]).double()
    maxima = torch.cat([output.anomaly_maps.flatten(1).amax(1) for output in left_out]).double()
    rule = calibrated.calibration
    assert (rule.rule, rule.normal_source, rule.num_normal, rule.num_anomalous) == (
        "false_alarm_rate",
        "leave_one_out",
        4,
        0,
    )
    # 4 scores, alpha 0.05: the largest, guaranteeing 1/5
    assert rule.image_threshold == pytest.approx(float(scores.max()), abs=BATCH_ORDER_TOLERANCE)
    assert rule.false_alarm_bound == pytest.approx(0.2, abs=1e-15)
    assert rule.pixel_threshold == pytest.approx(float(maxima.max()), abs=BATCH_ORDER_TOLERANCE)
    assert rule.calibration_false_alarm_rate == 0.0

    output = tiny_winclip(queries, reference_bank=calibrated)
    assert torch.equal(output.labels, (output.image_scores.double() > rule.image_threshold).long())
    distance = (output.image_scores.double() - rule.image_threshold) / rule.image_scale
    expected = 0.5 + distance / (2 * (1 + distance.abs()))  # the module docstring's normalisation
    # float64 rounded to float32
    torch.testing.assert_close(output.normalized_scores, expected.float(), rtol=0, atol=6e-8)
    assert torch.equal(output.anomaly_masks, output.anomaly_maps.double() > rule.pixel_threshold)


def test_held_out_normals_and_anomalies_give_a_best_f1_threshold_when_asked(tiny_winclip):
    references, normals, anomalous = images(2, 0), images(3, 1), images(2, 2) * 3
    masks = torch.zeros(2, 240, 240)
    masks[:, 32:96, 32:96] = 1
    bank = tiny_winclip.build_reference_bank(references)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # best F1 has no false-alarm target to miss
        rule = tiny_winclip.calibrate(
            bank,
            normal_pixel_values=normals,
            anomalous_pixel_values=anomalous,
            anomalous_masks=masks,
            rule="best_f1",
        ).calibration
    normal_output = tiny_winclip(normals, reference_bank=bank)
    anomalous_output = tiny_winclip(anomalous, reference_bank=bank)
    scores = torch.cat([normal_output.image_scores, anomalous_output.image_scores]).double().numpy()
    threshold, f1 = best_f1_threshold([0, 0, 0, 1, 1], scores)
    assert (rule.rule, rule.normal_source, rule.num_normal, rule.num_anomalous) == (
        "best_f1",
        "held_out",
        3,
        2,
    )
    assert rule.false_alarm_bound is None
    assert rule.image_threshold == pytest.approx(threshold, abs=BATCH_ORDER_TOLERANCE)
    assert rule.calibration_f1 == pytest.approx(f1, abs=1e-12)  # a ratio of small integers
    assert rule.calibration_false_alarm_rate == pytest.approx(float((scores[:3] > threshold).mean()))
    maps = torch.cat([normal_output.anomaly_maps, anomalous_output.anomaly_maps]).double().numpy()
    pixel_labels = np.r_[np.zeros(3 * 240 * 240), masks.numpy().ravel()]
    assert (rule.pixel_rule, rule.pixel_threshold) == (
        "best_f1",
        pytest.approx(best_f1_threshold(pixel_labels, maps.ravel())[0], abs=BATCH_ORDER_TOLERANCE),
    )


def test_calibration_refuses_what_it_cannot_do(tiny_winclip):
    references = images(2, 0)
    bank = tiny_winclip.build_reference_bank(references)
    with pytest.raises(ValueError, match="Calibration needs normal images"):
        tiny_winclip.calibrate(bank)
    with pytest.raises(ValueError, match="needs at least 2 reference images, got 1"):
        tiny_winclip.calibrate(tiny_winclip.build_reference_bank(references[:1]), references[:1])
    with pytest.raises(ValueError, match="anomalous_masks were given without anomalous_pixel_values"):
        tiny_winclip.calibrate(bank, references, anomalous_masks=torch.ones(1, 240, 240))
    defect = {"anomalous_pixel_values": images(1, 3)}
    with pytest.raises(ValueError, match=r"anomalous_masks have shape \(1, 120, 120\)"):
        tiny_winclip.calibrate(
            bank, references, **defect, anomalous_masks=torch.ones(1, 120, 120), rule="best_f1"
        )
    with pytest.raises(ValueError, match="anomalous_masks mark no defect pixel"):
        tiny_winclip.calibrate(
            bank, references, **defect, anomalous_masks=torch.zeros(1, 240, 240), rule="best_f1"
        )
    with pytest.raises(
        ValueError,
        match='anomalous_masks set the pixel threshold by best pixel F1, which needs rule="best_f1"',
    ):
        tiny_winclip.calibrate(bank, references, **defect, anomalous_masks=torch.ones(1, 240, 240))
    with pytest.raises(ValueError, match='rule="best_f1" needs anomalous images'):
        tiny_winclip.calibrate(bank, references, rule="best_f1")
    with pytest.raises(ValueError, match="rule must be one of"):
        tiny_winclip.calibrate(bank, references, rule="f1")
    tiny_winclip.saves_its_references = (
        True  # as VTFusion: what it learnt from its references is in its weights
    )
    try:
        with pytest.raises(ValueError, match="it would be refitted once per reference"):
            tiny_winclip.calibrate(bank, references)
        held_out = tiny_winclip.calibrate(bank, normal_pixel_values=images(3, 4))
        assert held_out.calibration.normal_source == "held_out"
    finally:
        del tiny_winclip.saves_its_references


def test_leave_one_out_keeps_the_validated_weights_of_anomalous_memory():
    torch.manual_seed(0)
    model = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=tiny_clip_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    references, anomalous, validation = images(3, 0), images(1, 1), images(2, 2)
    mask = torch.zeros(1, 240, 240, dtype=torch.bool)
    mask[0, :48, :48] = True
    bank_inputs = {"anomalous_pixel_values": anomalous, "anomalous_masks": mask}
    bank = model.build_reference_bank(references, "tile", **bank_inputs)
    bank = model.validate_weights(bank, validation, [0, 1])
    with pytest.raises(ValueError, match="builds its bank with anomalous references too"):
        model.calibrate(bank, references)
    with pytest.warns(UserWarning, match="3 normal scores cannot guarantee"):
        rule = model.calibrate(bank, references, bank_inputs=bank_inputs).calibration
    scores = []
    for index in range(3):
        others = torch.cat([references[:index], references[index + 1 :]])
        rebuilt = model.build_reference_bank(others, "tile", **bank_inputs)
        with_weights = dataclasses.replace(
            rebuilt, tensors=rebuilt.tensors | {"score_weights": bank.tensors["score_weights"]}
        )
        scores.append(model(references[index : index + 1], reference_bank=with_weights).image_scores)
    assert rule.image_threshold == pytest.approx(float(torch.cat(scores).max()), abs=BATCH_ORDER_TOLERANCE)


def test_defects_leave_the_false_alarm_threshold_on_the_normals_by_default():
    """Issue 27: 5 normals + 10 defects at 1 % asked gave a best-F1 threshold flagging 20 % of the normals.
    By default the threshold is the conformal one of the normals (capped at their maximum: no normal above
    it), and the defects only report how many of them it misses."""
    normals = torch.tensor([0.10, 0.20, 0.30, 0.40, 0.90], dtype=torch.float64)
    defects = torch.tensor([0.50, 0.60, 0.70, 0.80, 0.85, 0.95, 1.0, 1.1, 1.2, 1.3], dtype=torch.float64)
    arguments = {"normal_source": "held_out", "false_alarm_rate": 0.01}
    with_defects = fit_calibration(normals, None, defects, **arguments)
    normals_only = fit_calibration(normals, None, **arguments)
    assert with_defects.rule == "false_alarm_rate"
    assert with_defects.image_threshold == normals_only.image_threshold == 0.90
    assert (with_defects.false_alarm_bound, with_defects.normals_needed) == (1 / 6, 99)
    assert with_defects.calibration_false_alarm_rate == 0.0
    assert with_defects.calibration_miss_rate == 0.5  # 0.5 to 0.85 are at or below 0.90
    assert normals_only.calibration_miss_rate is None
    assert "misses 50.0% of the 10 anomalous" in with_defects.describe()
    # the rule of today, now only when asked: F1 20/21 by flagging the normal at 0.90
    best_f1 = fit_calibration(normals, None, defects, rule="best_f1", **arguments)
    # halfway between two float32 scores (0.40 and 0.50): float32 input rounding, ~3e-8, within approx's 1e-6
    assert (best_f1.rule, best_f1.image_threshold) == ("best_f1", pytest.approx(0.45))
    assert best_f1.calibration_false_alarm_rate == 0.2
    assert (best_f1.false_alarm_bound, best_f1.calibration_miss_rate) == (None, None)
    assert "moves with the share of defects" in best_f1.describe()


def test_the_miss_rate_counts_defects_at_or_below_the_threshold():
    normals = torch.arange(1.0, 20.0)  # 19 scores, 5 %: the 19th smallest, 19
    defects = torch.tensor([18.5, 19.0, 19.5, 30.0])
    rule = fit_calibration(normals, None, defects, normal_source="held_out", false_alarm_rate=0.05)
    assert (rule.image_threshold, rule.calibration_miss_rate) == (19.0, 0.5)
    # the pixel threshold of the default rule: the conformal one of the normal maps' maxima
    maps = normals.reshape(19, 1, 1).expand(19, 2, 2) * 0.1
    with_maps = fit_calibration(
        normals, maps, defects, maps[:4] * 10, normal_source="held_out", false_alarm_rate=0.05
    )
    # 19 x 0.1 in float32 (the maps' dtype): rounding ~1e-7 relative, within approx's 1e-6
    assert (with_maps.pixel_rule, with_maps.pixel_threshold) == ("false_alarm_rate", pytest.approx(1.9))
    # its scale from the same maxima, not the image scores: their median 1.0 is 0.9 below the threshold and
    # normalises to 0.1 at z = -4; same float32 rounding
    assert with_maps.pixel_scale == pytest.approx(0.9 / 4)


def test_fit_calibration_keeps_its_scores_and_needs_no_more_normals_at_exactly_enough():
    normals = torch.arange(1.0, 20.0)  # 19 normals: exactly enough for 5 % on average
    maps = normals.reshape(19, 1, 1).expand(19, 2, 2) * 0.1
    defects = torch.tensor([18.5, 30.0])
    rule = fit_calibration(normals, maps, defects, normal_source="held_out", false_alarm_rate=0.05)
    assert rule.normals_needed is None
    assert rule.normal_scores == tuple(normals.tolist())
    assert rule.anomalous_scores == (18.5, 30.0)
    # float32 maxima 0.1 x k, read back as float64: the same floats
    assert rule.normal_map_maxima == tuple((normals * 0.1).double().tolist())


def test_calibration_miss_rate_round_trips_and_defaults_for_earlier_files():
    rule = calibration(num_anomalous=4, calibration_miss_rate=0.25)
    assert Calibration.from_json(rule.to_json()) == rule
    fields = json.loads(calibration().to_json())
    del fields["calibration_miss_rate"]
    assert Calibration.from_json(json.dumps(fields)).calibration_miss_rate is None
    with pytest.raises(ValueError, match="calibration_miss_rate must be a finite number or null"):
        calibration(calibration_miss_rate=float("nan"))


def test_leave_one_out_scores_each_defect_against_every_left_out_bank_and_averages(tiny_winclip, monkeypatch):
    """Normals scored leave-one-out see k - 1 references, and so do the defects: each is scored against the
    k leave-one-out banks and its scores and maps averaged (not against the full bank)."""
    from hf_fsad import modeling_calibration

    references, defects = images(3, 0), images(2, 5) * 3
    bank = tiny_winclip.build_reference_bank(references, class_name="tile")
    fitted = {}

    def recording_fit(normal, anomalous, *arguments, **keywords):
        fitted["anomalous_scores"], fitted["anomalous_maps"] = anomalous.image_scores, anomalous.anomaly_maps
        return fit_calibration_of_outputs(normal, anomalous, *arguments, **keywords)

    monkeypatch.setattr(modeling_calibration, "fit_calibration_of_outputs", recording_fit)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 3 normals cannot reach 5 %
        calibrated = tiny_winclip.calibrate(bank, references, anomalous_pixel_values=defects, batch_size=1)
    left_out = [
        tiny_winclip(
            defects,
            reference_bank=tiny_winclip.build_reference_bank(
                torch.cat([references[:index], references[index + 1 :]]), class_name="tile"
            ),
        )
        for index in range(3)
    ]
    expected_scores = torch.stack([output.image_scores for output in left_out]).mean(0)
    expected_maps = torch.stack([output.anomaly_maps for output in left_out]).mean(0)
    torch.testing.assert_close(
        fitted["anomalous_scores"], expected_scores, rtol=0, atol=BATCH_ORDER_TOLERANCE
    )
    torch.testing.assert_close(fitted["anomalous_maps"], expected_maps, rtol=0, atol=BATCH_ORDER_TOLERANCE)
    full_bank_scores = tiny_winclip(defects, reference_bank=bank).image_scores
    # the full bank's scores differ by far more than BATCH_ORDER_TOLERANCE: 1e-4 is 100 times it
    assert not torch.allclose(fitted["anomalous_scores"], full_bank_scores, rtol=0, atol=1e-4)
    rule = calibrated.calibration
    misses = (expected_scores.double() <= rule.image_threshold).double().mean().item()
    assert (rule.normal_source, rule.num_anomalous, rule.calibration_miss_rate) == (
        "leave_one_out",
        2,
        misses,
    )


def test_calibration_of_outputs_reads_each_outputs_scores_and_maps_in_their_places():
    from hf_fsad.modeling_outputs import AnomalyDetectionOutput

    generator = torch.Generator().manual_seed(0)
    normal = AnomalyDetectionOutput(
        image_scores=torch.rand(12, generator=generator),
        anomaly_maps=torch.rand(12, 4, 4, generator=generator),
    )
    anomalous = AnomalyDetectionOutput(
        image_scores=1 + torch.rand(5, generator=generator),
        anomaly_maps=1 + torch.rand(5, 4, 4, generator=generator),
    )
    masks = torch.rand(5, 4, 4, generator=generator) > 0.5
    settings = {"normal_source": "held_out", "false_alarm_rate": 0.1, "rule": "best_f1"}
    expected = fit_calibration(
        normal.image_scores,
        normal.anomaly_maps,
        anomalous.image_scores,
        anomalous.anomaly_maps,
        masks,
        **settings,
    )
    assert fit_calibration_of_outputs(normal, anomalous, masks, **settings) == expected
    assert fit_calibration_of_outputs(
        normal, normal_source="held_out", false_alarm_rate=0.1
    ) == fit_calibration(
        normal.image_scores, normal.anomaly_maps, normal_source="held_out", false_alarm_rate=0.1
    )
