"""The evaluation runner: exact cells, manifests that replay, features encoded once, reruns that skip."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from hf_fsad.cli import main
from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import DatasetSpec, profile_models, results_markdown, run_benchmark
from hf_fsad.features import FeatureCache
from hf_fsad.metrics import image_auroc, pixel_aupro
from hf_fsad.visualization import mask_array
from model_tester import method_tester

TOY = {"num_train": 4, "num_test_good": 3, "num_test_anomalous": 3, "image_size": 96}
SPEC = DatasetSpec("toy", categories=["stripes"], options=TOY)


class CountingEncoder:
    """Counts the images a model encodes."""

    def __init__(self, model):
        self.count = 0
        self._encode = model.encode_images
        model.encode_images = self

    def __call__(self, pixel_values, *args):
        self.count += pixel_values.shape[0]
        return self._encode(pixel_values, *args)


def cell(results, **key):
    (found,) = [c for c in results["cells"] if all(c[name] == value for name, value in key.items())]
    return found


def test_cells_match_direct_scoring_and_features_are_encoded_once(make_winclip, tmp_path):
    model = make_winclip()
    encoder = CountingEncoder(model)
    results = run_benchmark(
        {"winclip": model}, [SPEC], ks=[0, 2], seeds=[0, 1], out_dir=tmp_path, title="toy (random)"
    )

    assert len(results["cells"]) == 3  # zero-shot once, k=2 for two seeds
    data = load_benchmark("toy", category="stripes", **TOY)
    references = {image_id for c in results["cells"] for image_id in c["reference_ids"]}
    assert encoder.count == data["test"].num_rows + len(references)
    assert results["feature_cache"]["misses"] == encoder.count
    assert results["feature_cache"]["hits"] > 0

    two_shot = cell(results, k=2, seed=0)
    train = data["train"]
    chosen = train.select([train["path"].index(i) for i in two_shot["reference_ids"]])
    processor = model.image_processor()
    pixels = lambda images: processor([im.convert("RGB") for im in images], return_tensors="pt").pixel_values
    with torch.no_grad():
        bank = model.build_reference_bank(pixels(chosen["image"]), class_name="textured surface")
        expected = model(pixels(data["test"]["image"]), reference_bank=bank)
    # the runner encodes in batches of its own size: float32 reduction order (~1e-7 rel), 1e-5 bound
    np.testing.assert_allclose(two_shot["image_scores"], expected.image_scores.numpy(), rtol=1e-5)
    labels = data["test"]["label"]
    # metrics of scores equal up to that rounding (no near-ties here): AUROC a few ulp, AUPRO within 1e-6
    assert two_shot["metrics"]["image_auroc"] == pytest.approx(
        image_auroc(labels, expected.image_scores.numpy())
    )
    masks = np.stack([mask_array(mask, 240) for mask in data["test"]["mask"]])
    assert two_shot["metrics"]["pixel_aupro"] == pytest.approx(
        pixel_aupro(masks, expected.anomaly_maps.numpy()), abs=1e-6
    )

    seeds = [tuple(cell(results, k=2, seed=s)["reference_ids"]) for s in (0, 1)]
    assert seeds[0] != seeds[1]
    table = (tmp_path / "results.md").read_text()
    assert table.startswith("# toy (random)") and "| winclip | 2 |" in table and "pixel_aupro" in table
    assert (tmp_path / "plots" / "roc_toy_stripes.png").is_file()
    assert (tmp_path / "plots" / "heatmaps_toy_stripes.png").is_file()


def test_rerun_skips_finished_cells_and_manifests_replay_exactly(make_winclip, tmp_path):
    first = run_benchmark({"winclip": make_winclip()}, [SPEC], ks=[2], seeds=[0, 1], out_dir=tmp_path)
    model = make_winclip()
    encoder = CountingEncoder(model)
    again = run_benchmark({"winclip": model}, [SPEC], ks=[2], seeds=[0, 1], out_dir=tmp_path)
    assert again["skipped_cells"] == 2 and encoder.count == 0
    assert again["cells"] == first["cells"]

    (tmp_path / "results.json").unlink()  # recompute every cell from the saved manifests and features
    replay = run_benchmark({"winclip": model}, [SPEC], ks=[2], seeds=[0, 1], out_dir=tmp_path)
    assert encoder.count == 0  # all features came from the on-disk cache
    for old, new in zip(first["cells"], replay["cells"]):
        assert new["reference_ids"] == old["reference_ids"]
        assert new["image_scores"] == old["image_scores"]


def test_a_rerun_on_changed_images_runs_the_cells_again_on_new_references(make_winclip, tmp_path):
    from test_data import make_folder_root, noise, save_image

    root = make_folder_root(tmp_path / "parts")
    spec = DatasetSpec("folder", str(root))
    model = make_winclip()
    first = run_benchmark({"winclip": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "run")
    manifest = tmp_path / "run" / "manifests" / "folder" / "bracket" / "k2-a0-seed0.json"
    assert json.loads(manifest.read_text())["data_id"] == first["cells"][0]["data_id"]
    save_image(root / "bracket" / "good" / "008.png", noise(8))  # one more normal: another split
    again = run_benchmark({"winclip": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "run")
    (cell,) = again["cells"]
    assert again["skipped_cells"] == 0 and cell["data_id"] != first["cells"][0]["data_id"]
    assert json.loads(manifest.read_text())["data_id"] == cell["data_id"]
    fresh = run_benchmark({"winclip": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "fresh")
    assert cell["num_test"] == fresh["cells"][0]["num_test"] == 5  # 3 defects + 2 of the 9 normals
    assert cell["reference_ids"] == fresh["cells"][0]["reference_ids"]  # drawn as a fresh run draws
    assert cell["image_scores"] == fresh["cells"][0]["image_scores"]
    unchanged = run_benchmark({"winclip": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "run")
    assert unchanged["skipped_cells"] == 1


def test_methods_sharing_a_backbone_share_features(make_winclip, tmp_path):
    plain, cooler = make_winclip(), make_winclip(temperature=0.05)
    assert plain.feature_key() == cooler.feature_key()
    encoder = CountingEncoder(cooler)
    results = run_benchmark({"plain": plain, "cooler": cooler}, [SPEC], ks=[0], seeds=[0], out_dir=tmp_path)
    assert encoder.count == 0
    scores = [cell(results, method=m)["image_scores"] for m in ("plain", "cooler")]
    assert scores[0] != scores[1]


def test_pixel_metrics_are_left_out_without_masks():
    metrics = {"image_auroc": 0.8, "image_auprc": 0.7, "image_f1_max": 0.6}
    metrics |= {name: None for name in ("pixel_auroc", "pixel_auprc", "pixel_f1_max", "pixel_aupro")}
    cells = [
        {"method": "m", "dataset": "elpv", "category": c, "k": 2, "seed": s, "metrics": metrics}
        for c in ("mono", "poly")
        for s in (0, 1)
    ]
    table = results_markdown(
        {"cells": cells, "feature_cache": {"hits": 3, "misses": 1, "hit_rate": 0.75}, "wall_seconds": 5}
    )
    assert "| m | 2 | 80.0 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 |" in table
    assert "pixel" not in table.split("Metrics")[0].replace("pixel_auroc per category", "")
    assert "hit rate 75.0 %" in table


def test_feature_cache_in_memory_counts(make_winclip):
    model, cache = make_winclip(), FeatureCache()
    data = load_benchmark("toy", category="grid", **TOY)["test"]
    first = cache.features(model, data, [0, 1])
    assert (cache.hits, cache.misses) == (0, 2)
    second = cache.features(model, data, [1, 2])
    assert (cache.hits, cache.misses) == (1, 3)
    # a cache hit returns the stored tensor: exact
    torch.testing.assert_close(first["patch_tokens"][1], second["patch_tokens"][0], rtol=0, atol=0)
    with pytest.raises(ValueError, match="No images to encode"):
        cache.features(model, data, [])


def test_features_cached_under_another_image_reading_rule_are_encoded_again(
    make_winclip, tmp_path, monkeypatch
):
    import hf_fsad.features

    model, data = make_winclip(), load_benchmark("toy", category="grid", **TOY)["test"]
    monkeypatch.setattr(hf_fsad.features, "IMAGE_READING_RULE", 1)
    FeatureCache(tmp_path).features(model, data, [0])
    monkeypatch.undo()
    cache = FeatureCache(tmp_path)
    cache.features(model, data, [0])
    assert (cache.hits, cache.misses) == (0, 1)  # the rule-1 features on disk are not served
    again = FeatureCache(tmp_path)
    again.features(model, data, [0])
    assert (again.hits, again.misses) == (1, 0)


@pytest.mark.parametrize("method", ["winclip", "anomalous_memory", "metacan", "vtfusion"])
def test_profile_writes_latency_memory_and_k_scaling(tmp_path, method):
    model = method_tester(method).tiny_model()
    images = load_benchmark("toy", category="weave", **TOY)["test"]["image"]
    (row,) = profile_models(
        {method: model}, images, tmp_path, ks=(2, 8), batch_sizes=(1, 2), repeats=1, fit_steps=1
    )
    assert set(row.per_image_seconds) == set(row.bare_forward_seconds) == {1, 2}
    for size in (1, 2):
        # float64 ratios of the same measured numbers: a few ulp, inside approx's default rel 1e-6
        assert row.images_per_second[size] == pytest.approx(1 / row.per_image_seconds[size])
        assert row.bare_forward_multiple(size) == pytest.approx(
            row.per_image_seconds[size] / row.bare_forward_seconds[size]
        )
    assert row.text_setup_seconds > 0
    assert row.work_multiple() == pytest.approx(row.flops_per_image / row.bare_forward_flops)
    # Every method runs the whole tower once; windows hold several times an image's tokens.
    assert row.flops_per_image > row.bare_forward_flops
    assert (row.work_multiple() > 3) == bool(getattr(model.config, "window_scales", None))
    if model.saves_its_references:  # fitted on the 2 references; its bank is its prototypes, whatever k
        assert row.fit_seconds > 0 and row.fit_steps == 1 and row.k_scaling is None
        assert row.reference_seconds is None
    else:
        assert row.fit_seconds is None and set(row.k_scaling) == {2, 8} and row.reference_seconds > 0
    assert json.loads((tmp_path / "profile.json").read_text())[0]["method"] == method
    assert f"| {method} |" in (tmp_path / "profile.md").read_text()
    assert (tmp_path / "profile.png").is_file()


def test_profile_times_k_scaling_on_banks_of_k_and_keeps_the_largest_batchs_peak(tmp_path, monkeypatch):
    """k_scaling[k] times a query against a bank of k references, and the row's peak memory is the one
    measured while the largest batch was timed (the memory probe replaced by one reporting 10, 20, ... MB)."""
    from hf_fsad.evaluation import profiling

    scored_ks = []
    scorer = profiling._scorer

    def recording_scorer(model, pixel_values, bank):
        scored_ks.append(bank.k)
        return scorer(model, pixel_values, bank)

    class NumberedPeaks:
        blocks = 0

        def __init__(self, device):
            NumberedPeaks.blocks += 1
            self.peak_mb = 10.0 * NumberedPeaks.blocks

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            pass

    monkeypatch.setattr(profiling, "_scorer", recording_scorer)
    monkeypatch.setattr(profiling, "_PeakMemory", NumberedPeaks)
    images = load_benchmark("toy", category="weave", **TOY)["test"]["image"]
    (row,) = profile_models(
        {"winclip": method_tester("winclip").tiny_model()}, images, tmp_path, ks=(2, 8), batch_sizes=(2, 1),
        repeats=1,
    )  # fmt: skip
    # batch sizes 1 then 2 (timed, with the 2-reference bank), a flop count, then one bank per k
    assert scored_ks == [2, 2, 2, 2, 8] and set(row.k_scaling) == {2, 8}
    assert NumberedPeaks.blocks == 2 and row.peak_memory_mb == 20.0


@pytest.mark.parametrize(
    "device",
    [
        "cpu",
        pytest.param(
            "cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
        ),
    ],
)
def test_peak_memory_is_the_growth_a_known_allocation_causes(device):
    """128 MiB allocated, filled and freed inside the block: the peak is that growth, not the process's size
    nor what is left at the end. On CPU it is the resident set's high-water mark, which the process's other
    allocations and frees meanwhile move by a few MiB: 16 MiB slack."""
    from hf_fsad.evaluation.profiling import _PeakMemory

    size_mb = 128
    with _PeakMemory(torch.device(device)) as memory:
        block = torch.ones(size_mb * 2**20, dtype=torch.uint8, device=device)
        del block
    assert abs(memory.peak_mb - size_mb) < 16


def test_peak_memory_samples_the_resident_size_where_its_high_water_mark_cannot_be_reset(monkeypatch):
    """The fallback sampler (every 5 ms) sees a block held for 1 s: 200 of its intervals, so it is measured
    even when the sampling thread waits long for a core."""
    import time

    from hf_fsad.evaluation.profiling import _PeakMemory

    monkeypatch.setattr(_PeakMemory, "_reset_high_water_mark", staticmethod(lambda: False))
    size_mb = 128
    with _PeakMemory(torch.device("cpu")) as memory:
        block = torch.ones(size_mb * 2**20, dtype=torch.uint8)
        time.sleep(1.0)
        del block
    assert memory._sampler is not None and abs(memory.peak_mb - size_mb) < 16


def test_cli_benchmark_with_a_fresh_method_on_a_clip(tiny_clip_dir, tmp_path, capsys):
    status = main(
        [
            "benchmark",
            "--methods",
            f"w=winclip@{tiny_clip_dir}",
            "--datasets",
            "toy::grid",
            "--k",
            "0",
            "--seeds",
            "0",
            "--out",
            str(tmp_path),
        ]
    )
    assert status == 0
    assert "1 cells (0 already done)" in capsys.readouterr().out
    scored = cell(json.loads((tmp_path / "results.json").read_text()), method="w")
    assert scored["category"] == "grid"
    # The same scores as the method built from that CLIP scoring toy grid zero-shot, directly.
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel

    model = WinClipModel.from_clip(tiny_clip_dir)
    test = load_benchmark("toy", category="grid")["test"]
    pixels = model.image_processor()([image.convert("RGB") for image in test["image"]], return_tensors="pt")
    with torch.no_grad():
        bank = model.build_reference_bank(class_name="textured surface")
        expected = model(pixels.pixel_values, reference_bank=bank).image_scores
    # rtol 1e-5: the runner encodes in batches of its own size, and float32 kernels may round a batch of
    # another size differently (by ~1e-7 relative; equal here)
    np.testing.assert_allclose(scored["image_scores"], expected.numpy(), rtol=1e-5)


def test_dataset_spec_parsing():
    assert DatasetSpec.parse("elpv") == DatasetSpec("elpv")
    assert DatasetSpec.parse("mvtec_ad:/data/mvtec:screw") == DatasetSpec(
        "mvtec_ad", "/data/mvtec", ["screw"]
    )
    assert DatasetSpec.from_entry("mvtec_ad:/data/mvtec:screw") == DatasetSpec(
        "mvtec_ad", "/data/mvtec", ["screw"]
    )
    entry = {"name": "toy", "categories": ["weave"], "options": {"seed": 1}}
    assert DatasetSpec.from_entry(entry) == DatasetSpec("toy", None, ["weave"], {"seed": 1})


def test_cells_come_in_the_order_they_run_and_keep_their_ids():
    from types import SimpleNamespace

    from hf_fsad.evaluation import Cell
    from hf_fsad.evaluation.runner import _cells

    models = {
        "winclip": SimpleNamespace(needs_anomalous_references=False),
        "memory": SimpleNamespace(needs_anomalous_references=True),
    }
    split = SimpleNamespace(dataset="toy", category="grid")
    cells = list(_cells(models, split, ks=[0, 1], seeds=[0, 1], anomalous_shots=(0, 1)))
    # zero-shot runs one seed; a method needing anomalous references runs the shots > 0 only, others 0
    assert [(c.method, c.k, c.anomalous, c.seed) for c in cells] == [
        ("winclip", 0, 0, 0),
        ("winclip", 1, 0, 0),
        ("winclip", 1, 0, 1),
        ("memory", 0, 1, 0),
        ("memory", 0, 1, 1),
        ("memory", 1, 1, 0),
        ("memory", 1, 1, 1),
    ]
    assert cells[1] == Cell("winclip", "toy", "grid", k=1, seed=0, anomalous=0)
    assert cells[1].id == "winclip|toy|grid|1|0|0"
    assert list(cells[1].record) == ["method", "dataset", "category", "k", "seed", "anomalous"]


def test_the_class_words_moved_to_the_data_layer_and_the_old_names_warn():
    import hf_fsad.evaluation
    from hf_fsad.data import class_name_for

    with pytest.warns(DeprecationWarning, match=r"hf_fsad\.data\.class_name_for"):
        assert hf_fsad.evaluation.class_name_for is class_name_for
    with pytest.warns(DeprecationWarning, match=r"`hf_fsad\.evaluation\.CLASS_NAMES` is deprecated"):
        class_names = hf_fsad.evaluation.CLASS_NAMES
    assert class_names == {
        "elpv": "solar cell",
        "headct": "head CT scan",
        "brainmri": "brain MRI scan",
        "aitex": "fabric",
        "ksdd": "metal surface",
        "sdd": "metal surface",
        "afid": "fabric",
        "btad": "industrial product",
        "dagm": "textured surface",
        "dtd_synthetic": "texture",
        "oct2017": "retinal OCT scan",
        "resc": "retinal OCT scan",
        "br35h": "brain MRI scan",
        "isic": "skin",
        "clinicdb": "colon",
        "colondb": "colon",
        "kvasir": "colon",
        "mnist": "handwritten digit",
        "sklearn_digits": "handwritten digit",
        "toy": "textured surface",
    }


def test_cross_dataset_rows_are_labelled(make_winclip, tmp_path):
    model = make_winclip()
    model.config.trained_on = "mvtec_ad"
    results = run_benchmark({"winclip": model}, [SPEC], ks=[0], seeds=[0], out_dir=tmp_path)
    assert results["cells"][0]["trained_on"] == "mvtec_ad"
    assert "| winclip (trained on mvtec_ad) | 0 |" in (tmp_path / "results.md").read_text()


def test_anomalous_sample_protocol_compares_methods_on_one_test_set(make_winclip, tmp_path):
    from hf_fsad.evaluation import Protocol
    from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
    from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config

    winclip = make_winclip()
    anomalous = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=tiny_clip_config())).eval()
    anomalous.tokenizer = byte_level_clip_tokenizer()
    anomalous.backbone.load_state_dict(winclip.backbone.state_dict())
    protocol = Protocol(anomalous_shots=(0, 1), num_validation=1, max_test=4)
    spec = DatasetSpec("toy", categories=["grid"], options=TOY)
    results = run_benchmark(
        {"winclip": winclip, "memory": anomalous},
        [spec],
        ks=[0, 1],
        seeds=[0, 1],
        out_dir=tmp_path,
        protocol=protocol,
    )
    keys = sorted((c["method"], c["k"], c["anomalous"], c["seed"]) for c in results["cells"])
    assert keys == [
        ("memory", 0, 1, 0),
        ("memory", 0, 1, 1),
        ("memory", 1, 1, 0),
        ("memory", 1, 1, 1),
        ("winclip", 0, 0, 0),
        ("winclip", 1, 0, 0),
        ("winclip", 1, 0, 1),
    ]
    for seed in (0, 1):
        seed_cells = [c for c in results["cells"] if c["seed"] == seed]
        assert {c["num_test"] for c in seed_cells} == {4}
        anomalous_ids = {tuple(c["anomalous_ids"]) for c in seed_cells if c["method"] == "memory"}
        assert len(anomalous_ids) == 1 and len(next(iter(anomalous_ids))) == 1
    memory_cell = cell(results, method="memory", k=0, seed=0)
    assert 0.0 <= memory_cell["validation_auroc"] <= 1.0
    assert cell(results, method="winclip", k=1, seed=0)["validation_auroc"] is None
    assert "| memory | 0 + 1 anomalous |" in (tmp_path / "results.md").read_text()


def test_a_failing_cell_is_reported_and_the_others_run(make_winclip, tmp_path, caplog):
    model = make_winclip()
    build = model.build_reference_bank

    def failing_with_references(*args, reference_features=None, **kwargs):
        if reference_features is not None:
            raise RuntimeError("forced failure | for the test")
        return build(*args, **kwargs)

    model.build_reference_bank = failing_with_references
    results = run_benchmark({"winclip": model}, [SPEC], ks=[0, 1], seeds=[0, 1], out_dir=tmp_path)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["cells"] == results["cells"] and len(saved["cells"]) == 3
    zero_shot = cell(saved, k=0)
    assert "error" not in zero_shot and 0 <= zero_shot["metrics"]["image_auroc"] <= 1
    for seed in (0, 1):
        failed = cell(saved, k=1, seed=seed)
        assert failed["error"] == "RuntimeError: forced failure | for the test" and "metrics" not in failed
    logged = [r.getMessage() for r in caplog.records if r.name == "hf_fsad.evaluation.runner"]
    assert logged == [f"cell winclip|toy|stripes|1|{seed}|0 failed: {failed['error']}" for seed in (0, 1)]
    markdown = (tmp_path / "results.md").read_text()
    assert "| winclip | 0 |" in markdown and "| winclip | 1 |" not in markdown
    assert "| winclip | toy | stripes | 1 | 1 | RuntimeError: forced failure \\| for the test |" in markdown
    from hf_fsad.hub import eval_results

    assert {entry.dataset_config for entry in eval_results(saved, "winclip")} == {"0-shot"}

    model.build_reference_bank = (
        build  # fixed: a rerun runs the failed cells again and skips the finished one
    )
    rerun = run_benchmark({"winclip": model}, [SPEC], ks=[0, 1], seeds=[0, 1], out_dir=tmp_path)
    assert rerun["skipped_cells"] == 1 and not any("error" in c for c in rerun["cells"])
    assert "Failed cells" not in (tmp_path / "results.md").read_text()


def test_image_level_methods_get_image_metrics_only(tmp_path):
    from test_metacan import MetaCanModelTester

    models = {
        "metacan": MetaCanModelTester.tiny_model(),
        "no_maps": MetaCanModelTester.tiny_model(use_detector=False),
    }
    results = run_benchmark(models, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path)
    with_maps, without = cell(results, method="metacan"), cell(results, method="no_maps")
    assert without["metrics"]["pixel_auroc"] is None and without["metrics"]["image_auroc"] is not None
    assert with_maps["metrics"]["pixel_auroc"] is not None


def test_alternating_medians_interleave_calls_and_time_only_after_the_warm_up(monkeypatch):
    from hf_fsad.evaluation import profiling

    clock, calls = [0.0], []
    monkeypatch.setattr(profiling.time, "perf_counter", lambda: clock[0])

    def advancing(name: str, seconds: list[float]):
        def call():
            calls.append(name)
            clock[0] += seconds.pop(0)

        return call

    medians = profiling.alternating_medians(
        {"slow": advancing("slow", [100.0, 3.0, 5.0, 4.0]), "fast": advancing("fast", [50.0, 1.0, 2.0, 9.0])},
        repeats=3,
        before={"fast": lambda: calls.append("before fast")},
    )
    assert calls == ["slow", "before fast", "fast"] * 4  # one warm-up round, then three timed rounds
    assert medians == {"slow": 4.0, "fast": 2.0}  # the warm-up's 100 s and 50 s are not counted
    single = profiling.median_seconds(advancing("one", [7.0]), repeats=1, warm_up=False)
    assert single == 7.0


def test_matmul_flops_counts_products_by_hand_including_fused_attention():
    from hf_fsad.evaluation import matmul_flops

    linear = torch.nn.Linear(3, 4, bias=False)
    assert matmul_flops(lambda: linear(torch.ones(2, 3))) == 2 * 2 * 3 * 4
    query, key = torch.ones(1, 2, 5, 8), torch.ones(1, 2, 7, 8)
    # two products per head: scores (5x8 @ 8x7) and scores @ values (5x7 @ 7x8)
    attention = torch.nn.functional.scaled_dot_product_attention
    assert matmul_flops(lambda: attention(query, key, key)) == 2 * (2 * 2 * 5 * 7 * 8)
    heads = torch.nn.MultiheadAttention(8, 2, batch_first=True).eval()
    tokens = torch.ones(1, 5, 8)
    with torch.no_grad():  # where PyTorch would take its fused fast path
        flops = matmul_flops(lambda: heads(tokens, tokens, tokens, need_weights=False))
    projections = 4 * (2 * 5 * 8 * 8)  # q, k, v in; out
    assert flops == projections + 2 * (2 * 2 * 5 * 5 * 4)
    assert torch.backends.mha.get_fastpath_enabled()  # restored


def _rectangle_image(width: int, height: int, box: tuple[int, int, int, int] | None, seed: int = 0):
    """A non-square noise image with a bright rectangle and the rectangle as its mask (no box: a normal
    image, mask None)."""
    from PIL import Image, ImageDraw

    pixels = np.random.default_rng(seed).integers(0, 90, size=(height, width, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    if box is None:
        return image, None
    ImageDraw.Draw(image).rectangle(box, fill=(255, 255, 255))
    mask = Image.new("L", (width, height), 0)
    ImageDraw.Draw(mask).rectangle(box, fill=255)
    return image, mask


def test_crop_and_squash_preprocess_a_non_square_image_as_pil_does_and_masks_follow(make_winclip):
    from PIL import Image

    model = make_winclip()
    image, mask = _rectangle_image(300, 200, (20, 40, 110, 150))
    mean, std = np.asarray(model.config.image_mean), np.asarray(model.config.image_std)

    def normalised(pil):
        return ((np.asarray(pil, dtype=np.float64) / 255 - mean) / std).transpose(2, 0, 1)

    # crop: short side 200 -> 240 (the long side 300 -> 360), then the centre 240 columns (60..300)
    by_hand = normalised(image.resize((360, 240), Image.Resampling.BICUBIC).crop((60, 0, 300, 240)))
    cropped = model.image_processor(crop=True)(image, return_tensors="pt").pixel_values[0].numpy()
    np.testing.assert_allclose(cropped, by_hand, atol=1e-5)  # float32 normalisation vs float64
    squashed = model.image_processor()(image, return_tensors="pt").pixel_values[0].numpy()
    # as above: float32 normalisation of values within [-2, 3] (ulp 2.4e-7) vs float64
    np.testing.assert_allclose(
        squashed, normalised(image.resize((240, 240), Image.Resampling.BICUBIC)), atol=1e-5
    )
    assert np.abs(cropped - squashed).max() > 1  # the two geometries see different pixels

    hand_mask = np.asarray(mask.resize((360, 240), Image.Resampling.NEAREST).crop((60, 0, 300, 240))) > 127
    np.testing.assert_array_equal(mask_array(mask, 240, crop=True), hand_mask)
    np.testing.assert_array_equal(
        mask_array(mask, 240), np.asarray(mask.resize((240, 240), Image.Resampling.NEAREST)) > 127
    )
    # The mask marks the pixels where the processed image shows the rectangle (off by at most the one-pixel
    # band bicubic blurs at its edges), under either geometry; the other geometry's mask does not.
    for crop, other in ((True, False), (False, True)):
        processed = model.image_processor(crop=crop)(image, return_tensors="pt").pixel_values[0].numpy()
        bright = (processed.transpose(1, 2, 0) * std + mean).min(-1) > 0.6
        assert (bright != mask_array(mask, 240, crop)).sum() <= 2 * 240
        assert (bright != mask_array(mask, 240, other)).sum() > 10 * 240


def test_paper_preprocessing_is_per_method_and_the_saved_processor_squashes(make_winclip, tmp_path):
    from transformers import AutoImageProcessor

    from hf_fsad.models.afclip.configuration_afclip import AfClipConfig
    from hf_fsad.testing import tiny_clip_config

    model = make_winclip()
    assert model.config.paper_preprocessing == "crop" and model.paper_image_processor().do_center_crop
    assert AfClipConfig(clip_config=tiny_clip_config()).paper_preprocessing == "squash"
    model.save_pretrained(tmp_path)
    saved = AutoImageProcessor.from_pretrained(tmp_path)
    assert not saved.do_center_crop and saved.size == {"height": 240, "width": 240}
    with pytest.raises(ValueError, match="paper_preprocessing"):
        make_winclip(paper_preprocessing="pad")


def test_benchmark_crops_images_and_masks_of_non_square_data_alike(make_winclip, tmp_path, monkeypatch):
    """A crop method's cell scores the centre-cropped images against masks cropped the same way."""
    from datasets import ClassLabel, Dataset, DatasetDict, Features, Image, Value

    from hf_fsad.evaluation import runner
    from hf_fsad.metrics import pixel_auroc

    rows = {"image": [], "mask": [], "label": [], "category": [], "defect_type": [], "path": []}
    for index, box in enumerate([None, None, (10, 60, 100, 140), (240, 30, 330, 90)]):
        image, mask = _rectangle_image(360, 200, box, seed=index)
        rows["image"].append(image)
        rows["mask"].append(mask)
        rows["label"].append(int(box is not None))
        rows["category"].append("wide")
        rows["defect_type"].append("good" if box is None else "bright")
        rows["path"].append(f"wide/{index}.png")
    features = Features(
        {"image": Image(), "mask": Image(), "label": ClassLabel(names=["good", "anomaly"]),
         "category": Value("string"), "defect_type": Value("string"), "path": Value("string")}
    )  # fmt: skip
    test = Dataset.from_dict(rows, features=features)
    monkeypatch.setattr(runner, "load_benchmark", lambda *args, **kwargs: DatasetDict(train=test, test=test))
    model = make_winclip()
    results = run_benchmark({"winclip": model}, [DatasetSpec("wide")], ks=[0], seeds=[0], out_dir=tmp_path)

    pixels = model.image_processor(crop=True)(
        [im.convert("RGB") for im in test["image"]], return_tensors="pt"
    )
    with torch.no_grad():
        bank = model.build_reference_bank(class_name="wide")  # zero-shot, the runner's class word
        maps = model(pixels.pixel_values, reference_bank=bank).anomaly_maps.numpy()
    cropped = np.stack([mask_array(m, 240, crop=True) for m in test["mask"]])
    squashed = np.stack([mask_array(m, 240) for m in test["mask"]])
    value = cell(results, k=0)["metrics"]["pixel_auroc"]
    assert value == pytest.approx(pixel_auroc(cropped, maps), abs=1e-9)  # the same numbers, one summation
    assert abs(pixel_auroc(squashed, maps) - value) > 1e-3  # squashed masks would have scored otherwise


