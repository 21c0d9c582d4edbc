"""Anomalous memory: memories from masks, the nine scores, weight validation, round trips, bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_fsad import scoring
from hf_fsad.bank import ReferenceBank
from hf_fsad.data.toy import toy_records
from hf_fsad.metrics import image_auroc
from hf_fsad.models.anomalous_memory import functional_anomalous_memory
from hf_fsad.models.anomalous_memory.configuration_anomalous_memory import AnomalousMemoryConfig
from hf_fsad.testing import tiny_clip_config
from model_tester import ModelTester


class AnomalousMemoryModelTester(ModelTester):
    model_type = "anomalous_memory"


@pytest.fixture(scope="module")
def model():
    return AnomalousMemoryModelTester.tiny_model()


def pixels(model, images):
    return model.image_processor()(list(images), return_tensors="pt").pixel_values


def mask_tensor(mask, size=240):
    return torch.from_numpy(np.asarray(mask.resize((size, size))) > 127)


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(1)
    return torch.randn(3, 3, 240, 240)


def corner_mask():
    """A defect covering exactly the top-left 16 px patch."""
    mask = torch.zeros(1, 240, 240, dtype=torch.bool)
    mask[0, :16, :16] = True
    return mask


def test_masked_items_form_the_anomalous_memory(model, images):
    bank = model.build_reference_bank(
        images[:1], "tile", anomalous_pixel_values=images[1:2], anomalous_masks=corner_mask()
    )
    features = model.encode_images(images[1:2])
    grid = 15
    assert bank.tensors["anomalous.patch"].shape[0] == 1
    # bank items are the selected feature rows, copied: exact
    torch.testing.assert_close(
        bank.tensors["anomalous.patch"][0], features["patch_tokens"][0, 0], rtol=0, atol=0
    )
    for scale in (2, 3, 7):  # the corner patch lies in exactly one window per scale
        assert bank.tensors[f"anomalous.window{scale}"].shape[0] == 1
        torch.testing.assert_close(
            bank.tensors[f"anomalous.window{scale}"][0],
            features[f"window_embeddings.{scale}"][0, 0],
            rtol=0,
            atol=0,
        )
        windows = (grid - scale + 1) ** 2
        assert bank.tensors[f"reference.window{scale}"].shape[0] == windows + windows - 1
    assert bank.tensors["reference.patch"].shape[0] == 225 + 224  # normal image + unmasked anomalous patches
    # the bank stores this function's weights: exact
    torch.testing.assert_close(
        bank.tensors["score_weights"], functional_anomalous_memory.baseline_score_weights(4), rtol=0, atol=0
    )
    assert bank.k == 1 and int(bank.tensors["num_anomalous"]) == 1


def test_items_join_the_anomalous_memory_when_mostly_defect(images):
    """A defect over patch (0, 0) and the top half of patch (1, 0): shares 1 and 0.5 at the patch level,
    0.375 and 0.125 for the scale-2 windows at (0, 0) and (1, 0), 0 elsewhere."""
    mask = torch.zeros(1, 240, 240, dtype=torch.bool)
    mask[0, :24, :16] = True
    features = AnomalousMemoryModelTester.tiny_model().encode_images(images[1:2])
    expected = {  # fraction -> (anomalous patches, anomalous scale-2 windows)
        0.5: ([0, 15], [0]),  # no window is half defect: the one with the largest share stands for it
        1.0: ([0], [0]),
        0.1: ([0, 15], [0, 14]),
    }
    for fraction, (patches, windows) in expected.items():
        model = AnomalousMemoryModelTester.tiny_model(anomalous_item_fraction=fraction)
        bank = model.build_reference_bank(anomalous_features=features, anomalous_masks=mask)
        # bank items are the selected feature rows, copied: exact
        torch.testing.assert_close(
            bank.tensors["anomalous.patch"], features["patch_tokens"][0, patches], rtol=0, atol=0
        )
        torch.testing.assert_close(
            bank.tensors["anomalous.window2"], features["window_embeddings.2"][0, windows], rtol=0, atol=0
        )
        # the normal memory holds the defect-free items only, whatever the fraction
        assert bank.tensors["reference.patch"].shape[0] == 225 - 2
        assert bank.tensors["reference.window2"].shape[0] == 196 - 2
    with pytest.raises(ValueError, match="anomalous_item_fraction"):
        AnomalousMemoryConfig(clip_config=tiny_clip_config(), anomalous_item_fraction=0)


def test_k0_large_central_defect_leaves_one_memory_empty_and_still_scores(model, images):
    """The paper's protocol (no normal reference, one annotated defect): a 48 px central defect touches every
    112 px window, so the normal memory has no 112 px window; that score drops out and the reference
    group's third is spread over its other three levels."""
    mask = torch.zeros(1, 240, 240, dtype=torch.bool)
    mask[0, 96:144, 96:144] = True  # patches 6-8 in both directions; window i of side 7 covers patches i..i+6
    bank = model.build_reference_bank(anomalous_pixel_values=images[1:2], anomalous_masks=mask)
    assert bank.tensors["reference.window7"].shape[0] == 0 and bank.k == 0
    assert bank.tensors["reference.patch"].shape[0] == 225 - 9
    assert bank.tensors["anomalous.window7"].shape[0] > 0
    expected_weights = [1 / 3, 1 / 9, 1 / 9, 1 / 9, 0, 1 / 12, 1 / 12, 1 / 12, 1 / 12]
    # float64 defaults (rtol 1e-7): 1/9 and 1/12 computed in another order differ by an ulp
    torch.testing.assert_close(
        bank.tensors["score_weights"], torch.tensor(expected_weights, dtype=torch.float64)
    )
    output = model(images[2:], reference_bank=bank)
    assert "reference.window7" not in output.branch_scores and len(output.branch_scores) == 8
    assert torch.isfinite(output.image_scores).all() and torch.isfinite(output.anomaly_maps).all()
    scores = output.branch_scores
    by_hand = (
        scores["text"].double() / 3
        + sum(scores[f"reference.{name}"].double() for name in ("patch", "window2", "window3")) / 9
        + sum(scores[f"anomalous.{name}"].double() for name in ("patch", "window2", "window3", "window7"))
        / 12
    )
    # float32 scores summed in float32 by the model vs in float64 here: a few ulps of values below 1
    torch.testing.assert_close(output.image_scores.double(), by_hand, rtol=1e-6, atol=1e-7)
    features = model.encode_images(images[2:])
    reference_patch = scoring.reference_association(features["patch_tokens"], bank.tensors["reference.patch"])
    # the model's own ops on the same batch and memory: bit-identical
    torch.testing.assert_close(scores["reference.patch"], reference_patch.amax(-1), rtol=0, atol=0)

    views = torch.cat([images[:1], images[1:2]])
    validated = model.validate_weights(bank, views, [0, 1])
    weights = validated.tensors["score_weights"]
    assert weights[4] == 0 and float(weights.abs().sum()) == pytest.approx(1.0)  # float64 sum of 8 terms
    with pytest.raises(ValueError, match="empty at every level"):  # nothing defect-free anywhere
        model.build_reference_bank(
            anomalous_pixel_values=images[1:2], anomalous_masks=torch.ones(1, 240, 240, dtype=torch.bool)
        )


