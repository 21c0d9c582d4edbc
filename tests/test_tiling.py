"""Tiled scoring of large images: tile geometry, stitching, tiled banks (pooled and by position), tiled
calibration, defect regions, and a tiled bank's file."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from hf_fsad.bank import ReferenceBank
from hf_fsad.calibration import best_f1_threshold
from hf_fsad.deploy.regions import defect_regions
from hf_fsad.tiled_scoring import (
    build_tiled_bank,
    calibrate_tiled_bank,
    fit_tiled,
    resized_maps,
    score_tiled,
    tile_bank,
)
from hf_fsad.tiling import MapStitcher, TileBox, Tiling, tile_starts
from hf_fsad.visualization import mask_array
from model_tester import method_tester

EXACT = {"rtol": 0, "atol": 0}


@pytest.fixture(scope="module")
def winclip():
    return method_tester("winclip").tiny_model()


def textures(count: int, height: int, width: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8)) for _ in range(count)]


def side_by_side(left: Image.Image, right: Image.Image) -> Image.Image:
    image = Image.new("RGB", (left.width + right.width, left.height))
    image.paste(left, (0, 0))
    image.paste(right, (left.width, 0))
    return image


def pixels(model, images) -> torch.Tensor:
    return model.image_processor()(list(images), return_tensors="pt").pixel_values


# --- geometry -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("height", "width", "tile", "stride"),
    [(100, 70, 40, 25), (96, 96, 32, 32), (50, 90, (50, 40), (50, 20)), (33, 47, 10, 7), (40, 40, 40, 40)],
)
def test_boxes_cover_the_image_in_row_major_order_with_the_last_ones_flush(height, width, tile, stride):
    tiling = Tiling(tile, stride)
    boxes = tiling.boxes(height, width)
    covered = np.zeros((height, width), dtype=int)
    for box in boxes:
        assert (box.height, box.width) == tiling.tile_size
        assert 0 <= box.top and box.bottom <= height and 0 <= box.left and box.right <= width
        covered[box.top : box.bottom, box.left : box.right] += 1
    assert covered.min() >= 1
    assert boxes == sorted(boxes)  # row-major: by top, then left
    assert max(box.bottom for box in boxes) == height and max(box.right for box in boxes) == width
    # tops every stride, then one flush with the border
    assert tile_starts(100, 40, 25) == [0, 25, 50, 60]
    assert tile_starts(96, 32, 32) == [0, 32, 64]


def test_bad_tilings_are_refused_with_what_is_wrong():
    with pytest.raises(ValueError, match="tile_stride 300x300 is larger than tile_size 240x240.*gaps"):
        Tiling(240, 300)
    with pytest.raises(ValueError, match="tile_size 512x512 is larger than the 300x400 image"):
        Tiling(512).boxes(300, 400)
    with pytest.raises(ValueError, match="tile_size must be positive"):
        Tiling(0)
    with pytest.raises(ValueError, match=r"tile_size must be an int or a \(height, width\) pair"):
        Tiling((240, 240, 3))
    with pytest.raises(ValueError, match="mode must be one of"):
        Tiling(240, mode="random")
    with pytest.raises(ValueError, match="image_score must be one of"):
        Tiling(240, image_score="median")
    with pytest.raises(ValueError, match="image_size is recorded for position tiling only"):
        Tiling(240, image_size=(480, 480))
    position = Tiling(240, mode="position", image_size=(480, 720))
    with pytest.raises(ValueError, match="built on 480x720 images .* but the image is 480x480"):
        position.boxes(480, 480)
    assert Tiling(240).tile_stride == (240, 240)  # no stride: tiles side by side


# --- stitching ------------------------------------------------------------------------------------------


def test_stitching_averages_the_tiles_that_cover_each_pixel():
    # 2 x 5 image, 2 x 3 tiles every 2 columns: the tiles cover columns 0-2 and 2-4, overlapping in column 2
    boxes = Tiling((2, 3), (2, 2)).boxes(2, 5)
    assert boxes == [TileBox(0, 0, 2, 3), TileBox(0, 2, 2, 5)]
    stitcher = MapStitcher(2, 5, boxes)
    stitcher.add(boxes[0], torch.full((2, 3), 1.0))
    stitcher.add(boxes[1], torch.full((2, 3), 4.0))
    np.testing.assert_array_equal(stitcher.result(), [[1, 1, 2.5, 4, 4]] * 2)

    # 3 x 3 image, 2 x 2 tiles every pixel: the centre lies in all four tiles, edge centres in two, corners one
    boxes = Tiling(2, 1).boxes(3, 3)
    stitcher = MapStitcher(3, 3, boxes)
    for value, box in zip([1.0, 2.0, 3.0, 4.0], boxes):
        stitcher.add(box, torch.full((2, 2), value))
    expected = [[1, 1.5, 2], [2, 2.5, 3], [3, 3.5, 4]]
    np.testing.assert_array_equal(stitcher.result(), expected)


def test_constant_tile_maps_stitch_to_exactly_that_constant_without_seams():
    """Tile maps at the model's size, resized to tiles that overlap by different amounts (the flush last
    row and column overlap more): every pixel is exactly the constant, in float32."""
    value = np.float32(0.123456789)
    height, width = 100, 70
    boxes = Tiling(40, 25).boxes(height, width)
    stitcher = MapStitcher(height, width, boxes)
    for box in boxes:
        stitcher.add(box, resized_maps(torch.full((1, 15, 15), float(value)), box.height, box.width)[0])
    result = stitcher.result()
    assert result.dtype == np.float32
    assert (result == value).all()


def test_a_constant_image_scored_tiled_stitches_the_tiles_maps_by_their_overlap(winclip):
    """Every tile of a constant image is the same, so each has the same map m; the stitched map is, at each
    pixel, the mean of m at that pixel's offset in each covering tile, built here by plain accumulation."""
    image = Image.new("RGB", (150, 110), (120, 130, 140))
    tiling = Tiling(60, 40)
    bank = build_tiled_bank(winclip, textures(1, 60, 60), tiling, "tile")
    output = score_tiled(winclip, image, bank, batch_size=1)
    tile_map = resized_maps(
        winclip(
            pixels(winclip, [image.crop((0, 0, 60, 60))]), reference_bank=tile_bank(bank, 0)
        ).anomaly_maps,
        60,
        60,
    )[0].double()
    total, count = torch.zeros(110, 150, dtype=torch.float64), torch.zeros(110, 150, dtype=torch.float64)
    for box in tiling.boxes(110, 150):
        total[box.top : box.bottom, box.left : box.right] += tile_map
        count[box.top : box.bottom, box.left : box.right] += 1
    torch.testing.assert_close(output.anomaly_maps[0], (total / count).float(), **EXACT)


