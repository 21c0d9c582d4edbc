"""MetaCAN (Lv et al., CIKM 2025): Eqs. 1-8 by hand, the model contract, save/load and Auto classes."""

from __future__ import annotations

import math
from typing import ClassVar

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModel

import hf_fsad
from hf_fsad.models.metacan import functional_metacan
from hf_fsad.models.metacan.configuration_metacan import MetaCanConfig
from hf_fsad.models.metacan.modeling_metacan import CategoryToAnomalyHead
from hf_fsad.testing import tiny_clip_config, vit_b16_plus_240_config
from model_tester import ModelTester


class MetaCanModelTester(ModelTester):
    model_type = "metacan"
    config: ClassVar[dict] = {
        "feature_layers": [1, 2],
        "differentiator_hidden_size": 16,
        "detector_hidden_sizes": [8, 4],
    }


def test_eqs_1_2_topk_reference_anomaly_by_hand():
    query = torch.tensor([[[1.0, 0.0], [0.0, 2.0]]])
    reference = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [-1.0, 0.0]])
    # query 1: cosines 1, 0, 1/sqrt2, -1 -> top 2 = 1 and 1/sqrt2; query 2: 0, 1, 1/sqrt2, 0 -> 1 and 1/sqrt2
    expected = 0.5 * (1 - (1 + 1 / math.sqrt(2)) / 2)
    # float32 cosines vs float64 constants rounded to float32: a few ulp, float32 defaults
    torch.testing.assert_close(
        functional_metacan.topk_reference_anomaly(query, reference, 2), torch.full((1, 2), expected)
    )
    # k = 3: query 1 -> (1 + 1/sqrt2 + 0)/3
    first = functional_metacan.topk_reference_anomaly(query, reference, 3)[0, 0]
    torch.testing.assert_close(first, torch.tensor(0.5 * (1 - (1 + 1 / math.sqrt(2)) / 3)))
    with pytest.raises(ValueError, match="nearest of 4"):
        functional_metacan.topk_reference_anomaly(query, reference, 5)


def test_eqs_3_4_image_image_score_sums_level_maxima():
    levels = [torch.tensor([[0.1, 0.4], [0.2, 0.0]]), torch.tensor([[0.3, 0.2], [0.5, 0.6]])]
    # float32 sums vs Python sums rounded to float32: <= 1 ulp, float32 defaults
    torch.testing.assert_close(
        functional_metacan.image_image_score(levels), torch.tensor([0.4 + 0.3, 0.2 + 0.6])
    )


def test_eq_8_fusion_and_ablations():
    image_image, image_text = torch.tensor([1.2, 0.3]), torch.tensor([0.8, 0.1])
    # float32 weighted means vs constants rounded to float32: a few ulp, float32 defaults
    torch.testing.assert_close(
        functional_metacan.metacan_fusion(image_image, image_text, 3), torch.tensor([0.5, 0.1])
    )
    torch.testing.assert_close(
        functional_metacan.metacan_fusion(image_image, None, 3), torch.tensor([0.4, 0.1])
    )
    torch.testing.assert_close(
        functional_metacan.metacan_fusion(None, image_text, 3), image_text, rtol=0, atol=0
    )  # passed through
    with pytest.raises(ValueError, match="at least one branch"):
        functional_metacan.metacan_fusion(None, None, 3)


def _hand_detector(m_it, params: dict, buffers: dict, detector_type: str, training: bool):
    """Eq. 7 written out layer by layer: "paper" W4^T (W3^T m), "official" Linear -> ReLU -> BatchNorm twice
    (batch statistics with the biased variance in training, running statistics in eval), then Linear."""
    if detector_type == "paper":
        logit = (m_it @ params["detector.0.weight"].T) @ params["detector.1.weight"].T
        return torch.sigmoid(logit).squeeze(-1)
    x = m_it
    for linear, norm in ((0, 2), (3, 5)):
        x = torch.relu(x @ params[f"detector.{linear}.weight"].T + params[f"detector.{linear}.bias"])
        if training:
            mean, variance = x.mean(0), x.var(0, unbiased=False)
        else:
            mean, variance = buffers[f"detector.{norm}.running_mean"], buffers[f"detector.{norm}.running_var"]
        x = (x - mean) / torch.sqrt(variance + 1e-5) * params[f"detector.{norm}.weight"]
        x = x + params[f"detector.{norm}.bias"]
    return torch.sigmoid(x @ params["detector.6.weight"].T + params["detector.6.bias"]).squeeze(-1)