def test_nine_scores_and_their_baseline_combination(model, images):
    bank = model.build_reference_bank(
        images[:1], "tile", anomalous_pixel_values=images[1:2], anomalous_masks=corner_mask()
    )
    output = model(images[2:], reference_bank=bank)
    assert list(output.branch_scores) == model.score_names() and len(model.score_names()) == 9
    features = model.encode_images(images[2:])
    # the model's own ops on the same batch and memories: bit-identical
    text = bank.tensors["text_embeddings"]
    torch.testing.assert_close(
        output.branch_scores["text"], scoring.class_scores(features["image_embeddings"], text), rtol=0, atol=0
    )
    reference_patch = scoring.reference_association(
        features["patch_tokens"], bank.tensors["reference.patch"]
    ).amax(-1)
    torch.testing.assert_close(output.branch_scores["reference.patch"], reference_patch, rtol=0, atol=0)
    masks = scoring.window_masks((15, 15), 7)
    anomalous_windows = functional_anomalous_memory.anomalous_association(
        features["window_embeddings.7"], bank.tensors["anomalous.window7"]
    )
    expected = scoring.harmonic_aggregation(anomalous_windows, masks).amax(-1)
    torch.testing.assert_close(output.branch_scores["anomalous.window7"], expected, rtol=0, atol=0)
    stacked = torch.stack([output.branch_scores[name] for name in model.score_names()], -1).double()
    baseline = stacked[:, 0] / 3 + stacked[:, 1:5].mean(-1) / 3 + stacked[:, 5:].mean(-1) / 3
    torch.testing.assert_close(output.image_scores.double(), baseline, rtol=1e-6, atol=1e-7)

    # the map: the same weights on each score's patch map (text: WinCLIP's zero-shot map), in float64
    maps = [model.zero_shot_branch(features, text, model.window_mask_list())[1]]
    for memory, association in (
        ("reference", scoring.reference_association),
        ("anomalous", functional_anomalous_memory.anomalous_association),
    ):
        maps.append(association(features["patch_tokens"], bank.tensors[f"{memory}.patch"]))
        for scale in (2, 3, 7):
            windows = association(
                features[f"window_embeddings.{scale}"], bank.tensors[f"{memory}.window{scale}"]
            )
            maps.append(scoring.harmonic_aggregation(windows, scoring.window_masks((15, 15), scale)))
    weights = bank.tensors["score_weights"].double()
    weighted = sum(weight * patch_map.double() for weight, patch_map in zip(weights, maps, strict=True))
    expected_map = scoring.upsample_maps(weighted.reshape(1, 15, 15), (240, 240))
    # float32 weighted sum of 9 maps of values below 1 against float64: a few ulp of 1 (measured 9e-8)
    torch.testing.assert_close(output.anomaly_maps.double(), expected_map, rtol=0, atol=1e-6)