# --- a tile the size of the image is the untiled result --------------------------------------------------


def untiled_and_tiled(model, mode: str, anomalous: bool):
    """(untiled output resized to the image, tiled output) for a 200 x 260 query and a tile of that size."""
    height, width = 200, 260
    references = textures(2, height, width, seed=1)
    query = textures(1, height, width, seed=2)[0]
    tiling = Tiling((height, width), mode=mode)
    inputs, tiled_inputs = {}, {}
    if anomalous:
        defect = textures(1, height, width, seed=3)[0]
        mask = Image.new("L", (width, height), 0)
        mask.paste(255, (30, 40, 90, 100))
        inputs = {
            "anomalous_pixel_values": pixels(model, [defect]),
            "anomalous_masks": torch.from_numpy(mask_array(mask, model.config.image_size))[None],
        }
        tiled_inputs = {"anomalous_images": [defect], "anomalous_masks": [mask]}
    with torch.no_grad():
        bank = model.build_reference_bank(pixels(model, references), "tile", **inputs)
        untiled = model(pixels(model, [query]), reference_bank=bank)
    tiled = score_tiled(model, query, build_tiled_bank(model, references, tiling, "tile", **tiled_inputs))
    return untiled, tiled, (height, width)


@pytest.mark.parametrize("mode", ["pooled", "position"])
@pytest.mark.parametrize(
    ("model_type", "anomalous"),
    [("winclip", False), ("metacan", False), ("afclip", False), ("anomalous_memory", True)],
)
def test_a_tile_the_size_of_the_image_gives_exactly_the_untiled_result(model_type, anomalous, mode):
    model = method_tester(model_type).tiny_model()
    untiled, tiled, (height, width) = untiled_and_tiled(model, mode, anomalous)
    torch.testing.assert_close(tiled.image_scores, untiled.image_scores, **EXACT)
    assert set(tiled.branch_scores) == set(untiled.branch_scores)
    for name, value in untiled.branch_scores.items():
        torch.testing.assert_close(tiled.branch_scores[name], value, **EXACT)
    assert tiled.anomaly_maps.shape == (1, height, width)
    torch.testing.assert_close(tiled.anomaly_maps, resized_maps(untiled.anomaly_maps, height, width), **EXACT)


