"""`pipeline("image-anomaly-detection")`: same scores as the model, maps at the image's own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

import hf_fsad  # noqa: F401  (registers the task)
from calibration_checks import assert_same_calibration
from hf_fsad.calibration_policy import calibrate_reference_bank
from hf_fsad.data.toy import toy_records
from hf_fsad.pipeline import ImageAnomalyDetectionPipeline


@pytest.fixture(scope="module")
def toy():
    return toy_records("weave", num_train=2, num_test_good=1, num_test_anomalous=2, seed=5)


@pytest.fixture(scope="module")
def pipe(saved_winclip_dir):
    return pipeline("image-anomaly-detection", model=saved_winclip_dir)


def test_task_loads_an_hf_fsad_model(pipe):
    assert isinstance(pipe, ImageAnomalyDetectionPipeline)
    assert pipe.model.config.model_type == "winclip"


def _bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize with half-pixel centres, edges clamped (align_corners=False), written out."""

    def taps(size_in: int, size_out: int):
        source = np.clip((np.arange(size_out) + 0.5) * size_in / size_out - 0.5, 0, size_in - 1)
        low = np.floor(source).astype(int)
        return low, np.minimum(low + 1, size_in - 1), source - low

    top, bottom, dy = taps(array.shape[0], height)
    left, right, dx = taps(array.shape[1], width)
    rows = array[top] * (1 - dy)[:, None] + array[bottom] * dy[:, None]
    return rows[:, left] * (1 - dx) + rows[:, right] * dx


def test_results_match_the_model(pipe, toy):
    references = [example.image for example in toy["train"]]
    queries = [example.image for example in toy["test"]]
    queries[1] = queries[1].resize((300, 180))
    results = pipe(queries, reference_images=references, class_name="fabric")

    processor, model = pipe.model.image_processor(), pipe.model
    with torch.no_grad():
        bank = model.build_reference_bank(
            processor(references, return_tensors="pt").pixel_values, class_name="fabric"
        )
        expected = model(processor(queries, return_tensors="pt").pixel_values, reference_bank=bank)
    # rel 1e-5 here and below: the pipeline runs one image per forward, the expectation a batch of 3, and
    # float32 kernels may round a batch differently (~1e-7 relative)
    assert [r["score"] for r in results] == pytest.approx(expected.image_scores.tolist(), rel=1e-5)
    for name, values in expected.branch_scores.items():
        assert [r["branch_scores"][name] for r in results] == pytest.approx(values.tolist(), rel=1e-5)

    wide = results[1]
    assert wide["anomaly_map"].shape == (180, 300)
    assert wide["anomaly_map"].dtype == np.float32
    assert wide["heatmap"].size == (300, 180)
    # The map at the image's own size is the model's map resized bilinearly (half-pixel centres); float32
    # interpolation of values in [0, 1] against float64, plus the batch rounding above: a few ulps.
    resized = _bilinear(expected.anomaly_maps[1].double().numpy(), 180, 300)
    np.testing.assert_allclose(wide["anomaly_map"], resized, rtol=0, atol=1e-6)
    # At the model's own resolution the map is returned unchanged.
    square = results[2]["anomaly_map"]
    assert square.shape == (240, 240)
    # rtol as above (batch of 3 vs 1); atol 1e-6 for map values near 0 (float32 in [0, 1])
    np.testing.assert_allclose(square, expected.anomaly_maps[2].numpy(), rtol=1e-5, atol=1e-6)


def test_a_saved_bank_gives_the_same_results(pipe, toy):
    references = [example.image for example in toy["train"]]
    queries = [example.image for example in toy["test"]]
    bank = pipe.build_reference_bank(references, class_name="fabric")
    direct = pipe(queries, reference_images=references, class_name="fabric")
    reused = pipe(queries, reference_bank=bank)
    assert [r["score"] for r in reused] == [r["score"] for r in direct]
    assert all(np.array_equal(r["anomaly_map"], d["anomaly_map"]) for r, d in zip(reused, direct))