def test_maskless_anomalous_reference_goes_wholly_to_the_anomalous_memory(model, images):
    bank = model.build_reference_bank(images[:1], "tile", anomalous_pixel_values=images[1:2])
    assert bank.tensors["anomalous.patch"].shape[0] == 225
    assert bank.tensors["reference.patch"].shape[0] == 225  # only the normal reference
    with pytest.raises(ValueError, match="normal memory is empty at every level"):
        model.build_reference_bank(anomalous_pixel_values=images[1:2])


@pytest.mark.parametrize(
    ("masks", "message"),
    [
        (torch.zeros(1, 240, 240, dtype=torch.bool), "mark no anomalous pixel"),
        (torch.ones(1, 224, 224, dtype=torch.bool), r"shape \(1, 240, 240\)"),
        (torch.ones(2, 240, 240, dtype=torch.bool), r"shape \(1, 240, 240\)"),
    ],
    ids=["all-zero", "wrong-size", "wrong-count"],
)
def test_bad_masks_are_refused(model, images, masks, message):
    with pytest.raises(ValueError, match=message):
        model.build_reference_bank(images[:1], anomalous_pixel_values=images[1:2], anomalous_masks=masks)


def test_the_method_needs_an_anomalous_reference(model, images):
    with pytest.raises(ValueError, match="at least one anomalous reference"):
        model.build_reference_bank(images[:1])
    with pytest.raises(ValueError, match="needs a reference bank"):
        model(images[:1])


def test_one_annotated_defect_beats_one_normal_reference_on_toy(make_winclip):
    """Same random backbone: WinCLIP+ with one normal reference vs the anomalous memory with that reference
    plus one annotated defect of the type tested (the discolorations random features find hardest)."""
    winclip = make_winclip()
    anomalous = AnomalousMemoryModelTester.tiny_model()
    anomalous.backbone.load_state_dict(winclip.backbone.state_dict())
    results = {}
    for category in ("stripes", "grid"):
        records = toy_records(
            category, num_train=1, num_test_good=10, num_test_anomalous=11, defects=("discoloration",), seed=1
        )
        defect, test = records["test"][10], records["test"][:10] + records["test"][11:]
        labels = [record.label for record in test]
        queries, normal = (
            pixels(winclip, [r.image for r in test]),
            pixels(winclip, [records["train"][0].image]),
        )
        with torch.no_grad():
            baseline = winclip(
                queries, reference_bank=winclip.build_reference_bank(normal, "tile")
            ).image_scores
            bank = anomalous.build_reference_bank(
                normal,
                "tile",
                anomalous_pixel_values=pixels(anomalous, [defect.image]),
                anomalous_masks=mask_tensor(defect.mask)[None],
            )
            ours = anomalous(queries, reference_bank=bank).image_scores
        results[category] = (image_auroc(labels, baseline), image_auroc(labels, ours))
    for winclip_auroc, ours_auroc in results.values():
        assert ours_auroc > winclip_auroc, results


# The defaults, then non-default values of every weight-search field (written as literals below)
WEIGHT_SEARCHES = {
    "defaults": {},
    "non-default": {
        "num_weight_samples": 7, "weight_seed": 3, "num_validation_views": 2, "weight_distribution": "normal",
        "signed_weights": False,
    },
}  # fmt: skip


