"""The Gradio Space (spaces/app.py) through its API with gradio_client: scores match the model, bad uploads
get the documented errors."""

from __future__ import annotations

import os
import socket
import sys
import warnings
from pathlib import Path

import pytest
import torch
from PIL import Image

from extras import import_extra
from hf_fsad.bank import ReferenceBank

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


def _files(paths) -> list | None:
    return [gradio_client.handle_file(path) for path in paths] if paths else None


def _detect(
    client,
    source,
    references,
    queries,
    threshold=0.5,
    bank=None,
    defects=None,
    masks=None,
    weight_search=True,
    tiling=("0", "0", "pooled"),
):
    """The app's /detect outputs: heatmaps, outlined regions, decision Markdown, results, branches, bank;
    `tiling`: (tile size, stride, mode), sizes N or HxW, tile size 0: untiled."""
    return client.predict(
        source, _files(references) or [], "fabric", _files(queries), threshold,
        None if bank is None else gradio_client.handle_file(bank), _files(defects), _files(masks),
        0, weight_search, None, *tiling, api_name="/detect",
    )  # fmt: skip


def _model_and_pixels(model_dir: str):
    """The saved model and a function from image paths to its pixel values."""
    from transformers import AutoModel

    model = AutoModel.from_pretrained(model_dir)
    processor = model.image_processor()

    def pixels(paths) -> torch.Tensor:
        return processor([Image.open(p).convert("RGB") for p in paths], return_tensors="pt").pixel_values

    return model, pixels


def _outlined(annotated_item: dict, query: str) -> bool:
    """Whether the app drew an outline on the query (its annotated image differs from the upload)."""
    return Image.open(annotated_item["image"]).convert("RGB").tobytes() != Image.open(query).tobytes()


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """The Space's toy example: 4 normal references, then a normal and a defective query."""
    return space.toy_examples(tmp_path_factory.mktemp("toy"))[0]


def test_at_the_calibrated_default_the_defective_toy_query_fails_and_the_good_one_passes(
    client, saved_winclip_dir, toy
):
    references, _, queries = toy
    heatmaps, annotated, decision, results, _, bank = _detect(client, saved_winclip_dir, references, queries)
    assert [(Path(q).name, r["verdict"]) for q, r in zip(queries, results)] == [
        ("toy_weave_good.png", "pass"),
        ("toy_weave_scratch.png", "fail"),
    ]
    # the raw scores of this tiny model lie far below 0.5: a slider on them passed the defect
    assert max(r["score"] for r in results) < 0.4

    model, pixels = _model_and_pixels(saved_winclip_dir)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 4 normals cannot reach 5%: describe() says so
        expected_bank = model.calibrate(
            model.build_reference_bank(pixels(references), "fabric"), pixels(references)
        )
        expected = model(pixels(queries), reference_bank=expected_bank)
    calibration = ReferenceBank.load(bank).calibration
    # the same leave-one-out forwards on the same pixels as the app's: equal up to float32 rounding
    assert calibration.image_threshold == pytest.approx(expected_bank.calibration.image_threshold, rel=1e-6)
    assert calibration.pixel_threshold == pytest.approx(expected_bank.calibration.pixel_threshold, rel=1e-6)
    assert calibration.describe() in decision
    assert "conformal threshold" in decision and "Not calibrated" not in decision
    for result, score in zip(results, expected.image_scores.tolist()):
        # the app scores one query per forward, here a batch: float32 rounding ~1e-7 relative, 1e-5 bound
        assert result["score"] == pytest.approx(score, rel=1e-5)
        assert result["normalized_score"] == calibration.normalize(torch.tensor([result["score"]])).item()
        assert result["verdict"] in decision
        assert set(result["branch_scores"]) == set(expected.branch_scores)
    assert [r["normalized_score"] < 0.5 for r in results] == [True, False]
    # the defect's map crosses the calibrated pixel threshold, the good query's does not
    assert expected.anomaly_maps.flatten(1).amax(1).gt(calibration.pixel_threshold).tolist() == [False, True]
    assert [_outlined(item, query) for item, query in zip(annotated, queries)] == [False, True]
    assert len(heatmaps) == 2 and Image.open(heatmaps[0]["image"]).format == "PNG"
    assert Path(bank).name == "fabric-bank.safetensors"

    # the downloaded bank keeps its calibration: uploaded again, without references, the same decisions
    again = _detect(client, saved_winclip_dir, [], queries, bank=bank)
    assert "Calibrated (loaded bank)" in again[2] and calibration.describe() in again[2]
    # the same bank tensors and queries through the same float32 forward: ~1e-7 relative at most
    assert [r["normalized_score"] for r in again[3]] == pytest.approx(
        [r["normalized_score"] for r in results], rel=1e-6
    )
    assert [r["verdict"] for r in again[3]] == ["pass", "fail"]