def _hand_head(head, query_levels, reference_levels, text, training: bool = False) -> dict:
    """Eqs. 1-8 written out in float64 from the head's parameters and buffers."""
    config = head.config
    params, buffers = dict(head.named_parameters()), dict(head.named_buffers())
    k = reference_levels[0].shape[0]
    level_scores = []
    for query, reference in zip(query_levels, reference_levels):
        cosines = F.normalize(query, dim=-1) @ F.normalize(reference.flatten(0, 1), dim=-1).T  # Eq. 1
        m = 0.5 * (1 - cosines.sort(dim=-1, descending=True).values[..., :k].sum(-1) / k)  # Eq. 2
        level_scores.append(m.max(dim=-1).values)  # Eq. 3
    s_ii = sum(level_scores)  # Eq. 4
    difference = query_levels[-1] - reference_levels[-1].mean(0)
    d = torch.relu(difference @ params["differentiator.0.weight"].T) @ params["differentiator.2.weight"].T
    if config.differentiator_output_relu:
        d = torch.relu(d)  # Eq. 5 as the official code
    d = F.normalize(d, dim=-1)
    t = F.normalize(text, dim=-1)
    a = torch.exp(config.text_logit_scale * d @ t[1])
    n = torch.exp(config.text_logit_scale * d @ t[0])
    m_it = a / (a + n)  # Eq. 6
    s_it = _hand_detector(m_it, params, buffers, config.detector_type, training)  # Eq. 7
    return {"image_image": s_ii, "image_text_map": m_it, "image_text": s_it, "score": (s_ii + s_it) / 4}


def _float64_head(seed: int = 0, **config) -> CategoryToAnomalyHead:
    """A head on 9 patches (48 px) with every weight and BatchNorm statistic away from its initial value."""
    settings = {
        "clip_config": tiny_clip_config(),
        "image_size": 48,
        "feature_layers": [1, 2, 2],
        "differentiator_hidden_size": 6,
        "text_logit_scale": 3.0,
    }
    torch.manual_seed(seed)
    head = CategoryToAnomalyHead(MetaCanConfig(**(settings | config)), vision_width=4, embedding_size=3)
    head = head.double()
    with torch.no_grad():
        for parameter in head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.3)
        for name, buffer in head.named_buffers():
            if name.endswith("running_mean"):
                buffer.uniform_(0.0, 0.5)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 2.0)
    return head


def _float64_inputs(num_queries: int = 3):
    generator = torch.Generator().manual_seed(1)
    queries = [torch.randn(num_queries, 9, 4, dtype=torch.float64, generator=generator) for _ in range(3)]
    references = [torch.randn(3, 9, 4, dtype=torch.float64, generator=generator) for _ in range(3)]
    return queries, references, torch.randn(2, 3, dtype=torch.float64, generator=generator)


@pytest.mark.parametrize("output_relu", [True, False])
@pytest.mark.parametrize("detector_type", ["official", "paper"])
def test_head_computes_eqs_1_to_8_in_float64(detector_type, output_relu):
    head = _float64_head(detector_type=detector_type, differentiator_output_relu=output_relu).eval()
    queries, references, text = _float64_inputs()
    outputs = head(queries, references, text)
    expected = _hand_head(head, queries, references, text)
    for name, value in expected.items():
        # float64 on both sides, same operations in a different order: agreement to ~1e-15, rel/abs 1e-12
        torch.testing.assert_close(outputs[name], value, rtol=1e-12, atol=1e-12)
    assert outputs["level_maps"].shape == (3, 3, 9)


def test_official_detector_in_training_mode_normalises_with_the_batch_statistics():
    head = _float64_head().train()
    queries, references, text = _float64_inputs(num_queries=4)
    trained = head(queries, references, text)["image_text"]
    expected = _hand_head(head, queries, references, text, training=True)["image_text"]
    torch.testing.assert_close(trained, expected, rtol=1e-12, atol=1e-12)  # float64 both sides
    evaluated = head.eval()(queries, references, text)["image_text"]
    assert (trained - evaluated).abs().max() > 0.01  # running statistics differ from the batch's