@pytest.mark.parametrize("settings", WEIGHT_SEARCHES.values(), ids=WEIGHT_SEARCHES.keys())
def test_weight_validation_keeps_the_seeded_draw_with_the_best_auroc(settings, tmp_path):
    """`num_validation_views` seeded views per image (seed weight_seed * 1000 + 2 * index + label), then
    `num_weight_samples` draws (seed weight_seed) of `weight_distribution`, absolute unless signed."""
    from hf_fsad.augmentation import augment_views

    model = AnomalousMemoryModelTester.tiny_model(**settings)
    views_per_image, seed = settings.get("num_validation_views", 5), settings.get("weight_seed", 0)
    num_samples = settings.get("num_weight_samples", 100)
    distribution = settings.get("weight_distribution", "uniform")
    signed = settings.get("signed_weights", True)

    records = toy_records(
        "grid", num_train=1, num_test_good=0, num_test_anomalous=1, defects=("blob",), seed=2
    )
    normal, defect = records["train"][0], records["test"][0]
    bank = model.build_reference_bank(
        anomalous_pixel_values=pixels(model, [defect.image]), anomalous_masks=mask_tensor(defect.mask)[None]
    )
    views, labels = model.validation_set([normal.image], [defect.image])
    assert labels == [0] * views_per_image + [1] * views_per_image
    expected_views = pixels(
        model,
        augment_views(normal.image, views_per_image, seed * 1000)
        + augment_views(defect.image, views_per_image, seed * 1000 + 1),
    )
    torch.testing.assert_close(views, expected_views, rtol=0, atol=0)  # the same seeded views

    validated = model.validate_weights(bank, views, labels)
    scores = torch.stack(
        [model(views, reference_bank=bank).branch_scores[n] for n in model.score_names()], -1
    ).double()
    candidates = functional_anomalous_memory.sample_score_weights(
        num_samples, 9, distribution, torch.Generator().manual_seed(seed), signed=signed
    )
    aurocs = torch.tensor([image_auroc(labels, scores @ candidate) for candidate in candidates])
    best = int(torch.argmax(aurocs))  # the first of the best
    # a copied row: exact
    torch.testing.assert_close(validated.tensors["score_weights"], candidates[best], rtol=0, atol=0)
    # float64 AUROC of the model's own scores (a ratio of counts): equal up to float64 rounding
    assert float(validated.tensors["validation_auroc"]) == pytest.approx(float(aurocs[best]), abs=1e-12)
    assert float(aurocs[best]) > image_auroc(labels, scores @ bank.tensors["score_weights"]) - 1e-12

    validated.save(tmp_path / "bank.safetensors")
    reloaded = ReferenceBank.load(tmp_path / "bank.safetensors")
    # saved as is: exact
    torch.testing.assert_close(reloaded.tensors["score_weights"], candidates[best], rtol=0, atol=0)
    torch.testing.assert_close(
        model(views, reference_bank=reloaded).image_scores.double(),
        scores @ candidates[best],
        rtol=1e-6,  # float32 model sum vs float64 here
        atol=1e-7,
    )
    with pytest.raises(ValueError, match="labels for"):
        model.validate_weights(bank, views, labels[:3])


def test_signed_weight_draws_reach_the_bank(images):
    model = AnomalousMemoryModelTester.tiny_model(weight_distribution="normal")
    bank = model.build_reference_bank(
        images[:1], anomalous_pixel_values=images[1:2], anomalous_masks=corner_mask()
    )
    validated = model.validate_weights(bank, torch.cat([images[:1], images[1:2]]), [0, 1])
    candidates = functional_anomalous_memory.sample_score_weights(
        100, 9, "normal", torch.Generator().manual_seed(0)
    )
    assert any(torch.equal(validated.tensors["score_weights"], candidate) for candidate in candidates)
    absolute = AnomalousMemoryModelTester.tiny_model(weight_distribution="normal", signed_weights=False)
    bank = absolute.build_reference_bank(
        images[:1], anomalous_pixel_values=images[1:2], anomalous_masks=corner_mask()
    )
    validated = absolute.validate_weights(bank, torch.cat([images[:1], images[1:2]]), [0, 1])
    assert (validated.tensors["score_weights"] >= 0).all()


def test_winclip_bank_is_refused(model, make_winclip, images):
    with pytest.raises(ValueError, match="built by a 'winclip' model"):
        model(images[:1], reference_bank=make_winclip().build_reference_bank(images[:1]))