def test_the_verdict_and_the_outlined_region_follow_the_slider(client, saved_winclip_dir, toy):
    references, _, queries = toy
    normalized = [r["normalized_score"] for r in _detect(client, saved_winclip_dir, references, queries)[3]]
    # below both normalised scores both fail, and the good query's map, whose normalised maximum (~0.13)
    # lies above that level, is outlined too
    low = normalized[0] / 2
    _, annotated, decision, results, _, _ = _detect(client, saved_winclip_dir, references, queries, low)
    assert [r["verdict"] for r in results] == ["fail", "fail"]
    assert [_outlined(item, query) for item, query in zip(annotated, queries)] == [True, True]
    assert f"Fail when the normalised score is above {low:.2f}" in decision
    # between them: the same split as at the calibrated default
    middle = (normalized[0] + normalized[1]) / 2
    results = _detect(client, saved_winclip_dir, references, queries, middle)[3]
    assert [r["verdict"] for r in results] == ["pass", "fail"]


def test_tiled_detection_scores_as_the_tiled_pipeline_and_lists_its_regions(client, saved_winclip_dir, toy):
    from transformers import pipeline

    from hf_fsad.tiling import Tiling

    references, _, queries = toy
    tiled = ("64", "48", "pooled")
    _, _, decision, results, _, bank = _detect(client, saved_winclip_dir, references, queries, tiling=tiled)
    tiling = Tiling(64, 48)
    assert f"Scored with {tiling.describe()}" in decision
    assert ReferenceBank.load(bank).tiling == tiling
    model, _ = _model_and_pixels(saved_winclip_dir)
    pipe = pipeline("image-anomaly-detection", model=model, image_processor=model.image_processor())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 4 normals cannot reach 5%
        expected = pipe(queries, reference_images=references, class_name="fabric", tiling=tiling)
    assert [r["score"] for r in results] == [e["score"] for e in expected]
    assert [r["regions"] for r in results] == [e["regions"] for e in expected]
    assert any(r["regions"] for r in results)
    # the downloaded tiled bank scores tiled when loaded again; other tile options are refused
    again = _detect(client, saved_winclip_dir, [], queries, bank=bank)[3]
    assert [r["score"] for r in again] == [r["score"] for r in results]
    with pytest.raises(gradio_client.exceptions.AppError, match="the bank was built with pooled tiling"):
        _detect(client, saved_winclip_dir, [], queries, bank=bank, tiling=("32", "0", "pooled"))
    # non-square tiles and strides, written HEIGHTxWIDTH as on the command line
    non_square = ("64x48", "48x32", "position")
    decision, _, _, bank = _detect(client, saved_winclip_dir, references, queries, tiling=non_square)[2:]
    saved = ReferenceBank.load(bank).tiling
    assert (saved.tile_size, saved.tile_stride, saved.mode) == ((64, 48), (48, 32), "position")
    assert f"Scored with {saved.describe()}" in decision
    with pytest.raises(gradio_client.exceptions.AppError, match="must be N or HEIGHTxWIDTH"):
        _detect(client, saved_winclip_dir, references, queries, tiling=("64x", "0", "pooled"))