def test_zero_shot_without_references(pipe, toy):
    image = toy["test"][0].image
    result = pipe(image, class_name="fabric")
    assert set(result["branch_scores"]) == {"zero_shot"}
    model = pipe.model
    with torch.no_grad():
        expected = model(
            model.image_processor()(image, return_tensors="pt").pixel_values,
            reference_bank=model.build_reference_bank(class_name="fabric"),
        )
    # The same single-image batch through the same model: the same bits.
    assert result["score"] == expected.image_scores.item()
    assert result["branch_scores"]["zero_shot"] == expected.branch_scores["zero_shot"].item()


def test_conflicting_or_empty_references_are_refused(pipe, toy):
    image = toy["test"][0].image
    bank = pipe.build_reference_bank([toy["train"][0].image])
    with pytest.raises(ValueError, match="either reference_images or reference_bank"):
        pipe(image, reference_images=[image], reference_bank=bank)
    with pytest.raises(ValueError, match="reference_images is empty"):
        pipe(image, reference_images=[])


# --- calibrated decisions ------------------------------------------------------------------------------

UNCALIBRATED_KEYS = {"score", "branch_scores", "anomaly_map", "heatmap"}


def test_two_references_give_calibrated_decisions(pipe, toy):
    references = [example.image for example in toy["train"]]
    queries = [example.image for example in [*toy["train"], *toy["test"]]]
    queries[-1] = queries[-1].resize((300, 180))
    bank = pipe.build_reference_bank(references, class_name="fabric")
    calibration = bank.calibration
    assert (calibration.normal_source, calibration.num_normal) == ("leave_one_out", 2)
    # the default "auto" calibration is model.calibrate's on the same references (other batches)
    processor, model = pipe.model.image_processor(), pipe.model
    with torch.no_grad():
        expected = model.calibrate(
            model.build_reference_bank(
                processor(references, return_tensors="pt").pixel_values, class_name="fabric"
            ),
            processor(references, return_tensors="pt").pixel_values,
        ).calibration
    assert_same_calibration(calibration, expected)

    results = pipe(queries, reference_bank=bank)
    calibrated_keys = UNCALIBRATED_KEYS | {"label", "normalized_score", "threshold", "mask", "regions"}
    assert all(set(result) == calibrated_keys for result in results)
    scores = torch.tensor([result["score"] for result in results])
    assert [result["threshold"] for result in results] == [calibration.image_threshold] * len(results)
    assert [result["label"] for result in results] == [
        "anomalous" if score > calibration.image_threshold else "normal" for score in scores.double().tolist()
    ]
    # both verdicts occur (fixed seeds), so the comparison above can tell them apart
    assert {result["label"] for result in results} == {"normal", "anomalous"}
    # the float32 score the pipeline returns is the one the model normalised, through the same function: exact
    assert [result["normalized_score"] for result in results] == calibration.normalize(scores).tolist()
    for result in results:
        anomaly_map = result["anomaly_map"]
        assert result["mask"].dtype == bool and result["mask"].shape == anomaly_map.shape
        # float64 comparison, as Calibration.masks does (float32 would round the threshold)
        expected_mask = anomaly_map.astype(np.float64) > calibration.pixel_threshold
        np.testing.assert_array_equal(result["mask"], expected_mask)
    assert results[-1]["mask"].shape == (180, 300)
    # some pixels above the threshold and some below: the comparison above can tell them apart
    masks = np.concatenate([result["mask"].ravel() for result in results])
    assert masks.any() and not masks.all()


