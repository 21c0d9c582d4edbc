"""MetaCAN (papers/metacan.txt): Eqs. 1-8 by hand, the model contract, save/load and Auto classes."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import hf_fsad
from hf_fsad import scoring
from hf_fsad.models.metacan.configuration_metacan import MetaCanConfig
from hf_fsad.models.metacan.modeling_metacan import CategoryToAnomalyHead, MetaCanModel
from hf_fsad.testing import byte_level_clip_tokenizer, tiny_clip_config


def make_tiny_metacan(seed: int = 0, **config) -> MetaCanModel:
    settings = {"feature_layers": [1, 2], "differentiator_hidden_size": 16, "detector_hidden_sizes": [8]}
    torch.manual_seed(seed)
    model = MetaCanModel(MetaCanConfig(clip_config=tiny_clip_config(), **(settings | config))).eval()
    model.tokenizer = byte_level_clip_tokenizer()
    return model


def test_eqs_1_2_topk_reference_anomaly_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # query 1: cosines 1, 0, 1/sqrt2, -1 -> top 2 = 1 and 1/sqrt2; query 2: 0, 1, 1/sqrt2, 0 -> 1 and 1/sqrt2
    expected = 0.5 * (1 - (1 + 1 / math.sqrt(2)) / 2)
    torch.testing.assert_close(
        scoring.topk_reference_anomaly(query, reference, 2), torch.full((1, 2), expected)
    )
    # k = 3: query 1 -> (1 + 1/sqrt2 + 0)/3
    first = scoring.topk_reference_anomaly(query, reference, 3)[0, 0]
    torch.testing.assert_close(first, torch.tensor(0.5 * (1 - (1 + 1 / math.sqrt(2)) / 3)))
    with pytest.raises(ValueError, match="nearest of 4"):
        scoring.topk_reference_anomaly(query, reference, 5)


def test_eqs_3_4_image_image_score_sums_level_maxima():
    levels = [torch.tensor([[0.1, 0.4], [0.2, 0.0]]), torch.tensor([[0.3, 0.2], [0.5, 0.6]])]
    torch.testing.assert_close(scoring.image_image_score(levels), torch.tensor([0.4 + 0.3, 0.2 + 0.6]))


def test_eq_8_fusion_and_ablations():
    image_image, image_text = torch.tensor([1.2, 0.3]), torch.tensor([0.8, 0.1])
    torch.testing.assert_close(scoring.metacan_fusion(image_image, image_text, 3), torch.tensor([0.5, 0.1]))
    torch.testing.assert_close(scoring.metacan_fusion(image_image, None, 3), torch.tensor([0.4, 0.1]))
    torch.testing.assert_close(scoring.metacan_fusion(None, image_text, 3), image_text)
    with pytest.raises(ValueError, match="at least one branch"):
        scoring.metacan_fusion(None, None, 3)


def _hand_head(params: dict, query_levels, reference_levels, text, logit_scale: float) -> dict:
    """Eqs. 1-8 written out in float64 from the head's parameters (one hidden detector layer)."""
    k = reference_levels[0].shape[0]
    level_scores = []
    for query, reference in zip(query_levels, reference_levels):
        cosines = F.normalize(query, dim=-1) @ F.normalize(reference.flatten(0, 1), dim=-1).T  # Eq. 1
        m = 0.5 * (1 - cosines.sort(dim=-1, descending=True).values[..., :k].sum(-1) / k)  # Eq. 2
        level_scores.append(m.max(dim=-1).values)  # Eq. 3
    s_ii = sum(level_scores)  # Eq. 4
    difference = query_levels[-1] - reference_levels[-1].mean(0)
    d = (
        torch.relu(difference @ params["differentiator.0.weight"].T) @ params["differentiator.2.weight"].T
    )  # Eq. 5
    d = F.normalize(d, dim=-1)
    t = F.normalize(text, dim=-1)
    a = torch.exp(logit_scale * d @ t[1])
    n = torch.exp(logit_scale * d @ t[0])
    m_it = a / (a + n)  # Eq. 6
    hidden = torch.relu(m_it @ params["detector.0.weight"].T + params["detector.0.bias"])
    hidden = F.layer_norm(hidden, hidden.shape[-1:], params["detector.2.weight"], params["detector.2.bias"])
    s_it = torch.sigmoid(hidden @ params["detector.3.weight"].T + params["detector.3.bias"]).squeeze(
        -1
    )  # Eq. 7
    return {"image_image": s_ii, "image_text_map": m_it, "image_text": s_it, "score": (s_ii + s_it) / 4}