def test_one_reference_cannot_be_calibrated_and_the_page_says_so(client, saved_winclip_dir, toy):
    references, _, queries = toy
    _, _, decision, results, _, bank = _detect(client, saved_winclip_dir, references[:1], queries)
    assert (
        "Not calibrated" in decision and "Leave-one-out needs at least 2 reference images, got 1" in decision
    )
    assert "Fail when the raw score is above 0.50" in decision
    assert [r["normalized_score"] for r in results] == [None, None]
    # raw scores against the raw slider, labelled: the defect's raw score is below 0.5
    assert [r["verdict"] for r in results] == ["pass (uncalibrated)", "pass (uncalibrated)"]
    assert results[0]["score"] < results[1]["score"]
    between = (results[0]["score"] + results[1]["score"]) / 2
    results = _detect(client, saved_winclip_dir, references[:1], queries, between)[3]
    assert [r["verdict"] for r in results] == ["pass (uncalibrated)", "fail (uncalibrated)"]
    # its bank has no calibration, and uploaded again it says so
    assert ReferenceBank.load(bank).calibration is None
    assert "saved without a calibration" in _detect(client, saved_winclip_dir, [], queries, bank=bank)[2]
    # a defective reference cannot stand in for the missing normal scores: the note says it was not used
    decision = _detect(client, saved_winclip_dir, references[:1], queries, defects=queries[1:])[2]
    assert "Not calibrated" in decision and "defective images given to calibrate were not used" in decision


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


def test_examples_show_normal_references_and_queries_from_toy_and_elpv(tmp_path):
    from hf_fsad.data import load_benchmark
    from hf_fsad.data.toy import toy_records

    (toy,) = space.toy_examples(tmp_path)
    (elpv,) = space.elpv_examples(tmp_path)  # the elpv extra is part of `make install`
    sizes = [(len(set(references)), len(queries)) for references, _, queries in (toy, elpv)]
    assert sizes == [(4, 2), (2, 1)]
    assert (toy[1], elpv[1]) == ("fabric", "solar cell")

    # The toy example is the generator's weave draw with seed 4: each file found among its records by its
    # pixels, with the record's label (4 normal references, a normal and a defective query).
    records = toy_records("weave", num_train=4, num_test_good=1, num_test_anomalous=1, seed=4)
    rows = [{"image": r.image, "label": r.label, "mask": r.mask} for r in records["train"] + records["test"]]
    found = [_matching_row(path, rows) for path in [*toy[0], *toy[2]]]
    assert None not in found, "an example file is not one of the generator's images"
    assert [row["label"] for row in found] == [0, 0, 0, 0, 0, 1] and found[5]["mask"] is not None

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


def _toy_defect_files(folder: Path, num_train: int) -> dict[str, Path]:
    """Normal references, a defective reference with its mask and a defective query from one toy draw."""
    from hf_fsad.data.toy import toy_records

    records = toy_records("weave", num_train=num_train, num_test_good=1, num_test_anomalous=2, seed=6)
    images = {f"normal_{i}": record.image for i, record in enumerate(records["train"])}
    images |= {"defect": records["test"][1].image, "mask": records["test"][1].mask}
    images |= {"query": records["test"][2].image}
    folder.mkdir(parents=True, exist_ok=True)
    # the mask is named after its image: the Space pairs masks with images by file stem, as the CLI does
    paths = {name: folder / f"{'defect_mask' if name == 'mask' else name}.png" for name in images}
    for name, image in images.items():
        image.save(paths[name])
    return paths