def test_without_calibration_the_results_are_as_before(pipe, toy):
    references = [example.image for example in toy["train"]]
    queries = [example.image for example in toy["test"]]
    processor, model = pipe.model.image_processor(), pipe.model
    with torch.no_grad():
        plain_bank = model.build_reference_bank(
            processor(references, return_tensors="pt").pixel_values, class_name="fabric"
        )
    before = pipe(queries, reference_bank=plain_bank)
    uncalibrated = {
        "calibrate=False": pipe(queries, reference_images=references, class_name="fabric", calibrate=False),
        "one reference": pipe(queries, reference_images=references[:1], class_name="fabric"),
        "zero-shot": pipe(queries, class_name="fabric"),
    }
    for name, results in [("a bank built by the model", before), *uncalibrated.items()]:
        assert all(set(result) == UNCALIBRATED_KEYS for result in results), name
    for reused, original in zip(uncalibrated["calibrate=False"], before, strict=True):
        assert reused["score"] == original["score"]
        assert reused["branch_scores"] == original["branch_scores"]
        assert np.array_equal(reused["anomaly_map"], original["anomaly_map"])
    # calibrating changes no score
    calibrated = pipe(queries, reference_images=references, class_name="fabric")
    assert [r["score"] for r in calibrated] == [r["score"] for r in before]


def test_held_out_calibration_images(pipe, toy):
    references = [toy["train"][0].image]
    held_out = [toy["train"][1].image, toy["test"][0].image, toy["test"][0].image.rotate(90)]
    bank = pipe.build_reference_bank(references, class_name="fabric", calibration_images=held_out)
    assert (bank.calibration.normal_source, bank.calibration.num_normal) == ("held_out", 3)
    # 3 normals are too few for 5 %: the conformal threshold is their largest score
    plain = pipe.build_reference_bank(references, class_name="fabric", calibrate=False)
    assert plain.calibration is None
    held_out_scores = [result["score"] for result in pipe(held_out, reference_bank=plain)]
    # calibrate scores the 3 in one batch, the pipeline one by one: float32 rounding ~1e-7 relative
    assert bank.calibration.image_threshold == pytest.approx(max(held_out_scores), rel=1e-5)
    # a saved bank is calibrated the same way, in the call
    result = pipe(toy["test"][1].image, reference_bank=plain, calibration_images=held_out)
    assert result["threshold"] == bank.calibration.image_threshold
    # calibrate=False takes a calibration away
    assert set(pipe(toy["test"][1].image, reference_bank=bank, calibrate=False)) == UNCALIBRATED_KEYS


def test_impossible_calibration_is_refused_when_asked(pipe, toy):
    image = toy["test"][0].image
    for asked in ({"calibrate": True}, {"false_alarm_rate": 0.1}):
        with pytest.raises(
            ValueError, match="needs at least 2 reference images, got 1; give held-out normal"
        ):
            pipe(image, reference_images=[toy["train"][0].image], **asked)
    with pytest.raises(ValueError, match="Calibration images were given with calibrate=False"):
        pipe(image, reference_images=[image], calibrate=False, calibration_images=[toy["train"][0].image])
    with pytest.raises(ValueError, match="calibration_images is empty"):
        pipe(image, reference_images=[image], calibration_images=[])


def test_methods_that_keep_their_references_are_not_calibrated_leave_one_out(toy):
    from test_vtfusion import VtFusionModelTester

    model = VtFusionModelTester.tiny_model()
    model.fit([example.image for example in toy["train"]], class_name="fabric", steps=1)
    bank = model.build_reference_bank()
    pixel_values = model.image_processor()([toy["test"][0].image] * 2, return_tensors="pt").pixel_values
    same, refusal = calibrate_reference_bank(model, bank, reference_pixel_values=pixel_values)
    assert same is bank and refusal.startswith("VtFusionModel keeps what it learnt")
    with pytest.raises(ValueError, match="Cannot calibrate by leave-one-out: VtFusionModel"):
        calibrate_reference_bank(model, bank, True)
    calibrated, refusal = calibrate_reference_bank(model, bank, normal_pixel_values=pixel_values)
    assert refusal is None and calibrated.calibration.normal_source == "held_out"