def test_detector_layers_are_the_documented_ones():
    official = _float64_head(detector_type="official").detector
    # 9 patches -> 18 -> 9 -> 1, each Linear with a bias, ReLU then BatchNorm after each hidden Linear
    assert [type(layer).__name__ for layer in official] == [
        "Linear", "ReLU", "BatchNorm1d", "Linear", "ReLU", "BatchNorm1d", "Linear"
    ]  # fmt: skip
    assert {name: tuple(p.shape) for name, p in official.named_parameters()} == {
        "0.weight": (18, 9), "0.bias": (18,), "2.weight": (18,), "2.bias": (18,),
        "3.weight": (9, 18), "3.bias": (9,), "5.weight": (9,), "5.bias": (9,),
        "6.weight": (1, 9), "6.bias": (1,),
    }  # fmt: skip
    paper = _float64_head(detector_type="paper").detector
    assert {name: tuple(p.shape) for name, p in paper.named_parameters()} == {
        "0.weight": (18, 9),
        "1.weight": (1, 18),
    }
    assert not list(paper.buffers())
    tiny = {"clip_config": tiny_clip_config(), "feature_layers": [1, 2]}
    with pytest.raises(ValueError, match="two matrices"):
        MetaCanConfig(**tiny, detector_type="paper", detector_hidden_sizes=[4, 2])
    with pytest.raises(ValueError, match="detector_type"):
        MetaCanConfig(**tiny, detector_type="layernorm")


def test_defaults_are_the_official_code():
    config = MetaCanConfig(clip_config=tiny_clip_config(), feature_layers=[1, 2])
    assert config.differentiator_output_relu and config.detector_type == "official"
    assert config.text_logit_scale == 100.0 and config.paper_preprocessing == "crop"
    assert config.detector_widths == [450, 225]  # 225 patches at 240 px: 225 -> 450 -> 225 -> 1
    paper_size = MetaCanConfig(clip_config=vit_b16_plus_240_config())
    head = CategoryToAnomalyHead(paper_size, vision_width=896, embedding_size=640)
    assert sum(p.numel() for p in head.parameters()) == 1_777_615  # the paper's Table 6


def test_differentiator_output_relu_keeps_d_non_negative_and_moves_m_it():
    with_relu = _float64_head(differentiator_output_relu=True).eval()
    without = _float64_head(differentiator_output_relu=False).eval()  # same seed: the same weights
    queries, references, text = _float64_inputs()
    difference = queries[-1] - references[-1].mean(0)
    assert with_relu.differentiator(difference).min() >= 0
    assert without.differentiator(difference).min() < 0
    moved = (
        with_relu(queries, references, text)["image_text_map"]
        - without(queries, references, text)["image_text_map"]
    )
    assert moved.abs().max() > 0.05


def test_prompts_are_table_5_with_the_prompt_object_each_normalised_then_averaged():
    """With prompt_object="part" (default "object"), as a literal."""
    from hf_fsad.prompts import winclip_prompts

    model = MetaCanModelTester.tiny_model(prompt_object="part")
    normal, anomalous = winclip_prompts("part")
    assert (len(normal), len(anomalous)) == (7 * 22, 4 * 22)  # Table 5: 7 and 4 states x 22 templates
    assert "a photo of the flawless part for anomaly detection." in normal
    assert "a close-up photo of a part with defect." in anomalous
    with torch.no_grad():
        expected = torch.stack(
            [
                F.normalize(F.normalize(model.backbone.encode_text(p), dim=-1).mean(0), dim=-1)
                for p in (normal, anomalous)
            ]
        )
    # the same float32 operations as the model's; only the text batch differs (cached vs fresh)
    torch.testing.assert_close(model.text_embeddings(), expected, rtol=1e-5, atol=1e-6)


def test_model_scores_equal_head_on_bank_and_maps_upsample_the_image_text_map():
    model = MetaCanModelTester.tiny_model()
    torch.manual_seed(1)
    references, images = torch.randn(3, 3, 240, 240), torch.randn(2, 3, 240, 240)
    bank = model.build_reference_bank(references, "screw")
    assert bank.k == 3 and bank.class_name == "screw"
    output = model(images, reference_bank=bank)
    features = model.encode_images(images)
    head = model.head(model.levels(features), model.levels(bank.tensors), bank.tensors["text_embeddings"])
    # the forward pass runs these same ops on the same batch: bit-identical
    torch.testing.assert_close(output.image_scores, head["score"], rtol=0, atol=0)
    torch.testing.assert_close(
        output.anomaly_maps, model.to_pixel_maps(head["image_text_map"]), rtol=0, atol=0
    )
    torch.testing.assert_close(
        output.branch_scores["image_image.block1"], head["level_maps"][0].amax(-1), rtol=0, atol=0
    )
    # Raw tokens after blocks 1 and 2, without the CLS token.
    encoded = model.backbone.encode_image(images, layers=[1, 2])
    torch.testing.assert_close(features["tokens.1"], encoded.hidden_states[1], rtol=0, atol=0)  # same ops
    # The prompts are object-agnostic: the bank's class name does not change the text embeddings.
    other = model.build_reference_bank(references, "bottle")
    assert torch.equal(other.tensors["text_embeddings"], bank.tensors["text_embeddings"])  # cached