# --- position and pooled banks ---------------------------------------------------------------------------


def untiled_score(model, image, reference_features) -> torch.Tensor:
    with torch.no_grad():
        bank = model.build_reference_bank(class_name="tile", reference_features=reference_features)
        return model(pixels(model, [image]), reference_bank=bank)


def test_position_compares_a_tile_with_the_tile_at_its_place_and_pooled_with_every_tile(winclip):
    """Reference [A | B], query [B | A]. By position, the query's left tile B meets only A; pooled, it meets
    A and B and finds itself. Each is what the untiled model gives for that tile and those references."""
    tile_a, tile_b = textures(2, 120, 120, seed=4)
    reference, swapped = side_by_side(tile_a, tile_b), side_by_side(tile_b, tile_a)
    with torch.no_grad():
        features_a, features_b = (winclip.encode_images(pixels(winclip, [tile])) for tile in (tile_a, tile_b))
    both = {name: torch.cat([features_a[name], features_b[name]]) for name in features_a}
    scores = {}
    for mode in ("pooled", "position"):
        bank = build_tiled_bank(winclip, [reference], Tiling(120, mode=mode), "tile", batch_size=1)
        scores[mode] = score_tiled(winclip, swapped, bank, batch_size=1)
    # by position: B against A's bank, A against B's; the image score is the larger
    left, right = untiled_score(winclip, tile_b, features_a), untiled_score(winclip, tile_a, features_b)
    torch.testing.assert_close(
        scores["position"].image_scores, torch.maximum(left.image_scores, right.image_scores), **EXACT
    )
    torch.testing.assert_close(
        scores["position"].anomaly_maps[0, :, :120], resized_maps(left.anomaly_maps, 120, 120)[0], **EXACT
    )
    # pooled: both tiles against both references' tiles
    left, right = untiled_score(winclip, tile_b, both), untiled_score(winclip, tile_a, both)
    torch.testing.assert_close(
        scores["pooled"].image_scores, torch.maximum(left.image_scores, right.image_scores), **EXACT
    )
    torch.testing.assert_close(
        scores["pooled"].anomaly_maps[0, :, 120:], resized_maps(right.anomaly_maps, 120, 120)[0], **EXACT
    )
    # the pool holds each query tile itself, so its memory branch reads lower than against the other tile
    assert scores["pooled"].branch_scores["few_shot"] < scores["position"].branch_scores["few_shot"]


def test_a_query_equal_to_the_reference_scores_each_tile_as_the_untiled_identical_tile(winclip):
    tile_a, tile_b = textures(2, 120, 120, seed=5)
    reference = side_by_side(tile_a, tile_b)
    bank = build_tiled_bank(winclip, [reference], Tiling(120, mode="position"), "tile", batch_size=1)
    output = score_tiled(winclip, reference, bank, batch_size=1)
    expected = []
    for tile in (tile_a, tile_b):
        with torch.no_grad():
            expected.append(untiled_score(winclip, tile, winclip.encode_images(pixels(winclip, [tile]))))
    torch.testing.assert_close(
        output.image_scores, torch.maximum(*(e.image_scores for e in expected)), **EXACT
    )
    for index, untiled in enumerate(expected):
        columns = slice(120 * index, 120 * (index + 1))
        torch.testing.assert_close(
            output.anomaly_maps[0, :, columns], resized_maps(untiled.anomaly_maps, 120, 120)[0], **EXACT
        )


