"""`pipeline("image-anomaly-detection")`: same scores as the model, maps at the image's own size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import pipeline

import hf_fsad  # noqa: F401  (registers the task)
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