def test_cells_record_decisions_at_their_calibrated_threshold(make_winclip, tmp_path):
    from hf_fsad.evaluation import Protocol

    model = make_winclip()
    # 3 references: 3 leave-one-out normals reach the 25 % rate (rank ceil(4 x 0.75) = 3, bound 1/4)
    protocol = Protocol(false_alarm_rate=0.25)
    results = run_benchmark(
        {"winclip": model}, [SPEC], ks=[0, 1, 3], seeds=[0], out_dir=tmp_path, protocol=protocol
    )

    calibrated = cell(results, k=3)
    calibration = calibrated["calibration"]
    assert calibration["normal_source"] == "leave_one_out" and calibration["num_normal"] == 3
    assert calibrated["false_alarm_bound"] == calibration["false_alarm_bound"] == 0.25
    assert calibrated["target_false_alarm_rate"] == 0.25 and calibrated["calibration_note"] is None
    # The runner's threshold is the one model.calibrate gives the cell's references directly.
    data = load_benchmark("toy", category="stripes", **TOY)
    train = data["train"]
    chosen = train.select([train["path"].index(i) for i in calibrated["reference_ids"]])
    pixels = model.image_processor()([im.convert("RGB") for im in chosen["image"]], return_tensors="pt")
    with torch.no_grad():
        bank = model.build_reference_bank(pixels.pixel_values, class_name="textured surface")
        direct = model.calibrate(bank, pixels.pixel_values, false_alarm_rate=0.25).calibration
    # features encoded in the runner's batches vs all at once: float32 rounding (~1e-7 rel), 1e-5 bound
    assert calibration["image_threshold"] == pytest.approx(direct.image_threshold, rel=1e-5)

    # F1, false-alarm and miss rates of the saved scores at the stored threshold, by hand: exact
    scores, labels = calibrated["image_scores"], data["test"]["label"]
    flagged = [score > calibration["image_threshold"] for score in scores]
    pairs = list(zip(flagged, labels))
    true_positives, false_positives = pairs.count((True, 1)), pairs.count((True, 0))
    misses, normals = pairs.count((False, 1)), labels.count(0)
    assert calibrated["calibrated_f1"] == 2 * true_positives / (2 * true_positives + false_positives + misses)
    assert calibrated["false_alarm_rate"] == false_positives / normals
    assert calibrated["miss_rate"] == misses / labels.count(1)

    for k in (0, 1):
        reason = f"leave-one-out needs at least 2 reference images, got {k}"
        uncalibrated = cell(results, k=k)
        assert uncalibrated["calibration"] is None
        assert (
            uncalibrated["calibration_note"]
            == f"{reason}, and no validation normals (Protocol.num_validation, --validation)"
        )
        assert uncalibrated["calibrated_f1"] is uncalibrated["false_alarm_rate"] is None
        assert uncalibrated["metrics"]["image_auroc"] is not None  # the threshold-free metrics stay

    table = (tmp_path / "results.md").read_text()
    assert (
        "| method | k | image_auroc | calibrated_f1 | false_alarm_rate | false_alarm_bound | image_auprc |"
        in table
    )
    f1, far = 100 * calibrated["calibrated_f1"], 100 * calibrated["false_alarm_rate"]
    assert (
        f"| winclip | 3 | {100 * calibrated['metrics']['image_auroc']:.1f} | {f1:.1f} | {far:.1f} | 25.0 |"
        in table
    )
    assert "| winclip | 1 | " in table and "conformal threshold for a false-alarm rate of 25.0%" in table
    assert "set on the k references scored leave-one-out (banks of k - 1 references)" in table
    assert "- winclip k=1 (not calibrated): leave-one-out needs at least 2 reference images, got 1" in table