def test_a_position_bank_holds_one_bank_per_place_and_refuses_a_query_of_another_size(winclip):
    references = textures(2, 120, 240, seed=6)
    bank = build_tiled_bank(winclip, references, Tiling(120, mode="position"), "tile")
    assert bank.tiling.image_size == (120, 240) and bank.k == 2
    for position in (0, 1):
        assert tile_bank(bank, position).tensors["patch_tokens"].shape[0] == 2 * 225  # 2 references x 15 x 15
    with pytest.raises(ValueError, match=r"built on 120x240 images .* but the image is 120x360: .* resize"):
        score_tiled(winclip, textures(1, 120, 360)[0], bank)
    with pytest.raises(ValueError, match=r"references of one size, got \(height, width\)"):
        build_tiled_bank(winclip, [*references, textures(1, 120, 360)[0]], Tiling(120, mode="position"))
    with pytest.raises(ValueError, match="give reference images"):
        build_tiled_bank(winclip, None, Tiling(120, mode="position"))
    with pytest.raises(ValueError, match="This reference bank is tiled .*score_tiled"):
        winclip(pixels(winclip, references), reference_bank=bank)
    with pytest.raises(ValueError, match="not tiled"):
        score_tiled(winclip, references[0], winclip.build_reference_bank(class_name="tile"))


def test_scoring_streams_tiles_in_batches(winclip, monkeypatch):
    bank = build_tiled_bank(winclip, None, Tiling(60, 40), "tile")  # zero-shot: a bank of text alone
    batch_sizes = []
    encode = winclip.encode_images
    monkeypatch.setattr(
        winclip, "encode_images", lambda values, *a: batch_sizes.append(len(values)) or encode(values, *a)
    )
    score_tiled(winclip, textures(1, 140, 220)[0], bank, batch_size=4)
    assert batch_sizes == [4, 4, 4, 3]  # 3 rows x 5 columns of tiles


def test_anomalous_references_are_tiled_with_their_masks(monkeypatch):
    """An anomalous reference whose mask marks its left tile: the left tile becomes an anomalous reference
    with its mask tile, the right one a normal reference, as the untiled bank of those tiles."""
    model = method_tester("anomalous_memory").tiny_model()
    normal = textures(1, 120, 240, seed=7)[0]
    defect = textures(1, 120, 240, seed=8)[0]
    mask = Image.new("L", (240, 120), 0)
    mask.paste(255, (20, 30, 60, 90))
    bank = build_tiled_bank(
        model, [normal], Tiling(120), "tile", anomalous_images=[defect], anomalous_masks=[mask], batch_size=1
    )
    tiles = [normal.crop((0, 0, 120, 120)), normal.crop((120, 0, 240, 120)), defect.crop((120, 0, 240, 120))]
    with torch.no_grad():
        encoded = [model.encode_images(pixels(model, [tile])) for tile in tiles]
        expected = model.build_reference_bank(
            class_name="tile",
            reference_features={name: torch.cat([e[name] for e in encoded]) for name in encoded[0]},
            anomalous_features=model.encode_images(pixels(model, [defect.crop((0, 0, 120, 120))])),
            anomalous_masks=torch.from_numpy(mask_array(mask.crop((0, 0, 120, 120)), 240))[None],
        )
    assert set(bank.tensors) == set(expected.tensors)
    for name, value in expected.tensors.items():
        torch.testing.assert_close(bank.tensors[name], value, **EXACT)
    with pytest.raises(ValueError, match="need one mask each"):
        build_tiled_bank(model, [normal], Tiling(120), anomalous_images=[defect])


def test_fitted_methods_fit_on_tiles_and_take_pooled_tiling_only():
    model = method_tester("vtfusion").tiny_model()
    fit_tiled(model, textures(2, 120, 240), Tiling(120), "tile", steps=2, seed=0)
    assert model.config.num_fitted_normals == 4  # 2 images x 2 tiles
    bank = build_tiled_bank(model, None, Tiling(120), "tile")
    output = score_tiled(model, textures(1, 240, 360, seed=3)[0], bank)
    assert output.anomaly_maps.shape == (1, 240, 360) and torch.isfinite(output.anomaly_maps).all()
    with pytest.raises(ValueError, match="fit it on their tiles"):
        build_tiled_bank(model, textures(1, 120, 120), Tiling(120))
    with pytest.raises(ValueError, match="one fitted model per tile position"):
        build_tiled_bank(model, None, Tiling(120, mode="position"))
    with pytest.raises(ValueError, match="use pooled tiling"):
        fit_tiled(model, textures(1, 120, 120), Tiling(120, mode="position"))


