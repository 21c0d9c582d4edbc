"""The Gradio Space (spaces/app.py) through its API with gradio_client: scores match the model, bad uploads
get the documented errors."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

gradio_client = pytest.importorskip(
    "gradio_client", reason="the Space needs the `space` extra (installed by make)"
)
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "spaces"))

import app as space


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def client(saved_winclip_dir):
    demo = space.build_app([saved_winclip_dir])
    demo.queue().launch(prevent_thread_lock=True, server_port=_free_port(), show_error=True)
    yield gradio_client.Client(demo.local_url, verbose=False)
    demo.close()


def test_scores_through_the_api_match_the_model(client, saved_winclip_dir, tmp_path):
    from transformers import AutoModel

    references, class_name, queries = space.toy_examples(tmp_path)[0]
    upload = gradio_client.handle_file
    heatmaps, annotated, results, _branch_plot, bank = client.predict(
        saved_winclip_dir, [upload(p) for p in references], class_name, [upload(p) for p in queries], 0.5, None,
        api_name="/detect",
    )  # fmt: skip
    model = AutoModel.from_pretrained(saved_winclip_dir)
    processor = model.image_processor()
    pixels = lambda paths: (
        processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values
    )
    with torch.no_grad():
        expected = model(
            pixels(queries), reference_bank=model.build_reference_bank(pixels(references), class_name)
        )
    (result,) = results
    assert result["score"] == pytest.approx(expected.image_scores.item(), rel=1e-5)
    assert result["verdict"] == ("fail" if result["score"] >= 0.5 else "pass")
    assert set(result["branch_scores"]) == set(expected.branch_scores)
    assert len(heatmaps) == 1 and Image.open(heatmaps[0]["image"]).format == "PNG"
    assert len(annotated) == 1 and Image.open(annotated[0]["image"]).size == Image.open(queries[0]).size
    assert Path(bank).name == "fabric-bank.safetensors"
    # the downloaded bank scores the same when uploaded again, without references
    again = client.predict(
        saved_winclip_dir, [], class_name, [upload(p) for p in queries], 0.5, upload(bank), api_name="/detect"
    )
    assert again[2][0]["score"] == pytest.approx(result["score"], rel=1e-6)


def test_bad_uploads_say_what_to_do(client, saved_winclip_dir, tmp_path):
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"this is not an image")
    upload = gradio_client.handle_file
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.png is not an image"):
        client.predict(saved_winclip_dir, [], "fabric", [upload(broken)], 0.5, None, api_name="/detect")
    with pytest.raises(gradio_client.exceptions.AppError, match="at least one query"):
        client.predict(saved_winclip_dir, [], "fabric", [], 0.5, None, api_name="/detect")
    with pytest.raises(gradio_client.exceptions.AppError, match="Could not load"):
        client.predict(
            str(tmp_path / "missing"), [], "fabric", [upload(broken)], 0.5, None, api_name="/detect"
        )