def test_bad_config_is_refused():
    with pytest.raises(ValueError, match="weight_distribution"):
        AnomalousMemoryConfig(clip_config=tiny_clip_config(), weight_distribution="cauchy")


def test_nearest_cosine_and_both_associations_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    memory = torch.tensor([[1.0, 1.0], [0.0, -3.0]])
    half = 2**-0.5
    torch.testing.assert_close(scoring.nearest_cosine(query, memory), torch.tensor([[half, half]]))
    torch.testing.assert_close(
        scoring.reference_association(query, memory), torch.tensor([[(1 - half) / 2] * 2])
    )
    torch.testing.assert_close(
        functional_anomalous_memory.anomalous_association(query, memory), torch.tensor([[(1 + half) / 2] * 2])
    )


def test_patch_defect_shares_count_each_patchs_defect_pixels():
    masks = torch.zeros(1, 4, 6, dtype=torch.bool)
    masks[0, 1, 5] = True  # one pixel of patch (row 0, column 2) of a 2x3 grid of 2-pixel patches
    masks[0, 2:, :2] = True  # all of patch (1, 0)
    masks[0, 3, 2] = True  # one pixel of patch (1, 1)
    shares = functional_anomalous_memory.patch_defect_shares(masks, 2)
    assert shares.dtype == torch.float64 and shares.tolist() == [[0, 0, 0.25, 1, 0.25, 0]]


def test_window_defect_shares_average_the_covered_patches():
    masks = scoring.window_masks((3, 3), 2)  # windows at (0,0), (0,1), (1,0), (1,1)
    patch_shares = torch.zeros(1, 9, dtype=torch.float64)
    patch_shares[0, 2] = 1.0  # patch (0, 2): only the window at (0, 1) covers it
    patch_shares[0, 4] = 0.5  # the centre patch is in every window
    expected = [[0.5 / 4, 1.5 / 4, 0.5 / 4, 0.5 / 4]]
    assert functional_anomalous_memory.window_defect_shares(patch_shares, masks).tolist() == expected