# --- calibration -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pooled", "position"])
def test_leave_one_out_leaves_out_every_tile_of_the_left_out_reference(winclip, monkeypatch, mode):
    references = textures(3, 120, 240, seed=9)
    tiling = Tiling(120, mode=mode)
    bank = build_tiled_bank(winclip, references, tiling, "tile", batch_size=1)
    seen = []
    score = winclip.score_features
    monkeypatch.setattr(
        winclip,
        "score_features",
        lambda features, bank: seen.append((features, bank)) or score(features, bank),
    )
    calibrated = calibrate_tiled_bank(winclip, bank, references, false_alarm_rate=0.4, batch_size=1)
    monkeypatch.undo()
    # 3 references x 2 tiles, each scored once against the tiles the other two references have there
    per_bank = 2 * 2 if mode == "pooled" else 2
    assert len(seen) == 6
    for features, used in seen:
        memory = used.tensors["patch_tokens"]
        assert memory.shape[0] == per_bank * 225
        assert not (features["patch_tokens"][0][:, None] == memory[None]).all(-1).any()
    assert calibrated.calibration.num_normal == 3 and calibrated.calibration.normal_source == "leave_one_out"
    # with 3 normals and a 40 % rate the conformal threshold is their maximum: each reference scored against a bank of the others
    loo_scores = [
        score_tiled(
            winclip,
            reference,
            build_tiled_bank(winclip, references[:i] + references[i + 1 :], tiling, "tile", batch_size=1),
            batch_size=1,
        ).image_scores
        for i, reference in enumerate(references)
    ]
    assert calibrated.calibration.image_threshold == float(torch.cat(loo_scores).max())


def test_held_out_calibration_scores_normals_tiled_and_applies_to_the_stitched_output(winclip):
    references = textures(2, 120, 240, seed=10)
    normals = textures(2, 120, 240, seed=11)
    bank = build_tiled_bank(winclip, references, Tiling(120, 80), "tile")
    calibrated = calibrate_tiled_bank(winclip, bank, normal_images=normals, false_alarm_rate=0.4)
    scores = [score_tiled(winclip, image, bank) for image in normals]
    assert calibrated.calibration.normal_source == "held_out" and calibrated.calibration.num_normal == 2
    assert calibrated.calibration.image_threshold == max(float(output.image_scores) for output in scores)
    assert calibrated.calibration.pixel_threshold == max(
        float(output.anomaly_maps.max()) for output in scores
    )
    output = score_tiled(winclip, normals[0], calibrated)
    assert output.labels.tolist() == [0]  # at most the threshold: normal
    assert output.anomaly_masks.shape == (1, 120, 240)
    torch.testing.assert_close(
        output.anomaly_masks, output.anomaly_maps > calibrated.calibration.pixel_threshold, **EXACT
    )


def test_leave_one_out_keeps_the_defective_references_and_averages_defective_images_over_the_banks():
    """Anomalous memory by position: each reference is scored against a bank of the other references and
    of every defective reference; a defective calibration image against each such bank, averaged."""
    model = method_tester("anomalous_memory").tiny_model()
    references = textures(3, 120, 240, seed=14)
    defect = textures(1, 120, 240, seed=15)[0]
    mask = Image.new("L", (240, 120), 0)
    mask.paste(255, (150, 20, 200, 80))
    inputs = {"anomalous_images": [defect], "anomalous_masks": [mask], "batch_size": 1}
    tiling = Tiling(120, mode="position")
    bank = build_tiled_bank(model, references, tiling, "tile", **inputs)
    query = textures(1, 120, 240, seed=16)[0]
    query_mask = Image.new("L", (240, 120), 0)
    query_mask.paste(255, (10, 10, 60, 60))
    calibrated = calibrate_tiled_bank(
        model,
        bank,
        references,
        anomalous_references=[defect],
        anomalous_reference_masks=[mask],
        anomalous_images=[query],
        anomalous_masks=[query_mask],
        rule="best_f1",
        batch_size=1,
    )
    left_out_banks = [
        build_tiled_bank(model, references[:i] + references[i + 1 :], tiling, "tile", **inputs)
        for i in range(3)
    ]
    normal = [
        float(score_tiled(model, r, b, batch_size=1).image_scores) for r, b in zip(references, left_out_banks)
    ]
    anomalous = np.mean(
        [float(score_tiled(model, query, b, batch_size=1).image_scores) for b in left_out_banks]
    )
    calibration = calibrated.calibration
    assert (calibration.num_normal, calibration.num_anomalous, calibration.pixel_rule) == (3, 1, "best_f1")
    # the anomalous image's score is the mean over the 3 leave-one-out banks, in float32 (hence the tolerance)
    threshold, _ = best_f1_threshold(np.array([0, 0, 0, 1]), np.array([*normal, anomalous]))
    assert calibration.image_threshold == pytest.approx(threshold, rel=1e-6)
    with pytest.raises(ValueError, match="pass the anomalous_references"):
        calibrate_tiled_bank(model, bank, references)


