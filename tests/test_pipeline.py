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
    assert [r["score"] for r in results] == pytest.approx(expected.image_scores.tolist(), rel=1e-5)
    for name, values in expected.branch_scores.items():
        assert [r["branch_scores"][name] for r in results] == pytest.approx(values.tolist(), rel=1e-5)

    wide = results[1]
    assert wide["anomaly_map"].shape == (180, 300)
    assert wide["anomaly_map"].dtype == np.float32
    assert wide["heatmap"].size == (300, 180)
    # At the model's own resolution the map is returned unchanged.
    square = results[2]["anomaly_map"]
    assert square.shape == (240, 240)
    np.testing.assert_allclose(square, expected.anomaly_maps[2].numpy(), rtol=1e-5, atol=1e-6)


def test_a_saved_bank_gives_the_same_results(pipe, toy):
    references = [example.image for example in toy["train"]]
    queries = [example.image for example in toy["test"]]
    bank = pipe.build_reference_bank(references, class_name="fabric")
    direct = pipe(queries, reference_images=references, class_name="fabric")
    reused = pipe(queries, reference_bank=bank)
    assert [r["score"] for r in reused] == [r["score"] for r in direct]


def test_zero_shot_without_references(pipe, toy):
    result = pipe(toy["test"][0].image, class_name="fabric")
    assert np.isfinite(result["score"])
    assert set(result["branch_scores"]) == {"zero_shot"}


def test_conflicting_or_empty_references_are_refused(pipe, toy):
    image = toy["test"][0].image
    bank = pipe.build_reference_bank([toy["train"][0].image])
    with pytest.raises(ValueError, match="either reference_images or reference_bank"):
        pipe(image, reference_images=[image], reference_bank=bank)
    with pytest.raises(ValueError, match="reference_images is empty"):
        pipe(image, reference_images=[])