def test_exact_copies_among_the_references_are_left_out_with_a_warning(pipe, toy, caplog):
    references = [example.image for example in toy["train"]]
    expected = pipe.build_reference_bank(references)
    with caplog.at_level("WARNING", logger="hf_fsad.pipeline"):
        bank = pipe.build_reference_bank([references[0], references[1], references[0].copy()])
    assert "1 of the 3 reference images are exact copies of others" in caplog.text
    # a copy left in would score its twin at distance 0 in leave-one-out, lowering the threshold
    assert bank.k == 2 and bank.calibration == expected.calibration


def test_calibration_images_that_are_references_are_left_out_or_refused(pipe, toy, caplog):
    references = [example.image for example in toy["train"]]
    held_out = [example.image for example in toy["test"]]
    with pytest.raises(ValueError, match="all 2 held-out normal images are also reference images"):
        pipe.build_reference_bank(references, calibration_images=references)
    with caplog.at_level("WARNING", logger="hf_fsad.pipeline"):
        bank = pipe.build_reference_bank(references, calibration_images=[references[0], *held_out])
    assert "1 of the 4 held-out normal images are also reference images" in caplog.text
    expected = pipe.build_reference_bank(references, calibration_images=held_out)
    assert bank.calibration.num_normal == len(held_out) and bank.calibration == expected.calibration


def test_generated_references_are_counted_in_the_bank_and_refuse_leave_one_out(pipe, toy, tmp_path):
    from hf_fsad.bank import ReferenceBank
    from hf_fsad.calibration_inputs import GENERATED_IMAGE_INFO

    references = [example.image for example in toy["train"]]
    generated = [image.transpose(0) for image in references]  # as One-to-Normal's would be: near copies
    for image in generated:
        image.info[GENERATED_IMAGE_INFO] = True
    bank = pipe.build_reference_bank([*references, *generated])
    assert bank.k == 4 and bank.generated_references == 2 and bank.calibration is None
    with pytest.raises(ValueError, match="2 of the references were generated from the others"):
        pipe.build_reference_bank([*references, *generated], calibrate=True)
    bank.save(tmp_path / "bank.safetensors")
    assert ReferenceBank.load(tmp_path / "bank.safetensors").generated_references == 2
    held_out = [example.image for example in toy["test"]]
    calibrated = pipe.build_reference_bank([*references, *generated], calibration_images=held_out)
    assert calibrated.calibration.normal_source == "held_out"


def test_confidence_reaches_the_calibration(pipe, toy):
    references = [example.image for example in toy["train"]]
    bank = pipe.build_reference_bank(references, false_alarm_rate=0.25, confidence=0.9)
    # 2 leave-one-out normals: their maximum keeps 25 % with probability 1 - 0.75^2 < 0.9; 9 would
    assert (bank.calibration.confidence, bank.calibration.normals_needed) == (0.9, 9)
    results = pipe([toy["test"][0].image], reference_images=references, false_alarm_rate=0.25, confidence=0.9)
    assert results[0]["threshold"] == bank.calibration.image_threshold


def test_a_part_with_a_non_finite_score_fails_with_the_reason_and_writes_valid_json():
    import json

    from hf_fsad.calibration import apply_calibration, fit_calibration
    from hf_fsad.io import json_line
    from hf_fsad.modeling_outputs import AnomalyDetectionOutput
    from hf_fsad.pipeline import decision

    calibration = fit_calibration(
        torch.tensor([0.28, 0.29, 0.30]), None, normal_source="held_out", false_alarm_rate=0.25
    )
    output = apply_calibration(
        AnomalyDetectionOutput(image_scores=torch.tensor([0.2, float("nan"), float("inf")])), calibration
    )
    verdicts = [decision(output, index, calibration) for index in range(3)]
    assert [verdict["label"] for verdict in verdicts] == ["normal", "anomalous", "anomalous"]
    assert "error" not in verdicts[0]
    assert all("cannot be trusted" in verdict["error"] for verdict in verdicts[1:])
    record = json.loads(json_line({"score": float(output.image_scores[1]), **verdicts[1]}))
    assert record["score"] is None and record["label"] == "anomalous"