def test_a_defect_too_small_for_the_models_input_leaves_its_tile_out_with_a_warning():
    model = method_tester("anomalous_memory").tiny_model()
    defect = textures(1, 480, 960, seed=17)[0]
    mask = Image.new("L", (960, 480), 0)
    # one pixel in the left tile: halving the 480 px tile by nearest neighbour keeps odd rows and columns only
    mask.putpixel((0, 0), 255)
    mask.paste(255, (600, 100, 700, 200))
    with pytest.warns(
        UserWarning, match="1 tiles of the anomalous references hold defect pixels that vanish"
    ):
        build_tiled_bank(
            model, textures(1, 480, 960), Tiling(480), anomalous_images=[defect], anomalous_masks=[mask]
        )


# --- the bank's file -------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["pooled", "position"])
def test_a_tiled_bank_saves_and_loads_with_its_tiling(winclip, tmp_path, mode):
    references = textures(2, 120, 240, seed=12)
    bank = build_tiled_bank(
        winclip, references, Tiling((120, 100), (60, 70), mode=mode, image_score="mean"), "tile"
    )
    bank = calibrate_tiled_bank(winclip, bank, references, false_alarm_rate=0.4)
    bank.save(tmp_path / "bank.safetensors")
    loaded = ReferenceBank.load(tmp_path / "bank.safetensors")
    assert loaded.tiling == bank.tiling and loaded.calibration == bank.calibration and loaded.k == 2
    assert set(loaded.tensors) == set(bank.tensors)
    query = textures(1, 120, 240, seed=13)[0]
    torch.testing.assert_close(
        score_tiled(winclip, query, loaded).image_scores,
        score_tiled(winclip, query, bank).image_scores,
        **EXACT,
    )


# --- defect regions --------------------------------------------------------------------------------------


def test_defect_regions_of_a_hand_made_mask():
    mask = np.zeros((8, 10), dtype=bool)
    mask[1:3, 1:4] = True  # a 2 x 3 block: area 6
    mask[5, 6] = mask[6, 7] = mask[7, 8] = True  # a diagonal scratch: one region (8-connected), area 3
    mask[7, 0] = True  # a single pixel
    anomaly_map = np.zeros((8, 10))
    anomaly_map[2, 2], anomaly_map[6, 7], anomaly_map[7, 0] = 0.7, 0.9, 0.5
    regions = defect_regions(mask, anomaly_map)
    assert regions == [
        {"box": [6, 5, 9, 8], "area": 3, "peak_score": 0.9},
        {"box": [1, 1, 4, 3], "area": 6, "peak_score": 0.7},
        {"box": [0, 7, 1, 8], "area": 1, "peak_score": 0.5},
    ]
    json.dumps(regions, allow_nan=False)
    assert [region["area"] for region in defect_regions(mask, min_area=2)] == [6, 3]
    assert defect_regions(np.zeros((4, 4), dtype=bool)) == []
    anomaly_map[6, 7] = np.nan
    assert defect_regions(mask, anomaly_map)[0]["peak_score"] is None
    with pytest.raises(ValueError, match="the mask"):
        defect_regions(mask, anomaly_map[:4])