def test_validation_normals_calibrate_what_leave_one_out_cannot(make_winclip, tmp_path):
    from hf_fsad.evaluation import Protocol

    protocol = Protocol(num_validation=2, false_alarm_rate=0.4)
    results = run_benchmark(
        {"winclip": make_winclip()}, [SPEC], ks=[0, 1], seeds=[0], out_dir=tmp_path, protocol=protocol
    )
    for k in (0, 1):  # zero-shot, and one reference
        calibrated = cell(results, k=k)
        calibration = calibrated["calibration"]
        assert calibration["normal_source"] == "held_out" and calibration["num_normal"] == 2
        # 2 held-out normals at 40 %: rank ceil(3 x 0.6) = 2, the higher one; the bound (2 - 2 + 1) / 3
        assert calibrated["false_alarm_bound"] == 1 / 3 and calibrated["calibration_note"] is None
    assert cell(results, k=0)["reference_ids"] == [] and len(cell(results, k=1)["reference_ids"]) == 1


def test_a_rerun_at_another_false_alarm_rate_recalibrates_from_the_cache(make_winclip, tmp_path):
    from hf_fsad.evaluation import Protocol

    first = run_benchmark({"winclip": make_winclip()}, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path)
    model = make_winclip()
    encoder = CountingEncoder(model)
    same = run_benchmark({"winclip": model}, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path)
    assert same["skipped_cells"] == 1 and same["cells"] == first["cells"]
    looser = run_benchmark(
        {"winclip": model},
        [SPEC],
        ks=[2],
        seeds=[0],
        out_dir=tmp_path,
        protocol=Protocol(false_alarm_rate=0.7),
    )
    assert looser["skipped_cells"] == 0 and encoder.count == 0  # recalibrated on the cached features
    (old,), (new,) = first["cells"], looser["cells"]
    assert new["image_scores"] == old["image_scores"]
    # 2 leave-one-out normals: at 5 % the higher one (rank ceil(3 x 0.95) = 3, capped at 2; bound 1/3), at
    # 70 % the lower one (rank ceil(3 x 0.3) = 1; bound 2/3)
    assert (old["target_false_alarm_rate"], new["target_false_alarm_rate"]) == (0.05, 0.7)
    assert (old["false_alarm_bound"], new["false_alarm_bound"]) == (1 / 3, 2 / 3)
    assert new["calibration"]["image_threshold"] < old["calibration"]["image_threshold"]