def test_anomalous_items_need_the_fraction_or_hold_the_largest_share():
    shares = torch.tensor(
        [[0.0, 0.6, 0.5, 0.2], [0.1, 0.3, 0.3, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64
    )
    # row 0: two items reach 0.5; row 1: none does, so the two largest (tied) do; row 2: no defect at all
    expected = [[False, True, True, False], [False, True, True, False], [False, False, False, False]]
    assert functional_anomalous_memory.anomalous_items(shares, 0.5).tolist() == expected
    assert functional_anomalous_memory.anomalous_items(shares, 0.05).tolist()[1] == [True, True, True, False]


def test_baseline_weights_average_three_groups():
    weights = functional_anomalous_memory.baseline_score_weights(4)
    scores = torch.tensor([0.3, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8], dtype=torch.float64)
    expected = (0.3 + (0.1 + 0.2 + 0.3 + 0.4) / 4 + (0.5 + 0.6 + 0.7 + 0.8) / 4) / 3
    assert float(scores @ weights) == pytest.approx(expected, abs=1e-15)  # float64 rounding of 9 terms


def test_baseline_weights_spread_each_group_over_its_available_levels():
    available = torch.tensor([True, True, True, True, False, True, True, True, True])
    expected = [1 / 3, 1 / 9, 1 / 9, 1 / 9, 0, 1 / 12, 1 / 12, 1 / 12, 1 / 12]
    torch.testing.assert_close(
        functional_anomalous_memory.baseline_score_weights(4, available),
        torch.tensor(expected, dtype=torch.float64),
    )
    no_reference = torch.tensor([True, False, False, True, True])  # a whole group gone: two groups share
    expected = [1 / 2, 0, 0, 1 / 4, 1 / 4]
    torch.testing.assert_close(
        functional_anomalous_memory.baseline_score_weights(2, no_reference),
        torch.tensor(expected, dtype=torch.float64),
    )


def _raw_weight_draw(distribution: str, seed: int, shape: tuple[int, int]) -> torch.Tensor:
    """The draw `sample_score_weights` makes, repeated from the same seeded generator."""
    generator = torch.Generator().manual_seed(seed)
    if distribution == "uniform":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    normal = torch.randn(shape, generator=generator, dtype=torch.float64)
    if distribution == "normal":
        return normal
    chi2 = torch.randn((*shape, 3), generator=generator, dtype=torch.float64).pow(2).sum(-1)
    return normal / (chi2 / 3).sqrt()


@pytest.mark.parametrize("distribution", ["uniform", "normal", "student_t"])
def test_sampled_weights_are_the_seeded_draws_scaled_to_unit_l1_norm(distribution):
    def draw(seed, signed=True):
        return functional_anomalous_memory.sample_score_weights(
            50, 9, distribution, torch.Generator().manual_seed(seed), signed=signed
        )

    raw = _raw_weight_draw(distribution, 0, (50, 9))
    # same operations on the same draw: bit-identical
    torch.testing.assert_close(draw(0), raw / raw.abs().sum(-1, keepdim=True), rtol=0, atol=0)
    torch.testing.assert_close(
        draw(0, signed=False), raw.abs() / raw.abs().sum(-1, keepdim=True), rtol=0, atol=0
    )
    assert not torch.equal(draw(1), draw(0))
    # the paper's signed draws: normal and Student-t weights take both signs, uniform ones never
    assert bool((draw(0) < 0).any()) == (distribution != "uniform")
    assert (draw(0, signed=False) >= 0).all()
    with pytest.raises(ValueError, match="Unknown weight distribution"):
        functional_anomalous_memory.sample_score_weights(1, 9, "cauchy")


def test_unit_l1_weights_zero_the_unavailable_scores():
    weights = torch.tensor([[0.5, -0.25, 0.25]], dtype=torch.float64)
    available = torch.tensor([True, True, False])
    assert functional_anomalous_memory.unit_l1_weights(weights, available).tolist() == [[2 / 3, -1 / 3, 0.0]]


def test_pairwise_auroc_matches_sklearn_with_ties():
    from sklearn.metrics import roc_auc_score

    scores = torch.tensor([[0.1, 0.4, 0.4, 0.8, 0.3, 0.4]], dtype=torch.float64)
    labels = torch.tensor([0, 1, 0, 1, 1, 0])
    assert float(functional_anomalous_memory.pairwise_auroc(scores, labels)[0]) == pytest.approx(
        roc_auc_score(labels, scores[0])
    )
    with pytest.raises(ValueError, match="both normal and anomalous"):
        functional_anomalous_memory.pairwise_auroc(scores, torch.ones(6))


def test_weight_search_picks_the_perfect_score():
    """Score 0 separates the validation set perfectly, scores 1 and 2 are noise: the chosen vector must be
    dominated by score 0, and reach AUROC 1."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.tensor([0] * 6 + [1] * 6)
    noise = torch.rand(12, 2, generator=generator, dtype=torch.float64)
    scores = torch.cat([labels[:, None].double(), noise], dim=1)
    candidates = functional_anomalous_memory.sample_score_weights(200, 3, "uniform", generator)
    weights, auroc = functional_anomalous_memory.select_score_weights(scores, labels, candidates)
    assert auroc == 1.0
    assert int(torch.argmax(weights)) == 0
    assert auroc == float(functional_anomalous_memory.pairwise_auroc(candidates @ scores.T, labels).max())


def test_weight_validation_views_take_the_banks_preprocessing(model, monkeypatch):
    """In the paper's geometry (benchmarks: resize the short side, centre crop) the validation views are
    cropped like the bank and the queries, not squashed."""
    from PIL import Image

    from hf_fsad.augmentation import augment_views
    from hf_fsad.calibration_policy import calibrated_bank

    assert model.config.paper_preprocessing == "crop"

    def wide(seed):  # 2:1 images, where cropping and squashing differ
        return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (60, 120, 3), dtype=np.uint8))

    references, held_out, defect = [wide(1), wide(2)], [wide(3)], wide(4)
    seen = []
    validate = model.validate_weights
    monkeypatch.setattr(
        model,
        "validate_weights",
        lambda bank, views, labels: seen.append(views) or validate(bank, views, labels),
    )
    calibrated_bank(
        model,
        references,
        defects=[defect],
        held_out_normals=held_out,
        paper_preprocessing=True,
    )
    cropping = model.paper_image_processor()
    views = augment_views(held_out[0], 5, 0) + augment_views(defect, 5, 1)
    expected = cropping(views, return_tensors="pt").pixel_values
    torch.testing.assert_close(seen[0], expected, rtol=0, atol=0)  # the same processor on the same views
    assert not torch.equal(seen[0], pixels(model, views))  # not the squashed views
