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

from extras import import_extra

gradio_client = import_extra("gradio_client", "space")
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
        None, None, api_name="/detect",
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
    # the app scores one query per forward, here a batch: float32 rounding ~1e-7 relative, 1e-5 bound
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
    # the same bank tensors and query through the same float32 forward: ~1e-7 relative at most
    assert again[2][0]["score"] == pytest.approx(result["score"], rel=1e-6)


def test_bad_uploads_say_what_to_do(client, saved_winclip_dir, tmp_path):
    broken = tmp_path / "notes.png"
    broken.write_bytes(b"this is not an image")
    upload = gradio_client.handle_file
    with pytest.raises(gradio_client.exceptions.AppError, match="notes.png is not an image"):
        client.predict(
            saved_winclip_dir, [], "fabric", [upload(broken)], 0.5, None, None, None, api_name="/detect"
        )
    with pytest.raises(gradio_client.exceptions.AppError, match="at least one query"):
        client.predict(saved_winclip_dir, [], "fabric", [], 0.5, None, None, None, api_name="/detect")
    with pytest.raises(gradio_client.exceptions.AppError, match="Could not load"):
        client.predict(
            str(tmp_path / "missing"), [], "fabric", [upload(broken)], 0.5, None, api_name="/detect"
        )


def _matching_row(path: str, rows) -> dict | None:
    """The first of `rows` (dicts with a PIL `image`) whose image has exactly the pixels of the file."""
    pixels = Image.open(path).convert("RGB").tobytes()
    return next((row for row in rows if row["image"].convert("RGB").tobytes() == pixels), None)


def test_examples_show_normal_references_and_a_defective_query_from_toy_and_elpv(tmp_path):
    from hf_fsad.data import load_benchmark
    from hf_fsad.data.toy import toy_records

    (toy,) = space.toy_examples(tmp_path)
    (elpv,) = space.elpv_examples(tmp_path)  # the elpv extra is part of `make install`
    for references, _, queries in (toy, elpv):
        assert len(references) == 2 and len(queries) == 1 and len(set(references)) == 2
    assert (toy[1], elpv[1]) == ("fabric", "solar cell")

    # The toy example is the generator's weave draw with seed 4: each file found among its records by its
    # pixels, with the record's label.
    records = toy_records("weave", num_train=2, num_test_good=0, num_test_anomalous=1, seed=4)
    rows = [{"image": r.image, "label": r.label, "mask": r.mask} for r in records["train"] + records["test"]]
    found = [_matching_row(path, rows) for path in [*toy[0], *toy[2]]]
    assert None not in found, "an example file is not one of the generator's images"
    assert [row["label"] for row in found] == [0, 0, 1] and found[2]["mask"] is not None

    # ELPV: the query is a defective test cell, the references normal training cells of its type.
    data = load_benchmark("elpv")
    defective = data["test"].filter(lambda label: label == 1, input_columns="label")
    query = _matching_row(elpv[2][0], defective)
    assert query is not None, "the ELPV query is not a defective cell"
    normal = data["train"].filter(
        lambda label, category: label == 0 and category == query["category"],
        input_columns=["label", "category"],
    )
    assert all(_matching_row(path, normal) is not None for path in elpv[0])


def test_defective_references_with_masks_reach_methods_that_use_them(client, saved_winclip_dir, tmp_path):
    import numpy as np

    from hf_fsad.data.toy import toy_records
    from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
    from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config
    from hf_fsad.visualization import mask_array

    torch.manual_seed(0)
    model = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=tiny_clip_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    model.save_pretrained(tmp_path / "memory")
    records = toy_records("weave", num_train=1, num_test_good=1, num_test_anomalous=2, seed=6)
    paths = {}
    for name, image in [("normal", records["train"][0].image), ("defect", records["test"][1].image),
                        ("mask", records["test"][1].mask), ("query", records["test"][2].image)]:  # fmt: skip
        paths[name] = tmp_path / f"{name}.png"
        image.save(paths[name])
    upload = gradio_client.handle_file
    results = client.predict(
        str(tmp_path / "memory"), [upload(paths["normal"])], "fabric", [upload(paths["query"])], 0.5, None,
        [upload(paths["defect"])], [upload(paths["mask"])], api_name="/detect",
    )[2]  # fmt: skip
    processor = model.image_processor()
    pixels = lambda name: (
        processor([Image.open(paths[name]).convert("RGB")], return_tensors="pt").pixel_values
    )
    mask = torch.from_numpy(np.stack([mask_array(Image.open(paths["mask"]), model.config.image_size)]))
    with torch.no_grad():
        bank = model.build_reference_bank(
            pixels("normal"), "fabric", anomalous_pixel_values=pixels("defect"), anomalous_masks=mask
        )
        expected = model(pixels("query"), reference_bank=bank).image_scores.item()
    # as above: the app's batch vs this one, float32 rounding ~1e-7 relative
    assert results[0]["score"] == pytest.approx(expected, rel=1e-5)
    with pytest.raises(gradio_client.exceptions.AppError, match="does not use anomalous references"):
        client.predict(
            saved_winclip_dir, [upload(paths["normal"])], "fabric", [upload(paths["query"])], 0.5, None,
            [upload(paths["defect"])], None, api_name="/detect",
        )  # fmt: skip


@pytest.mark.e2e
def test_a_real_browser_uploads_references_and_a_query_and_sees_the_heatmap(
    client, saved_winclip_dir, tmp_path
):
    """Headless Chromium (Debian's `chromium`; Playwright drives it, its own browser download is not used)
    fills the page, clicks Detect and waits for the heatmap. The screenshot goes to $HF_FSAD_SCREENSHOT when
    set (`make e2e` writes docs/space_screenshot.png)."""
    import shutil

    playwright = import_extra("playwright.sync_api", "dev")
    browser_path = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser_path is None:
        pytest.skip("headless Chromium is not installed (apt-get install chromium; .ci/run installs it)")
    references, class_name, queries = space.toy_examples(tmp_path)[0]
    screenshot = Path(os.environ.get("HF_FSAD_SCREENSHOT") or tmp_path / "space.png")
    with playwright.sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=browser_path, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.goto(client.src)
        page.get_by_label("Model").fill(saved_winclip_dir)
        page.keyboard.press("Enter")
        for element, files in (("#references", references), ("#queries", queries)):
            page.locator(f"{element} input[type=file]").set_input_files(files)
            # the upload is done when the component lists the file (its stem and suffix apart)
            page.locator(element).get_by_text(Path(files[-1]).stem, exact=True).wait_for(timeout=60_000)
        page.get_by_label("Class name").fill(class_name)
        page.get_by_role("button", name="Detect").click()
        heatmap = page.locator(
            "img[src*='heatmap'], .gallery-item img, [data-testid='detailed-image'] img"
        ).first
        heatmap.wait_for(state="visible", timeout=120_000)
        page.get_by_text("verdict").first.wait_for(timeout=30_000)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert screenshot.stat().st_size > 10_000