def test_decision_columns_average_categories_then_seeds():
    metrics = {"image_auroc": 0.8, "image_auprc": 0.7, "image_f1_max": 0.6}
    metrics |= {name: None for name in ("pixel_auroc", "pixel_auprc", "pixel_f1_max", "pixel_aupro")}
    calibration = {"target_false_alarm_rate": 0.05, "normal_source": "leave_one_out"}
    draws = [("mono", 0, 0.5, 0.1), ("poly", 0, 0.7, 0.3), ("mono", 1, 0.4, 0.0), ("poly", 1, 0.4, 0.0)]
    cells = [
        {"method": "m", "dataset": "elpv", "category": category, "k": 2, "seed": seed, "metrics": metrics,
         "calibration": calibration, "calibration_note": None, "calibrated_f1": f1, "false_alarm_rate": far,
         "false_alarm_bound": 1 / 3}
        for category, seed, f1, far in draws
    ]  # fmt: skip
    cache = {"hits": 3, "misses": 1, "hit_rate": 0.75}
    table = results_markdown({"cells": cells, "feature_cache": cache, "wall_seconds": 5})
    # F1 per seed: 0.6 and 0.4 -> 50.0 ± 14.1; false alarms 0.2 and 0.0 -> 10.0 ± 14.1; bound 33.3 each
    row = "| m | 2 | 80.0 ± 0.0 | 50.0 ± 14.1 | 10.0 ± 14.1 | 33.3 ± 0.0 | 70.0 ± 0.0 | 60.0 ± 0.0 |"
    assert row in table
    more_shots = [cell | {"k": 10} for cell in cells]
    table = results_markdown({"cells": more_shots + cells, "feature_cache": cache, "wall_seconds": 5})
    assert table.index("| m | 2 |") < table.index("| m | 10 |")  # rows in the order of k, not of its digits


