"""Hub publishing: model cards with `model-index` from results.json, runnable usage, exact upload folders.

Nothing is uploaded here: pushes go to a stand-in Hub on 127.0.0.1 that refuses them, and the folders they
would upload are checked file by file.
"""

from __future__ import annotations

import re
import statistics

import pytest
import torch
import yaml

from hf_fsad.cli import main
from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import DatasetSpec, run_benchmark
from hf_fsad.hub import stage_bank, stage_model

SPEC = DatasetSpec(
    "toy", categories=["stripes"], options={"num_train": 3, "num_test_good": 2, "num_test_anomalous": 2}
)


@pytest.fixture(scope="module")
def benchmarked(tmp_path_factory, saved_winclip_dir):
    from transformers import AutoModel

    out = tmp_path_factory.mktemp("bench")
    run_benchmark(
        {"winclip": AutoModel.from_pretrained(saved_winclip_dir)},
        [SPEC],
        ks=[1, 2],
        seeds=[0, 1],
        out_dir=out,
    )
    return out / "results.json"


def _front_matter(readme: str) -> dict:
    match = re.match(r"---\n(.*?)\n---\n", readme, re.DOTALL)
    assert match, "the card has no YAML front matter"
    return yaml.safe_load(match.group(1))


def test_model_card_model_index_matches_results_json(benchmarked, saved_winclip_dir, tmp_path):
    import json

    folder = stage_model(saved_winclip_dir, tmp_path / "upload", "someone/winclip-stripes", benchmarked)
    front = _front_matter((folder / "README.md").read_text())
    assert front["library_name"] == "hf_fsad" and "hf_fsad-winclip" in front["tags"]
    (index,) = front["model-index"]
    reported = {
        (result["dataset"]["name"], result["dataset"]["config"], metric["type"]): metric["value"]
        for result in index["results"]
        for metric in result["metrics"]
    }
    cells = json.loads(benchmarked.read_text())["cells"]
    for k in (1, 2):
        for metric in ("image_auroc", "pixel_auroc", "pixel_aupro"):
            expected = statistics.fmean(c["metrics"][metric] for c in cells if c["k"] == k)
            # the card writes percentages with 2 decimals: half a unit of the last place
            assert reported[("toy", f"{k}-shot", metric)] == pytest.approx(100 * expected, abs=0.005)
    assert (
        "WinCLIP: Zero-/Few-Shot Anomaly Classification and Segmentation"
        in (folder / "README.md").read_text()
    )


def test_push_keeps_the_training_runs_card_details(saved_winclip_dir, tmp_path):
    import shutil

    from transformers import AutoModel

    from hf_fsad.hub import model_card, write_model_card

    model_dir = tmp_path / "model"
    shutil.copytree(saved_winclip_dir, model_dir)
    model = AutoModel.from_pretrained(model_dir)
    write_model_card(
        model_dir, model_card(model, "openai/clip-vit-base-patch16", ["mvtec_ad"], "Trained for 3 steps.")
    )
    folder = stage_model(model_dir, tmp_path / "upload", "someone/winclip")
    readme = (folder / "README.md").read_text()
    front = _front_matter(readme)
    assert front["base_model"] == "openai/clip-vit-base-patch16" and front["datasets"] == ["mvtec_ad"]
    assert "## Training\n\nTrained for 3 steps." in readme


def test_the_usage_snippet_runs_against_the_local_directory(saved_winclip_dir, tmp_path):
    folder = stage_model(saved_winclip_dir, tmp_path / "upload", str(tmp_path / "upload"))
    readme = (folder / "README.md").read_text()
    (snippet,) = re.findall(r"```python\n(.*?)```", readme, re.DOTALL)
    data = load_benchmark("toy", category="stripes", num_train=2, num_test_good=1, num_test_anomalous=1)
    namespace = {
        "normal_images": [image.convert("RGB") for image in data["train"]["image"]],
        "images": [image.convert("RGB") for image in data["test"]["image"]],
    }
    exec(snippet, namespace)  # noqa: S102  (the test runs the card's own snippet)
    from transformers import AutoModel

    model = AutoModel.from_pretrained(saved_winclip_dir)
    processor = model.image_processor()
    with torch.no_grad():
        bank = model.build_reference_bank(
            processor(namespace["normal_images"], return_tensors="pt").pixel_values
        )
        expected = model(
            processor(namespace["images"], return_tensors="pt").pixel_values, reference_bank=bank
        )
    # The snippet scores the queries against those references: the same computation, bit for bit.
    assert torch.equal(namespace["scores"], expected.image_scores) and namespace["scores"].shape == (2,)