def test_a_query_equal_to_a_reference_scores_zero_in_every_level():
    model = MetaCanModelTester.tiny_model(use_detector=False)
    torch.manual_seed(2)
    images = torch.randn(1, 3, 240, 240)
    output = model(images, reference_bank=model.build_reference_bank(images))
    # float32 cosine of a token with itself is 1 within a few ulp: (1 - cos) / 2 summed < 1e-6
    torch.testing.assert_close(output.image_scores, torch.zeros(1), atol=1e-6, rtol=0)


def test_ablations_change_the_score_as_table_4():
    torch.manual_seed(3)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    full = MetaCanModelTester.tiny_model()
    out = full(images, reference_bank=full.build_reference_bank(references))
    no_detector = MetaCanModelTester.tiny_model(use_detector=False)
    ablated = no_detector(images, reference_bank=no_detector.build_reference_bank(references))
    # float32 defaults: the same branch score, halved by the fusion (Eq. 8) in another order
    torch.testing.assert_close(ablated.image_scores, out.branch_scores["image_image"] / 2)
    assert ablated.anomaly_maps is None and "image_text" not in ablated.branch_scores
    no_discriminator = MetaCanModelTester.tiny_model(use_discriminator=False)
    ablated = no_discriminator(images, reference_bank=no_discriminator.build_reference_bank(references))
    # float32 defaults: the image-text score, through the fusion's arithmetic
    torch.testing.assert_close(ablated.image_scores, out.branch_scores["image_text"])
    with pytest.raises(ValueError, match="cannot both be False"):
        MetaCanModelTester.tiny_model(use_detector=False, use_discriminator=False)


@pytest.mark.parametrize("detector_type", ["official", "paper"])
def test_in_eval_mode_a_querys_score_ignores_its_batch(detector_type):
    model = MetaCanModelTester.tiny_model(detector_type=detector_type, detector_hidden_sizes=[8])
    torch.manual_seed(4)
    bank = model.build_reference_bank(torch.randn(2, 3, 240, 240))
    images = torch.randn(4, 3, 240, 240)
    evaluated = model.eval()(images, reference_bank=bank).image_scores
    single = torch.cat([model(image[None], reference_bank=bank).image_scores for image in images])
    # the same float32 operations on a batch of 1 or 4: matrix kernels may sum in another order
    torch.testing.assert_close(evaluated, single, rtol=1e-5, atol=1e-6)
    trained = model.train()(images, reference_bank=bank).image_scores
    if detector_type == "paper":  # no normalisation: training mode computes the same function
        torch.testing.assert_close(trained, evaluated, rtol=1e-5, atol=1e-6)
    else:  # BatchNorm: the batch's statistics in training mode
        assert (trained - evaluated).abs().max() > 1e-3


def test_save_load_round_trip_is_exact_and_auto_model_loads_it(tmp_path):
    model = MetaCanModelTester.tiny_model(detector_hidden_sizes=[8, 4])
    with torch.no_grad():
        for parameter in model.head.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.1)
        for name, buffer in model.head.named_buffers():
            if name.endswith(("running_mean", "running_var")):
                buffer.uniform_(0.5, 1.5)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_fsad.MetaCanModel) and not loaded.training
    assert loaded.config.detector_hidden_sizes == [8, 4]
    for name, buffer in model.head.named_buffers():  # BatchNorm running statistics travel with the weights
        assert torch.equal(dict(loaded.head.named_buffers())[name], buffer)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    assert all(p.requires_grad for p in loaded.head.parameters())
    torch.manual_seed(5)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    expected = model(images, reference_bank=model.build_reference_bank(references)).image_scores
    actual = loaded(images, reference_bank=loaded.build_reference_bank(references)).image_scores
    assert torch.equal(expected, actual)


def test_clear_errors(tiny_winclip):
    model = MetaCanModelTester.tiny_model()
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

    model = MetaCanModelTester.tiny_model()
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
