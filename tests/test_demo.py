"""The demo: falls back to a random backbone offline, saying so, and writes a readable report."""

from __future__ import annotations

import re

from PIL import Image

from hf_fsad import demo
from hf_fsad.testing import tiny_clip_config


def test_offline_fallback_says_so_and_writes_the_report(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo, "hub_reachable", lambda timeout=3.0: False)
    monkeypatch.setattr(demo, "vit_b16_config", tiny_clip_config)  # same code path, test-sized backbone

    report = demo.run_demo(tmp_path, backbone=str(tmp_path / "not-a-cached-model"), k=2)

    message = caplog.text
    assert "cannot be reached" in message and "not WinCLIP's accuracy" in message
    text = report.read_text()
    assert "randomly initialised" in text
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.MULTILINE)
    assert [row[0] for row in rows] == list(demo.DEMO_CATEGORIES)
    assert all(0.0 <= float(value) <= 1.0 for row in rows for value in row[1:])
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