@pytest.fixture
def refusing_hub(monkeypatch):
    """A stand-in Hub on 127.0.0.1 that refuses every request (403) and records what it was sent; the Hub
    client is pointed at it, online, with a made-up token, so no test can reach the real Hub."""
    import json
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from huggingface_hub import constants

    received = []

    class Refuse(BaseHTTPRequestHandler):
        def _refuse(self):
            received.append((self.command, self.path, self.headers.get("Authorization")))
            body = json.dumps({"error": "the test hub refuses everything"}).encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_HEAD = _refuse

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    token = "hf_" + "t" * 34
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HF_OIDC_RESOURCE", raising=False)
    yield token, received
    server.shutdown()
    thread.join()


def test_push_stages_exactly_the_model_and_its_card_and_reports_a_refused_upload(
    saved_winclip_dir, tmp_path, capsys, refusing_hub
):
    from pathlib import Path

    staged = tmp_path / "staged"
    assert main(["push", saved_winclip_dir, "someone/winclip", "--dry-run", str(staged)]) == 0
    model_files = {path.name for path in Path(saved_winclip_dir).iterdir() if path.name != "README.md"}
    assert {path.name for path in staged.iterdir()} == model_files | {"README.md"}
    assert main(["push", saved_winclip_dir, "someone/winclip", "--dry-run", str(staged)]) == 2  # not empty
    assert "not empty" in capsys.readouterr().err
    token, received = refusing_hub
    assert not received  # a dry run sends nothing
    assert main(["push", saved_winclip_dir, "someone/winclip"]) == 1
    error = capsys.readouterr().err
    assert "upload to someone/winclip failed" in error and "refuses everything" in error
    assert token not in error and "hf_" not in error.replace("hf_fsad", "")
    # The push did ask the (stand-in) Hub, with the token, to create the repository.
    assert ("POST", "/api/repos/create", f"Bearer {token}") in received


def test_push_bank_stages_the_bank_with_a_readme(saved_winclip_dir, tmp_path):
    from transformers import AutoModel

    from hf_fsad.bank import ReferenceBank

    model = AutoModel.from_pretrained(saved_winclip_dir)
    bank = model.build_reference_bank(torch.randn(2, 3, 240, 240), class_name="bottle")
    bank.save(tmp_path / "bottle.safetensors")
    folder = stage_bank(tmp_path / "bottle.safetensors", tmp_path / "upload")
    assert {path.name for path in folder.iterdir()} == {"bottle.safetensors", "README.md"}
    readme = (folder / "README.md").read_text()
    assert (
        _front_matter(readme)["tags"][-1] == "hf_fsad-winclip" and "2 reference images for `bottle`" in readme
    )
    assert ReferenceBank.load(folder / "bottle.safetensors").config_hash == bank.config_hash
    with pytest.raises(ValueError, match="not an hf_fsad reference bank"):
        (tmp_path / "fake.safetensors").write_bytes(b"nope")
        stage_bank(tmp_path / "fake.safetensors", tmp_path / "other")


def test_push_space_stages_the_app_its_front_matter_and_the_package(tmp_path):
    staged = tmp_path / "space"
    assert main(["push-space", "someone/hf-fsad-demo", "--dry-run", str(staged)]) == 0
    assert {path.name for path in staged.iterdir()} == {"app.py", "README.md", "requirements.txt", "package"}
    front = _front_matter((staged / "README.md").read_text())
    assert front["sdk"] == "gradio" and str(front["sdk_version"]).startswith("6.")
    assert (staged / front["app_file"]).is_file() and str(front["python_version"]).startswith("3.")
    assert (staged / "requirements.txt").read_text().split() == ["./package[space]"]
    package = staged / "package"
    assert (
        'name = "hf-fsad"' in (package / "pyproject.toml").read_text() and (package / "README.md").is_file()
    )
    assert (package / "src" / "hf_fsad" / "hub.py").is_file()
    assert not list(package.rglob("__pycache__"))


@pytest.mark.parametrize("base_model", ["openai/clip-vit-base-patch16", "local"])
def test_card_metadata_is_what_the_hub_accepts(tiny_winclip, tmp_path, base_model):
    from huggingface_hub import ModelCard, ModelCardData

    from hf_fsad.hub import model_card

    if base_model == "local":
        base_model = str(tmp_path / "clip")
        (tmp_path / "clip").mkdir()
    card = model_card(tiny_winclip, base_model, ["toy"], "Fitted for 2 steps.")
    parsed = ModelCard(str(card))  # huggingface_hub's own parser of the front matter
    assert isinstance(parsed.data, ModelCardData) and parsed.data.library_name == "hf_fsad"
    if base_model.startswith("openai/"):
        assert parsed.data.base_model == base_model
    else:  # a local path is no repo id: the Hub would reject it as base_model, so it goes to the text
        assert parsed.data.base_model is None
        assert f"Base model: the local checkpoint `{base_model}`." in parsed.text
    assert "Fitted for 2 steps." in parsed.text
    # The class docstring is dedented: an indented line outside a code fence renders as a code block.
    body = parsed.text.split("```")[0::2]
    assert not [line for part in body for line in part.splitlines() if line.startswith("    ")]
    assert type(tiny_winclip).__doc__.split("\n")[1].strip() in parsed.text.splitlines()