def test_head_computes_eqs_1_to_8_in_float64():
    config = MetaCanConfig(
        clip_config=tiny_clip_config(),
        image_size=48,
        feature_layers=[1, 2, 2],
        differentiator_hidden_size=6,
        detector_hidden_sizes=[5],
        text_logit_scale=3.0,
    )
    torch.manual_seed(0)
    head = CategoryToAnomalyHead(config, vision_width=4, embedding_size=3).double()
    with torch.no_grad():
        head.detector[2].weight.uniform_(0.5, 1.5)  # LayerNorm affine away from its identity init
        head.detector[2].bias.uniform_(-0.5, 0.5)
    queries = [torch.randn(2, 9, 4, dtype=torch.float64) for _ in range(3)]
    references = [torch.randn(3, 9, 4, dtype=torch.float64) for _ in range(3)]
    text = torch.randn(2, 3, dtype=torch.float64)
    outputs = head(queries, references, text)
    expected = _hand_head(dict(head.named_parameters()), queries, references, text, 3.0)
    for name, value in expected.items():
        torch.testing.assert_close(outputs[name], value, rtol=1e-12, atol=1e-12)
    assert outputs["level_maps"].shape == (3, 2, 9)


def test_model_scores_equal_head_on_bank_and_maps_upsample_the_image_text_map():
    model = make_tiny_metacan()
    torch.manual_seed(1)
    references, images = torch.randn(3, 3, 240, 240), torch.randn(2, 3, 240, 240)
    bank = model.build_reference_bank(references, "screw")
    assert bank.k == 3 and bank.class_name == "screw"
    output = model(images, reference_bank=bank)
    features = model.encode_images(images)
    head = model.head(model.levels(features), model.levels(bank.tensors), bank.tensors["text_embeddings"])
    torch.testing.assert_close(output.image_scores, head["score"])
    torch.testing.assert_close(output.anomaly_maps, model.to_pixel_maps(head["image_text_map"]))
    torch.testing.assert_close(output.branch_scores["image_image.block1"], head["level_maps"][0].amax(-1))
    # Raw tokens after blocks 1 and 2, without the CLS token.
    encoded = model.backbone.encode_image(images, layers=[1, 2])
    torch.testing.assert_close(features["tokens.1"], encoded.hidden_states[1])  # CLS + patches
    # The prompts are object-agnostic: the bank's class name does not change the text embeddings.
    other = model.build_reference_bank(references, "bottle")
    torch.testing.assert_close(other.tensors["text_embeddings"], bank.tensors["text_embeddings"])


def test_a_query_equal_to_a_reference_scores_zero_in_every_level():
    model = make_tiny_metacan(use_detector=False)
    torch.manual_seed(2)
    images = torch.randn(1, 3, 240, 240)
    output = model(images, reference_bank=model.build_reference_bank(images))
    torch.testing.assert_close(output.image_scores, torch.zeros(1), atol=1e-6, rtol=0)


def test_ablations_change_the_score_as_table_4():
    torch.manual_seed(3)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    full = make_tiny_metacan()
    out = full(images, reference_bank=full.build_reference_bank(references))
    no_detector = make_tiny_metacan(use_detector=False)
    ablated = no_detector(images, reference_bank=no_detector.build_reference_bank(references))
    torch.testing.assert_close(ablated.image_scores, out.branch_scores["image_image"] / 2)
    assert ablated.anomaly_maps is None and "image_text" not in ablated.branch_scores
    no_discriminator = make_tiny_metacan(use_discriminator=False)
    ablated = no_discriminator(images, reference_bank=no_discriminator.build_reference_bank(references))
    torch.testing.assert_close(ablated.image_scores, out.branch_scores["image_text"])
    with pytest.raises(ValueError, match="cannot both be False"):
        make_tiny_metacan(use_detector=False, use_discriminator=False)