def test_defective_references_report_their_miss_rate_at_the_false_alarm_threshold(
    client, saved_winclip_dir, tmp_path
):
    """WinCLIP does not keep defective references, so they are held out: under the default rule they do not
    move the thresholds (the conformal ones of the normals), they report the share of them missed."""
    files = _toy_defect_files(tmp_path, num_train=3)
    normals = [files[f"normal_{i}"] for i in range(3)]
    _, _, decision, results, _, bank = _detect(
        client, saved_winclip_dir, normals, [files["query"]], defects=[files["defect"]], masks=[files["mask"]]
    )
    model, pixels = _model_and_pixels(saved_winclip_dir)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 3 normals cannot reach 5%: describe() says so
        reference_bank = model.build_reference_bank(pixels(normals), "fabric")
        expected = model.calibrate(
            reference_bank, pixels(normals), anomalous_pixel_values=pixels([files["defect"]])
        ).calibration
        normals_only = model.calibrate(reference_bank, pixels(normals)).calibration
    calibration = ReferenceBank.load(bank).calibration
    assert (calibration.rule, calibration.pixel_rule, calibration.num_anomalous) == (
        "false_alarm_rate",
        "false_alarm_rate",
        1,
    )
    # the same forwards on the same pixels as the app's, maybe in other batches: a few float32 ulps (~1e-7
    # relative each), within rel 1e-6
    assert calibration.image_threshold == pytest.approx(normals_only.image_threshold, rel=1e-6)
    assert calibration.pixel_threshold == pytest.approx(normals_only.pixel_threshold, rel=1e-6)
    assert calibration.calibration_miss_rate == expected.calibration_miss_rate
    assert calibration.describe() in decision and "misses" in decision
    assert results[0]["verdict"] == ("fail" if results[0]["normalized_score"] > 0.5 else "pass")


def test_defective_references_reach_methods_that_learn_from_them_and_are_not_used_twice(client, tmp_path):
    """Anomalous memory keeps the defective references in its bank: they are not scored against it again,
    the threshold comes from the normals scored leave-one-out (each against the others and the defect)."""
    import numpy as np

    from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
    from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config
    from hf_fsad.visualization import mask_array

    torch.manual_seed(0)
    model = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=tiny_clip_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    model.save_pretrained(tmp_path / "memory")
    files = _toy_defect_files(tmp_path / "images", num_train=2)
    normals = [files["normal_0"], files["normal_1"]]
    _, _, decision, results, _, bank = _detect(
        client, str(tmp_path / "memory"), normals, [files["query"]], defects=[files["defect"]],
        masks=[files["mask"]], weight_search=False,
    )  # fmt: skip
    _, pixels = _model_and_pixels(str(tmp_path / "memory"))
    mask = torch.from_numpy(np.stack([mask_array(Image.open(files["mask"]), model.config.image_size)]))
    defects = {"anomalous_pixel_values": pixels([files["defect"]]), "anomalous_masks": mask}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # 2 normals cannot reach 5%: describe() says so
        expected_bank = model.calibrate(
            model.build_reference_bank(pixels(normals), "fabric", **defects),
            pixels(normals),
            bank_inputs=defects,
        )
        expected = model(pixels([files["query"]]), reference_bank=expected_bank)
    calibration = ReferenceBank.load(bank).calibration
    assert (calibration.rule, calibration.num_normal, calibration.num_anomalous) == ("false_alarm_rate", 2, 0)
    assert "defective references are in the bank" in decision
    # as above: the app's batch vs this one, float32 rounding ~1e-7 relative
    assert results[0]["score"] == pytest.approx(expected.image_scores.item(), rel=1e-5)
    assert calibration.image_threshold == pytest.approx(expected_bank.calibration.image_threshold, rel=1e-6)