def test_cli_benchmark_false_alarm_rate(saved_winclip_dir, tmp_path, capsys):
    arguments = ["benchmark", "--methods", f"w={saved_winclip_dir}", "--datasets", "toy::grid", "--k", "2"]
    arguments += ["--seeds", "0", "--out", str(tmp_path)]
    assert main([*arguments, "--false-alarm-rate", "1.5"]) == 2
    assert "false_alarm_rate must lie in (0, 1), got 1.5." in capsys.readouterr().err
    assert main([*arguments, "--false-alarm-rate", "0.7"]) == 0
    scored = cell(json.loads((tmp_path / "results.json").read_text()), method="w")
    # 2 leave-one-out normals at 70 %: the lower one (rank ceil(3 x 0.3) = 1), bound 2/3
    assert scored["target_false_alarm_rate"] == 0.7 and scored["false_alarm_bound"] == 2 / 3


def test_cli_benchmark_shows_its_progress_and_quiet_hides_it(saved_winclip_dir, tmp_path, capsys):
    arguments = ["benchmark", "--methods", f"w={saved_winclip_dir}", "--datasets", "toy::grid", "--k", "2"]
    arguments += ["--seeds", "0"]
    assert main([*arguments, "--out", str(tmp_path / "shown")]) == 0
    shown = capsys.readouterr().err
    assert "INFO hf_fsad.evaluation.runner: cell w|toy|grid|2|0|0: " in shown  # each finished cell
    assert "toy/grid: 100%" in shown  # the bar over the category's cells
    assert main(["--quiet", *arguments, "--out", str(tmp_path / "quiet")]) == 0
    quiet = capsys.readouterr().err
    assert "INFO" not in quiet and "toy/grid" not in quiet and "%|" not in quiet