def test_normalisation_is_the_same_in_training_and_inference_mode():
    model = make_tiny_metacan()
    torch.manual_seed(4)
    bank = model.build_reference_bank(torch.randn(2, 3, 240, 240))
    images = torch.randn(4, 3, 240, 240)
    evaluated = model.eval()(images, reference_bank=bank).image_scores
    trained = model.train()(images, reference_bank=bank).image_scores
    single = torch.cat([model(image[None], reference_bank=bank).image_scores for image in images])
    torch.testing.assert_close(evaluated, trained)
    torch.testing.assert_close(evaluated, single)  # no batch statistics: a query's score ignores its batch


def test_save_load_round_trip_is_exact_and_auto_model_loads_it(tmp_path):
    model = make_tiny_metacan(detector_hidden_sizes=[8, 4])
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_fsad.MetaCanModel)
    assert loaded.config.detector_hidden_sizes == [8, 4]
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert all(p.requires_grad for p in loaded.head.parameters())
    torch.manual_seed(5)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    expected = model(images, reference_bank=model.build_reference_bank(references)).image_scores
    actual = loaded(images, reference_bank=loaded.build_reference_bank(references)).image_scores
    assert torch.equal(expected, actual)


def test_clear_errors(tiny_winclip):
    model = make_tiny_metacan()
    images = torch.randn(1, 3, 240, 240)
    with pytest.raises(ValueError, match="needs a reference bank"):
        model(images)
    with pytest.raises(ValueError, match="at least one"):
        model.build_reference_bank(class_name="screw")
    with pytest.raises(ValueError, match="empty"):
        model.build_reference_bank(torch.zeros(0, 3, 240, 240))
    with pytest.raises(ValueError, match="'winclip' model"):
        model(images, reference_bank=tiny_winclip.build_reference_bank(images))
    with pytest.raises(ValueError, match="blocks 1..2"):
        MetaCanConfig(clip_config=tiny_clip_config(), feature_layers=[1, 7, 12])
    with pytest.raises(ValueError, match="240x240"):
        model(torch.randn(1, 3, 224, 224), reference_bank=model.build_reference_bank(images))


def test_pipeline_scores_with_reference_images(tmp_path):
    from transformers import pipeline

    from hf_fsad.data import load_benchmark

    model = make_tiny_metacan()
    model.save_pretrained(tmp_path)
    data = load_benchmark("toy", category="grid", num_train=3, num_test_good=1, num_test_anomalous=1)
    results = pipeline("image-anomaly-detection", model=str(tmp_path))(
        list(data["test"]["image"]), reference_images=list(data["train"]["image"])
    )
    processor = model.image_processor()
    bank = model.build_reference_bank(
        processor(list(data["train"]["image"]), return_tensors="pt").pixel_values
    )
    expected = model(
        processor(list(data["test"]["image"]), return_tensors="pt").pixel_values, reference_bank=bank
    )
    # abs 1e-6 here and below: the pipeline runs one image per forward, the expectation a batch of 2, and
    # float32 kernels may round a batch differently (scores and maps in [0, 1])
    assert [r["score"] for r in results] == pytest.approx(expected.image_scores.tolist(), abs=1e-6)
    assert set(results[0]["branch_scores"]) >= {"image_image", "image_text"}
    for name, values in expected.branch_scores.items():
        assert [r["branch_scores"][name] for r in results] == pytest.approx(values.tolist(), abs=1e-6)
    for result, anomaly_map in zip(results, expected.anomaly_maps, strict=True):
        torch.testing.assert_close(torch.from_numpy(result["anomaly_map"]), anomaly_map, rtol=0, atol=1e-6)
