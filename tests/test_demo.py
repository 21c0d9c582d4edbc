"""The demo: falls back to a random backbone offline, saying so, writes a readable report, and ends with
pass/fail verdicts on good/ and queries/ folders that `hf-fsad score` runs on next."""

from __future__ import annotations

import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

import numpy as np
import pytest
from huggingface_hub import constants
from PIL import Image
from sklearn.metrics import roc_auc_score

from hf_fsad import demo
from hf_fsad.cli import main
from hf_fsad.data.toy import load_toy
from hf_fsad.testing import tiny_clip_config
from hf_fsad.visualization import mask_array


def test_offline_fallback_says_so_and_writes_the_report(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(demo, "hub_reachable", lambda repo_id, timeout=3.0: False)
    monkeypatch.setattr(demo, "vit_b16_config", tiny_clip_config)  # same code path, test-sized backbone
    outputs = []  # the model's outputs: each category's test images first
    load_demo_model = demo.load_demo_model

    def recording_load(backbone):
        model, pretrained = load_demo_model(backbone)
        model.register_forward_hook(lambda module, args, output: outputs.append(output))
        return model, pretrained

    monkeypatch.setattr(demo, "load_demo_model", recording_load)

    result = demo.run_demo(tmp_path, backbone=str(tmp_path / "not-a-cached-model"), k=2)
    report = result.report

    message = caplog.text
    assert "cannot be reached" in message and "not WinCLIP's accuracy" in message
    text = report.read_text()
    assert "randomly initialised" in text
    rows = re.findall(r"^\| (\w+) \| ([\d.]+) \| ([\d.]+) \|$", text, flags=re.MULTILINE)
    assert [row[0] for row in rows] == list(demo.DEMO_CATEGORIES)
    # each row's AUROCs are sklearn's of the model's scores and maps against the toy labels and masks
    category_outputs = outputs[: len(demo.DEMO_CATEGORIES)]  # then the verdicts' queries
    for (category, image, pixel), output in zip(rows, category_outputs, strict=True):
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
    def probe(repo_id: str, timeout: float = 3.0) -> bool:
        raise AssertionError("the Hub was probed although the backbone is on disk")

    monkeypatch.setattr(demo, "hub_reachable", probe)
    model, pretrained = demo.load_demo_model(tiny_clip_dir)
    assert pretrained
    assert model.config.clip_config.vision_config.hidden_size == tiny_clip_config().vision_config.hidden_size


def test_the_demo_ends_with_calibrated_verdicts_on_folders_the_cli_scores_alike(
    tiny_clip_dir, tmp_path, monkeypatch, capsys
):
    out = tmp_path / "demo_output"
    assert main(["demo", "--out", str(out), "--backbone", tiny_clip_dir]) == 0
    printed = capsys.readouterr().out.splitlines()
    good = sorted((out / "good").glob("*.png"))
    queries = sorted((out / "queries").glob("*.png"))
    assert len(good) == demo.VERDICT_REFERENCES
    assert len(queries) == demo.VERDICT_NORMAL_QUERIES + demo.VERDICT_DEFECTIVE_QUERIES
    verdicts = [line for line in printed if " -> " in line]
    assert [line.split(":")[0] for line in verdicts] == [str(path) for path in queries]
    assert all(line.endswith(("-> pass", "-> fail (anomalous)")) for line in verdicts)
    assert any(line.startswith("calibration: conformal threshold") for line in printed)
    assert printed[-1].startswith(f"next: hf-fsad score {out / 'queries'} --model winclip@{tiny_clip_dir}")
    assert "## Pass/fail" in (out / "report.md").read_text()

    # The next step: `hf-fsad score` on the two folders gives the same verdicts.
    results = tmp_path / "results.jsonl"
    arguments = ["score", str(out / "queries"), "--model", f"winclip@{tiny_clip_dir}"]
    arguments += ["--reference", str(out / "good"), "--class-name", demo.VERDICT_CLASS_NAME]
    assert main([*arguments, "--output", str(results)]) == 0
    records = {record["path"]: record for record in map(json.loads, results.read_text().splitlines())}
    for line in verdicts:
        path, verdict = line.split(": score ")
        assert ("fail" in verdict) == (records[path]["label"] == "anomalous"), line


class _ModelInfo(BaseHTTPRequestHandler):
    """Answers the Hub's model-info request for any repository; counts the requests."""

    requests: ClassVar[list[str]] = []

    def do_GET(self):
        type(self).requests.append(self.path)
        body = json.dumps({"id": self.path.removeprefix("/api/models/"), "private": False}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_the_hub_check_asks_huggingface_hub_and_honours_offline_mode(monkeypatch):
    """The check goes where huggingface_hub goes (here HF_ENDPOINT, a local server on a port other than 443,
    which a raw socket to port 443 missed) and asks nothing when HF_HUB_OFFLINE is set."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _ModelInfo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("NO_PROXY", "127.0.0.1")
        monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_address[1]}")
        assert demo.hub_reachable("openai/clip-vit-base-patch16", timeout=60.0)  # a loaded machine is slow
        assert _ModelInfo.requests == ["/api/models/openai/clip-vit-base-patch16"]
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
        assert not demo.hub_reachable("openai/clip-vit-base-patch16")
        assert len(_ModelInfo.requests) == 1
    finally:
        server.shutdown()
        server.server_close()
