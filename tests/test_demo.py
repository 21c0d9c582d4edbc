"""The demo: falls back to a random backbone offline, saying so, and writes a readable report."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from sklearn.metrics import roc_auc_score

from hf_fsad import demo
from hf_fsad.data.toy import load_toy
from hf_fsad.testing import tiny_clip_config
from hf_fsad.visualization import mask_array


def test_offline_fallback_says_so_and_writes_the_report(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(demo, "vit_b16_config", tiny_clip_config)  # same code path, test-sized backbone
    outputs = []  # the model's output on each category's test images
    load_demo_model = demo.load_demo_model

    def recording_load(backbone):
        model, pretrained = load_demo_model(backbone)
        model.register_forward_hook(lambda module, args, output: outputs.append(output))
        return model, pretrained

    monkeypatch.setattr(demo, "load_demo_model", recording_load)

    report = demo.run_demo(tmp_path, backbone=str(tmp_path / "not-a-cached-model"), k=2)

    message = caplog.text
    assert "cannot be reached" in message and "not WinCLIP's accuracy" in message
    text = report.read_text()
    assert "randomly initialised" in text
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.MULTILINE)
    assert [row[0] for row in rows] == list(demo.DEMO_CATEGORIES)
    # each row's AUROCs are sklearn's of the model's scores and maps against the toy labels and masks
    for (category, image, pixel), output in zip(rows, outputs, strict=True):
        test = load_toy(category, num_train=2, num_test_good=5, num_test_anomalous=5, seed=0)["test"]
        masks = np.stack([mask_array(mask, output.anomaly_maps.shape[-1]) for mask in test["mask"]])
        # the report rounds to 3 decimals: within 5e-4 (+ float64 rounding of the AUROC)
        assert float(image) == pytest.approx(
            roc_auc_score(test["label"], output.image_scores), abs=5e-4 + 1e-12
        )
        expected_pixel = roc_auc_score(masks.ravel(), output.anomaly_maps.numpy().ravel())
        assert float(pixel) == pytest.approx(expected_pixel, abs=5e-4 + 1e-12)
    for category in demo.DEMO_CATEGORIES:
        assert f"(heatmaps_{category}.png)" in text
        assert Image.open(tmp_path / f"heatmaps_{category}.png").size[0] > 0


def test_a_cached_backbone_is_used_without_the_hub(tiny_clip_dir, monkeypatch):
    def probe(timeout: float = 3.0) -> bool:
        raise AssertionError("the Hub was probed although the backbone is on disk")

    monkeypatch.setattr(demo, "hub_reachable", probe)
    model, pretrained = demo.load_demo_model(tiny_clip_dir)
    assert pretrained
    assert model.config.clip_config.vision_config.hidden_size == tiny_clip_config().vision_config.hidden_size