class FlippedReferences:
    """A `ReferenceGenerator` that adds each normal reference flipped left to right."""

    count = 2

    def generate(self, normal_images, class_name, seed):
        return [image.transpose(0) for image in normal_images]  # PIL's FLIP_LEFT_RIGHT


def test_fitted_or_generated_reference_cells_calibrate_on_validation_normals_only(make_winclip, tmp_path):
    """Leave-one-out would be biased where the references shaped more than the bank: a model fitted on all of
    them (VTFusion) or references generated from all of them; held-out validation normals are not."""
    from hf_fsad.evaluation import Protocol
    from test_vtfusion import VtFusionModelTester

    def only_cell(model, out: str, **arguments) -> dict:
        results = run_benchmark(model, [SPEC], ks=[2], seeds=[0], out_dir=tmp_path / out, **arguments)
        (found,) = results["cells"]
        return found

    fitted = {"vtfusion": VtFusionModelTester.tiny_model()}
    fit = {"fit_arguments": {"steps": 1}}
    without = only_cell(fitted, "fitted", **fit)
    assert without["calibration"] is None and without["calibration_note"] == (
        "VtFusionModel keeps what it learnt from its normal images in its weights, so none can be left out (it "
        "would be refitted once per reference), and no validation normals (Protocol.num_validation, --validation)"
    )
    with_validation = only_cell(fitted, "validated", protocol=Protocol(num_validation=2), **fit)
    calibration = with_validation["calibration"]
    assert calibration["normal_source"] == "held_out" and calibration["num_normal"] == 2
    assert with_validation["calibrated_f1"] is not None and with_validation["false_alarm_bound"] == 1 / 3
    # 2 normals cannot reach 5 %: calibrate's warning is the cell's note, not a line per cell on the console
    assert with_validation["calibration_note"].startswith(
        "2 normal scores cannot guarantee a false-alarm rate of 5.0%: the threshold (their maximum)"
    )

    generated = only_cell({"winclip": make_winclip()}, "generated", generated_references=FlippedReferences())
    assert generated["generated_references"] == 2 and generated["calibration"] is None
    assert generated["calibration_note"].startswith(
        "2 of the references were generated from the others, so a left-out image's generated copies stay in "
        "the bank"
    )