def test_calibrated_heatmaps_share_a_scale_centred_on_the_pixel_threshold():
    from hf_fsad.calibration import Calibration

    calibration = Calibration(
        image_threshold=0.3, image_scale=0.01, rule="false_alarm_rate", normal_source="leave_one_out",
        num_normal=4, num_anomalous=0, target_false_alarm_rate=0.05, false_alarm_bound=0.2,
        calibration_false_alarm_rate=0.0, pixel_threshold=0.25, pixel_scale=0.002, pixel_rule="false_alarm_rate",
    )  # fmt: skip
    low, high = space.heatmap_range(calibration)
    # the ends are where the normalised map is 1% and 99%, the middle the pixel threshold
    levels = calibration.normalize_maps(torch.tensor([low, (low + high) / 2, high], dtype=torch.float32))
    # maps are float32: rounding the inputs (~2e-8) over the scale 0.002 moves the levels by < 1e-6
    assert levels.tolist() == pytest.approx([0.01, 0.5, 0.99], abs=1e-6)
    assert space.heatmap_range(None) is None


def test_a_method_that_keeps_its_references_in_its_weights_is_not_calibrated_and_the_page_says_so(
    client, toy, tmp_path
):
    """VTFusion is fitted on its normals, so none is left to score leave-one-out: raw scores, with the note."""
    from hf_fsad.models.vtfusion.configuration_vtfusion import VtFusionConfig
    from hf_fsad.models.vtfusion.modeling_vtfusion import VtFusionModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config

    references, _, queries = toy
    torch.manual_seed(0)
    config = VtFusionConfig(
        clip_config=tiny_clip_config(), feature_layers=[1, 2], fusion_channels=4, segmentation_channels=8
    )
    model = VtFusionModel(config).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    model.fit([Image.open(path).convert("RGB") for path in references[:2]], class_name="fabric", steps=1)
    model.save_pretrained(tmp_path / "vtfusion")
    _, _, decision, results, _, bank = _detect(client, str(tmp_path / "vtfusion"), [], queries)
    assert "Not calibrated" in decision and "keeps what it learnt from its normal images" in decision
    assert [r["normalized_score"] for r in results] == [None, None]
    assert [r["verdict"] for r in results] == [
        ("fail" if r["score"] > 0.5 else "pass") + " (uncalibrated)" for r in results
    ]
    assert ReferenceBank.load(bank).calibration is None


def test_masks_without_defective_references_are_refused(client, saved_winclip_dir, toy):
    references, _, queries = toy
    with pytest.raises(gradio_client.exceptions.AppError, match="Masks were uploaded without defective"):
        _detect(client, saved_winclip_dir, references, queries, masks=references[:1])


@pytest.mark.e2e
def test_a_real_browser_uploads_references_and_queries_and_sees_the_calibrated_verdicts(
    client, saved_winclip_dir, tmp_path
):
    """Headless Chromium (Debian's `chromium`; Playwright drives it, its own browser download is not used)
    fills the page with the toy example, clicks Detect and waits for the heatmaps and the decision: the good
    query passes and the defective one fails at the calibrated default. The screenshot goes to
    $HF_FSAD_SCREENSHOT when set (`make e2e` writes docs/space_screenshot.png)."""
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
        decision = page.locator("#decision")
        decision.get_by_text("Calibrated:").wait_for(timeout=30_000)
        # the decision table's rows, as the page shows them
        rows = [decision.locator("tr", has_text=Path(query).name).inner_text() for query in queries]
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot), full_page=True)
        browser.close()
    assert [row.split()[-1] for row in rows] == ["pass", "fail"]
    assert screenshot.stat().st_size > 10_000


def test_exact_copies_among_the_references_are_left_out_and_the_page_says_so(saved_winclip_dir, toy):
    """The same image uploaded twice would stay in its own leave-one-out bank: the copy is left out."""
    from hf_fsad.loading import load_method

    model = load_method(saved_winclip_dir).eval()
    references = space.read_images(toy[0], "Reference")
    bank, line = space.build_bank(model, [*references, references[0]], None, None, None)
    expected, _ = space.build_bank(model, references, None, None, None)
    assert bank.k == len(references) and bank.calibration == expected.calibration
    assert f"1 of the {len(references) + 1} reference images are exact copies of others" in line
