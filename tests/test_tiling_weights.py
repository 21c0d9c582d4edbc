"""The anomalous memory's weight search (paper Sec. 4.3) on tiled banks: one weight vector for every tile,
chosen on the views' tiled image scores (the tiling's rule over the tiles' weighted scores)."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from hf_fsad.calibration_policy import calibrated_bank, mask_tensor
from hf_fsad.models.anomalous_memory.functional_anomalous_memory import select_score_weights
from hf_fsad.tiled_scoring import build_tiled_bank, score_tiled, tile_bank, validate_tiled_weights
from hf_fsad.tiling import Tiling
from model_tester import method_tester
from test_tiling import textures

EXACT = {"rtol": 0, "atol": 0}


@pytest.fixture(scope="module")
def memory():
    model = method_tester("anomalous_memory").tiny_model()
    model.config.num_weight_samples = 20  # a quick search; the draw is seeded
    model.config.num_validation_views = 2
    return model


def defect_with_mask(size: tuple[int, int], box: tuple[int, int, int, int], seed: int):
    image = textures(1, size[1], size[0], seed=seed)[0]
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return image, mask


def test_the_tile_rule_decides_which_weights_rank_tiled_views_best():
    """Two candidates, one normal and one anomalous view of two tiles each (rows: tiles, columns: scores).
    By the max over tiles the normal view scores 0.6 / 0.2 and the anomalous 0.5 / 0.4 under the candidates
    [1, 0] / [0, 1]: only the second ranks the anomalous view higher. By the mean: 0.3 / 0.2 against 0.5 / 0.2:
    only the first does."""
    candidates = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    normal = torch.tensor([[0.6, 0.2], [0.0, 0.2]])
    anomalous = torch.tensor([[0.5, 0.4], [0.5, 0.0]])
    labels = torch.tensor([0, 1])
    weights, auroc = select_score_weights([normal, anomalous], labels, candidates, "max")
    assert weights.tolist() == [0.0, 1.0] and auroc == 1.0
    weights, auroc = select_score_weights([normal, anomalous], labels, candidates, "mean")
    assert weights.tolist() == [1.0, 0.0] and auroc == 1.0
    # untiled: one score vector per view, as before
    weights, _ = select_score_weights(torch.stack([normal[0], anomalous[0]]), labels, candidates)
    assert weights.tolist() == [0.0, 1.0]


def test_a_tile_the_size_of_the_image_chooses_the_untiled_weights(memory):
    references = textures(2, 120, 120, seed=30)
    defect, mask = defect_with_mask((120, 120), (30, 30, 90, 90), seed=31)
    normals = textures(1, 120, 120, seed=32)
    tiled = build_tiled_bank(
        memory, references, Tiling(120), anomalous_images=[defect], anomalous_masks=[mask]
    )
    searched, views = validate_tiled_weights(memory, tiled, normals, [defect], batch_size=4)
    processor = memory.image_processor()
    with torch.no_grad():
        untiled = memory.build_reference_bank(
            processor(references, return_tensors="pt").pixel_values,
            anomalous_pixel_values=processor([defect], return_tensors="pt").pixel_values,
            anomalous_masks=mask_tensor([mask], memory.config.image_size),
        )
    expected = memory.validate_weights(untiled, *memory.validation_set(normals, [defect]))
    assert views == 4  # 2 views of the normal and 2 of the defect
    torch.testing.assert_close(searched.tensors["score_weights"], expected.tensors["score_weights"], **EXACT)
    assert float(searched.tensors["validation_auroc"]) == float(expected.tensors["validation_auroc"])
    assert not torch.equal(
        searched.tensors["score_weights"], tiled.tensors["score_weights"]
    )  # not the baseline


def test_the_policy_searches_weights_on_a_position_bank_and_calibrates_without_the_normals_that_chose_them(
    memory,
):
    references = textures(3, 120, 240, seed=33)
    defect, mask = defect_with_mask((240, 120), (150, 20, 200, 80), seed=34)  # in the right tile
    held_out = textures(1, 120, 240, seed=35)
    made = calibrated_bank(
        memory,
        references,
        defects=[defect],
        defect_masks=[mask],
        held_out_normals=held_out,
        tiling=Tiling(120, mode="position"),
        false_alarm_rate=0.4,
        batch_size=2,
    )
    bank = made.bank
    assert any(note.startswith("weight search (paper Sec. 4.3) ran") for note in made.notes)
    assert "of 1 held-out normal and 1 defective images" in " ".join(made.notes)
    weights = [tile_bank(bank, position).tensors["score_weights"] for position in (0, 1)]
    torch.testing.assert_close(weights[0], weights[1], **EXACT)  # one vector for every position
    assert "validation_auroc" in bank.tensors
    # the held-out normal chose the weights, so the references calibrate them (leave-one-out)
    assert bank.calibration.normal_source == "leave_one_out" and made.refusal is None
    # the searched weights are the ones that score: the image score is the max over the tiles of each tile's
    # score vector weighed by them (tiles encoded one at a time here, two at a time by score_tiled: float32
    # sums in another order, hence the relative tolerance)
    query = textures(1, 120, 240, seed=36)[0]
    processor = memory.image_processor()
    tile_scores = []
    for position, box in enumerate(bank.tiling.boxes(120, 240)):
        with torch.no_grad():
            features = memory.encode_images(
                processor([query.crop(box.pil_box)], return_tensors="pt").pixel_values
            )
        vectors = memory.score_vectors(features, tile_bank(bank, position))
        tile_scores.append(float(vectors @ weights[position].to(vectors)))
    assert score_tiled(memory, query, bank).image_scores.item() == pytest.approx(max(tile_scores), rel=1e-5)
    skipped = calibrated_bank(
        memory,
        references,
        defects=[defect],
        defect_masks=[mask],
        tiling=Tiling(120, mode="position"),
        weight_search=False,
        calibrate=False,
    )
    assert "weight search (paper Sec. 4.3) skipped as asked" in skipped.notes[-1]
    assert "validation_auroc" not in skipped.bank.tensors


def test_weights_chosen_by_the_references_refuse_a_tiled_leave_one_out(memory):
    references = textures(2, 120, 120, seed=37)
    defect, mask = defect_with_mask((120, 120), (30, 30, 90, 90), seed=38)
    made = calibrated_bank(
        memory, references, defects=[defect], defect_masks=[mask], tiling=Tiling(60), batch_size=4
    )
    assert "of 2 reference and 1 defective images" in " ".join(made.notes)
    assert made.bank.calibration is None
    assert made.refusal.startswith("the references chose the bank's score weights (weight search)")