def test_a_bank_with_anomalous_references_is_calibrated_leave_one_out_with_them(make_winclip, tmp_path):
    """The anomalous memory's leave-one-out banks hold the cell's anomalous reference too (`bank_inputs`;
    without one the memory builds no bank)."""
    from hf_fsad.data.sampling import select_ids
    from hf_fsad.evaluation import Protocol
    from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
    from hf_fsad.models.anomalous_memory.modeling_anomalous_memory import AnomalousMemoryModel
    from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config

    torch.manual_seed(0)
    model = AnomalousMemoryModel(AnomalousMemoryConfig(clip_config=tiny_clip_config())).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    protocol = Protocol(anomalous_shots=(1,), max_test=4, false_alarm_rate=0.4)
    spec = DatasetSpec("toy", categories=["grid"], options=TOY)
    results = run_benchmark({"memory": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path, protocol=protocol)
    (calibrated,) = results["cells"]
    assert calibrated["calibration"]["normal_source"] == "leave_one_out"

    data = load_benchmark("toy", category="grid", **TOY)
    processor = model.paper_image_processor()

    def pixels(split: str, ids: list[str]) -> torch.Tensor:
        images = select_ids(data[split], ids)["image"]
        return processor([image.convert("RGB") for image in images], return_tensors="pt").pixel_values

    references = pixels("train", calibrated["reference_ids"])
    (anomalous_id,) = calibrated["anomalous_ids"]
    mask = select_ids(data["test"], [anomalous_id])["mask"][0]
    anomalous = {
        "anomalous_pixel_values": pixels("test", [anomalous_id]),
        "anomalous_masks": torch.from_numpy(mask_array(mask, 240, crop=True))[None],
    }
    with torch.no_grad():
        bank = model.build_reference_bank(references, class_name="textured surface", **anomalous)
        direct = model.calibrate(bank, references, false_alarm_rate=0.4, bank_inputs=anomalous).calibration
    # features encoded in the runner's batches vs all at once: float32 rounding (~1e-7 rel), 1e-5 bound
    assert calibrated["calibration"]["image_threshold"] == pytest.approx(direct.image_threshold, rel=1e-5)


def test_cli_benchmark_on_your_own_folder(saved_winclip_dir, tmp_path, capsys):
    from test_data import make_folder_root

    root = make_folder_root(tmp_path / "parts", ("bracket", "plate"))
    shutil.rmtree(root / "plate" / "dent")  # every plate defect has a mask: pixel metrics there only
    arguments = ["benchmark", "--methods", f"w={saved_winclip_dir}", "--datasets", f"folder:{root}"]
    assert main([*arguments, "--k", "2", "--seeds", "0", "--out", str(tmp_path / "out")]) == 0
    assert "2 cells (0 already done)" in capsys.readouterr().out
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    assert sorted((c["dataset"], c["category"], c["k"]) for c in results["cells"]) == [
        ("folder", "bracket", 2),
        ("folder", "plate", 2),
    ]
    for category, num_test in (("bracket", 5), ("plate", 4)):
        scored = cell(results, category=category)
        data = load_benchmark("folder", root=root, category=category)
        assert set(scored["reference_ids"]) <= set(data["train"]["path"])
        assert len(scored["image_scores"]) == num_test == data["test"].num_rows
        assert scored["metrics"]["image_auroc"] == pytest.approx(
            image_auroc(data["test"]["label"], scored["image_scores"])
        )
    assert cell(results, category="bracket")["metrics"]["pixel_auroc"] is None  # dent/ has no masks
    assert 0 <= cell(results, category="plate")["metrics"]["pixel_auroc"] <= 1
    table = (tmp_path / "out" / "results.md").read_text()
    assert "## folder" in table and "| w | 2 |" in table
    assert (
        "| bracket | – |" in table.split("pixel_auroc per category:")[1]
    )  # no number from a masks-less category


def test_a_segmentation_set_of_anomalous_images_only_gets_pixel_metrics(make_winclip, tmp_path):
    from dataset_layouts import LAYOUT_WRITERS

    LAYOUT_WRITERS["isic"](tmp_path / "isic", ["isic"])
    spec = DatasetSpec("isic", root=str(tmp_path / "isic"))
    results = run_benchmark({"winclip": make_winclip()}, [spec], ks=[0], seeds=[0], out_dir=tmp_path / "out")
    (cell,) = results["cells"]
    assert cell.get("error") is None
    # every test image is anomalous: no image metric is defined; the pixel ones are
    assert [cell["metrics"][name] for name in ("image_auroc", "image_auprc", "image_f1_max")] == [None] * 3
    assert 0.0 <= cell["metrics"]["pixel_auroc"] <= 1.0
