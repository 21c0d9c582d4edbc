"""AF-CLIP / AF-CLIP+ (ACM MM 2025): Eqs. 3-18 on small tensors, prompts, LoRA, save/load, toy training."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from transformers import AutoModel

import hf_fsad
from hf_fsad.backbones.clip import ClipBackbone
from hf_fsad.data import load_benchmark
from hf_fsad.metrics.functional import image_auroc, pixel_auroc
from hf_fsad.models.afclip import functional_afclip
from hf_fsad.models.afclip.configuration_afclip import AfClipConfig
from hf_fsad.models.afclip.losses_afclip import afclip_loss, patch_alignment_loss, segmentation_loss
from hf_fsad.models.afclip.modeling_afclip import AfClipModel, AttentionAdapter, encode_text_with_context
from hf_fsad.testing import byte_level_clip_tokenizer, small_clip_config, tiny_clip_config
from hf_fsad.training.losses import focal_loss
from hf_fsad.visualization import mask_array
from model_tester import ModelTester

REPO = Path(__file__).resolve().parents[1]
SMALL = {"feature_layers": [1, 2], "adapter_num_heads": 2, "adapter_head_dim": 8, "num_context_tokens": 3}


class AfClipModelTester(ModelTester):
    model_type = "afclip"
    config = SMALL


def make_tiny_afclip(seed: int = 0, **config) -> AfClipModel:
    """The tester's tiny model, with a LoRA rank for the tests that switch to the LoRA adapter."""
    return AfClipModelTester.tiny_model(seed, **({"lora_rank": 4} | config))


def test_eq_5_gaussian_window_weights_by_hand():
    # exp(0) / 1: exact
    assert torch.equal(
        functional_afclip.gaussian_window_weights(1, 4.0), torch.ones(1, 1, dtype=torch.float64)
    )
    edge, corner = math.exp(-1 / 32), math.exp(-2 / 32)
    raw = torch.tensor(
        [[corner, edge, corner], [edge, 1.0, edge], [corner, edge, corner]], dtype=torch.float64
    )
    # float64 defaults (rtol 1e-7): the same exponentials, normalised in another order (~1e-16)
    torch.testing.assert_close(functional_afclip.gaussian_window_weights(3, 4.0), raw / raw.sum())
    # a float64 sum of 25 weights: ~25 * 1.1e-16, rel 1e-12 leaves room
    assert functional_afclip.gaussian_window_weights(5, 4.0).sum().item() == pytest.approx(1.0, rel=1e-12)
    with pytest.raises(ValueError, match="odd"):
        functional_afclip.gaussian_window_weights(2, 4.0)


def test_eqs_5_6_spatial_aggregation_keeps_cls_and_zero_pads():
    torch.manual_seed(0)
    tokens = torch.randn(1, 1 + 16, 3, dtype=torch.float64)
    # float64 defaults: a 1 x 1 window of weight 1 (sums of x * 1 and zero padding, ~1e-16)
    torch.testing.assert_close(functional_afclip.spatial_aggregation(tokens, (4, 4), 1, 4.0), tokens)
    aggregated = functional_afclip.spatial_aggregation(tokens, (4, 4), 3, 4.0)
    torch.testing.assert_close(aggregated[:, 0], tokens[:, 0], rtol=0, atol=0)  # CLS untouched
    weights = functional_afclip.gaussian_window_weights(3, 4.0)
    grid = tokens[0, 1:].reshape(4, 4, 3)
    interior = sum(weights[dy + 1, dx + 1] * grid[1 + dy, 2 + dx] for dy in (-1, 0, 1) for dx in (-1, 0, 1))
    # float64 defaults (rtol 1e-7): a 9-term weighted sum in another order (~1e-16)
    torch.testing.assert_close(aggregated[0, 1 + 1 * 4 + 2], interior)
    corner = sum(weights[dy + 1, dx + 1] * grid[dy, dx] for dy in (0, 1) for dx in (0, 1))  # zeros outside
    torch.testing.assert_close(aggregated[0, 1], corner)


@pytest.mark.parametrize("mode", ["reflect", "mirror"])
def test_gaussian_blur_matches_scipy_on_a_map_with_a_bright_border(mode):
    """The border mode shows where the map is brightest: at its edge. sigma 4 (AF-CLIP's) gives radius 16, more
    than the 12-pixel side, so the extension wraps around more than once; sigma 1 covers the usual case."""
    maps = torch.rand(2, 12, 20, dtype=torch.float64) * 0.1
    maps[:, 0, :] = maps[:, :, -1] = 1.0
    for sigma in (1.0, 4.0):
        expected = np.stack([gaussian_filter(m, sigma=sigma, mode=mode) for m in maps.numpy()])
        # both float64; they differ only in the order of the sums (~1e-16): float64 defaults
        torch.testing.assert_close(
            functional_afclip.gaussian_blur(maps, sigma, mode), torch.from_numpy(expected)
        )
    other = "mirror" if mode == "reflect" else "reflect"
    assert (
        functional_afclip.gaussian_blur(maps, 4.0, mode) - functional_afclip.gaussian_blur(maps, 4.0, other)
    ).abs().max() > 1e-3
    with pytest.raises(ValueError, match="blur mode"):
        functional_afclip.gaussian_blur(maps, 4.0, "nearest")


def test_eqs_3_4_attention_adapter_by_hand_without_residual():
    torch.manual_seed(1)
    adapter = AttentionAdapter(width=6, num_heads=2, head_dim=3).double()
    tokens = torch.randn(2, 5, 6, dtype=torch.float64)
    normed = F.layer_norm(tokens, (6,), adapter.norm.weight, adapter.norm.bias)
    heads = []
    for head in range(2):
        rows = slice(3 * head, 3 * head + 3)
        q, k, v = (normed @ layer.weight[rows].T for layer in (adapter.query, adapter.key, adapter.value))
        heads.append(torch.softmax(q @ k.transpose(1, 2) / math.sqrt(3), dim=-1) @ v)
    expected = torch.cat(heads, dim=-1) @ adapter.output.weight.T + adapter.output.bias
    # float64 defaults (rtol 1e-7): the same ops, heads fused vs one by one (reduction order)
    torch.testing.assert_close(adapter(tokens), expected)
    assert adapter.query.bias is None and adapter.output.bias is not None
    with torch.no_grad():
        adapter.output.weight.zero_()
        adapter.output.bias.zero_()
    assert torch.equal(adapter(tokens), torch.zeros_like(tokens))  # no residual path


@pytest.mark.parametrize("placement", ["after_start", "before_start"])
def test_eq_8_prompt_context_placement_and_end_of_text_index(placement):
    """Learned tokens equal to the embeddings of real words: the prompt must embed as the token sequence
    built by hand, [context, SOT, words, EOT] ("before_start", the official code's) or [SOT, context, words,
    EOT] ("after_start"), pooled at its end-of-text token."""
    torch.manual_seed(2)
    backbone = ClipBackbone(tiny_clip_config()).eval()
    backbone.tokenizer = byte_level_clip_tokenizer()
    context_ids = backbone.tokenizer(["a photo of"], return_tensors="pt").input_ids[0, 1:-1]
    context = backbone.clip.text_model.embeddings.token_embedding(context_ids).detach()
    prompts = ["without defect.", "with a long defect."]
    with torch.no_grad():
        together = encode_text_with_context(backbone, prompts, context, placement)
        alone = encode_text_with_context(backbone, prompts[:1], context, placement)
        for prompt, embedding in zip(prompts, together):
            start, *words, end = backbone.tokenizer(prompt)["input_ids"]
            if placement == "before_start":
                sequence = [*context_ids.tolist(), start, *words, end]
            else:
                sequence = [start, *context_ids.tolist(), *words, end]
            # transformers pools a sequence at its first end-of-text token
            expected = backbone.clip.get_text_features(input_ids=torch.tensor([sequence])).pooler_output[0]
            # float32, same weights; padding changes the attention's reduction length only (~1e-7)
            torch.testing.assert_close(embedding, expected, rtol=1e-5, atol=1e-6)
    # The pooled token is each prompt's own end-of-text token, whatever the padding around it.
    torch.testing.assert_close(together[:1], alone, rtol=1e-5, atol=1e-6)  # as above: padding only
    gradient = torch.autograd.grad(
        encode_text_with_context(backbone, ["with defect."], context.requires_grad_(), placement).sum(),
        context,
    )[0]
    assert gradient.abs().sum() > 0


def test_the_default_prompt_placement_is_the_official_codes():
    assert AfClipConfig(clip_config=tiny_clip_config()).context_placement == "before_start"


def test_eqs_9_10_token_probabilities_by_hand():
    sets = [torch.tensor([[[1.0, 0.0], [0.0, 1.0]]]), torch.tensor([[[1.0, 1.0], [0.0, 2.0]]])]
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])  # normal, anomalous
    # token 0: cos normal 1 + 1/sqrt2, anomalous 0 + 1/sqrt2; token 1: normal 0 + 0, anomalous 1 + 1
    logits = torch.tensor([[1 + 2**-0.5, 2**-0.5], [0.0, 2.0]]) / 0.07
    expected = logits.softmax(-1)[:, 1][None]
    # float32 cosines and softmax vs the same formula on float32 constants: float32 defaults
    torch.testing.assert_close(functional_afclip.afclip_token_probabilities(sets, text, 0.07), expected)


def test_eqs_11_to_15_losses_by_hand():
    p, y = torch.tensor([0.8, 0.3]), torch.tensor([1, 0])
    expected_focal = [-(0.2**4) * math.log(0.8), -(0.3**4) * math.log(0.7)]
    # float32 log and powers vs Python float64: ~1 ulp each, inside the float32 defaults
    torch.testing.assert_close(focal_loss(p, y, gamma=4.0), torch.tensor(expected_focal))
    maps, masks = torch.tensor([[0.9, 0.2, 0.1, 0.6]]), torch.tensor([[1, 0, 0, 0]])
    focal = [
        -(0.1**4) * math.log(0.9),
        -(0.2**4) * math.log(0.8),
        -(0.1**4) * math.log(0.9),
        -(0.6**4) * math.log(0.4),
    ]
    l1 = (0.1 + 0.2 + 0.1 + 0.6) / 4
    # float32 focal + L1 over 4 pixels vs float64: ~10 ops of 6e-8 relative -> 1e-6
    assert segmentation_loss(maps, masks).item() == pytest.approx(np.mean(focal) + l1, rel=1e-6)

    torch.manual_seed(3)
    features = torch.randn(3, 6, 4, dtype=torch.float64)
    patch_masks = torch.tensor([[1, 1, 0, 0, 0, 0], [0] * 6, [1, 0, 1, 0, 0, 0]], dtype=torch.bool)
    unit = F.normalize(features, dim=-1)
    values = []
    for image in (0, 2):  # image 1 has no anomalous patch: left out
        cos = unit[image] @ unit[image].T
        a, n = patch_masks[image], ~patch_masks[image]
        cross = cos[a][:, n].mean()
        same_pairs = [cos[i, j] for i in range(6) for j in range(6) if i != j and a[i] == a[j]]
        values.append(torch.relu(cross - torch.stack(same_pairs).mean()))
    # float64 loss rounded to float32 vs the float32 cast here: float32 defaults (<= 1 ulp)
    torch.testing.assert_close(
        patch_alignment_loss(features, patch_masks, pairs="image"), torch.stack(values).mean().float()
    )
    for pairs in ("batch", "image"):
        assert patch_alignment_loss(features, torch.zeros(3, 6, dtype=torch.bool), pairs).item() == 0.0
        assert patch_alignment_loss(features, torch.ones(3, 6, dtype=torch.bool), pairs).item() == 0.0
        # N-A pairs less similar than same-label pairs: no loss
        separated = torch.tensor([[[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0]]])
        mask = torch.tensor([[1, 1, 0, 0]], dtype=torch.bool)
        assert patch_alignment_loss(separated, mask, pairs).item() == 0.0

    probabilities = torch.tensor([[0.7, 0.9, 0.2, 0.1, 0.6], [0.2, 0.1, 0.1, 0.2, 0.3]])
    labels, grid = torch.tensor([1, 0]), torch.tensor([[1, 0, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    sets = [torch.randn(2, 5, 4)]
    terms = afclip_loss(
        probabilities, labels, grid, sets, gamma=4.0, segmentation_weight=0.5, alignment_weight=2.0
    )
    expected = (
        focal_loss(probabilities[:, 0], labels, gamma=4.0).mean()
        + 0.5 * segmentation_loss(probabilities[:, 1:], grid)
        + 2.0 * patch_alignment_loss(sets[0][:, 1:], grid)
    )
    # float32 defaults: the same three terms, summed in another order
    torch.testing.assert_close(terms["total"], expected)


def test_eq_14_patch_alignment_pools_the_batch_as_the_official_code_or_goes_image_by_image():
    """Image A: normal e1, e2 and anomalous e1; image B (all normal): e1, -e1, e2. Every cosine is 0, 1 or -1.

    Official ("batch"): N-A pairs, all in A: cos(e1, e1) = 1, cos(e2, e1) = 0 -> mean 1/2. Same-label pairs,
    self pairs and image B included: A has 2x2 normal + 1 anomalous pair, sum 1+0+0+1 + 1 = 3; B has 9 pairs,
    sum 3 (self) + 2 x cos(e1, -e1) = 1. Mean 4/14, loss max(0, 1/2 - 2/7) = 3/14.
    Per image ("image"): only A counts, same-label pairs i != j: cos(e1, e2) twice, mean 0: loss 1/2.
    """
    e1, e2 = [1.0, 0.0], [0.0, 1.0]
    features = torch.tensor([[e1, e2, e1], [e1, [-1.0, 0.0], e2]])
    masks = torch.tensor([[0, 0, 1], [0, 0, 0]], dtype=torch.bool)
    # float32 arithmetic on exact cosines: a few ulp (6e-8), within approx's default relative 1e-6
    assert patch_alignment_loss(features, masks, pairs="batch").item() == pytest.approx(3 / 14)
    assert patch_alignment_loss(features, masks, pairs="image").item() == pytest.approx(1 / 2)
    # Without image B the self pairs alone lift the same-label mean to 3/5 > 1/2: no loss in the official form.
    assert patch_alignment_loss(features[:1], masks[:1], pairs="batch").item() == 0.0
    with pytest.raises(ValueError, match="pairs"):
        patch_alignment_loss(features, masks, pairs="set")


def test_eq_13_masks_reach_the_patch_grid_by_bilinear_sampling_then_the_0_5_threshold(tmp_path):
    """As the official code: the mask resized bilinearly (no antialiasing) to the 15x15 grid of 16-pixel
    patches, each patch reading the pixels around its centre (16i + 7.5), then > 0.5. White rows 0-24 and
    columns 0-8: patch rows 0 (pixels 7, 8) and 1 (23, 24) are inside; patch column 0 (pixels 7, 8) is,
    column 1 (23, 24) is not, although the white covers 9/16 of it."""
    from datasets import Dataset
    from PIL import Image

    from hf_fsad.data.common import FEATURES
    from hf_fsad.models.afclip.training_afclip import AfClipTrainer, AfClipTrainingArguments

    mask = np.zeros((240, 240), dtype=np.uint8)
    mask[:25, :9] = 255
    row = {"image": Image.new("RGB", (240, 240)), "mask": Image.fromarray(mask), "label": 1}
    data = Dataset.from_list([row | {"category": "x", "defect_type": "x", "path": "x"}], features=FEATURES)
    trainer = AfClipTrainer(make_tiny_afclip(), data, AfClipTrainingArguments(batch_size=1), tmp_path)
    expected = torch.zeros(15, 15, dtype=torch.bool)
    expected[:2, 0] = True
    assert torch.equal(trainer.patch_masks([0]), expected.flatten()[None])


def test_zero_shot_and_few_shot_outputs_follow_eqs_10_17_18():
    """At non-default values of every scoring field, each written here as a literal: aggregation windows
    [1, 3] with sigma 2 (Eqs. 5-6), temperature 0.5 (Eq. 10), map smoothing sigma 2 and memory weight 0.3
    (Eq. 18)."""
    model = make_tiny_afclip(
        aggregation_windows=[1, 3], aggregation_sigma=2.0, temperature=0.5, map_smoothing_sigma=2.0,
        memory_weight=0.3,
    )  # fmt: skip
    torch.manual_seed(4)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)

    def token_sets(pixel_values):
        features = model.encode_images(pixel_values)
        return [
            functional_afclip.spatial_aggregation(features[f"tokens.{layer}"], (15, 15), window, 2.0)
            for layer in (1, 2)
            for window in (1, 3)
        ]

    query_sets = token_sets(images)
    text = model.text_embeddings().detach()
    probabilities = functional_afclip.afclip_token_probabilities(model.project_sets(query_sets), text, 0.5)
    zero_shot = model(images)
    # the forward pass runs the same ops on the same batch: bit-identical
    torch.testing.assert_close(zero_shot.image_scores, probabilities[:, 0], rtol=0, atol=0)
    torch.testing.assert_close(
        zero_shot.anomaly_maps,
        functional_afclip.gaussian_blur(model.to_pixel_maps(probabilities[:, 1:]), 2.0, "reflect"),
        rtol=0,
        atol=0,
    )

    bank = model.build_reference_bank(references, "bottle")
    assert bank.k == 2 and len([n for n in bank.tensors if n.startswith("memory.")]) == 2 * 2
    few_shot = model(images, reference_bank=bank)
    memory = torch.stack(
        [
            (1 - (F.normalize(q[:, 1:], dim=-1) @ F.normalize(r[:, 1:].flatten(0, 1), dim=-1).T).amax(-1)) / 2
            for q, r in zip(query_sets, token_sets(references))
        ]
    ).mean(0)
    # float32 cosines, mean of 4 sets, another memory chunking than the model's: ~1e-7 abs each, 1e-5 rel
    torch.testing.assert_close(few_shot.branch_scores["memory"], memory.amax(-1), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(
        few_shot.image_scores, memory.amax(-1) + 0.3 * probabilities[:, 0], rtol=1e-5, atol=1e-6
    )
    memory_maps = functional_afclip.gaussian_blur(model.to_pixel_maps(memory), 2.0, "reflect")
    expected_maps = memory_maps + 0.3 * zero_shot.anomaly_maps
    torch.testing.assert_close(few_shot.anomaly_maps, expected_maps, rtol=1e-5, atol=1e-6)
    # A query that is one of the references has nothing unusual for the memory.
    same = model(references[:1], reference_bank=bank)
    # float32 cosine of a token with itself: 1 within a few ulp, so (1 - cos) / 2 < 1e-6
    assert same.branch_scores["memory"].item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("adapter_type", ["attention", "lora"])
def test_only_prompts_and_adapter_train_and_the_backbone_stays_frozen_after_loading(tmp_path, adapter_type):
    model = make_tiny_afclip(adapter_type=adapter_type)
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_fsad.AfClipModel)
    trainable = {name for name, p in loaded.named_parameters() if p.requires_grad}
    if adapter_type == "attention":
        assert trainable == {"context", *(f"adapter.{name}" for name, _ in loaded.adapter.named_parameters())}
    else:
        assert "context" in trainable and all("lora_" in name for name in trainable - {"context"})
        assert len(trainable) == 1 + 2 * 4 * 2  # A and B of q/k/v/out in blocks 1 and 2
    assert not any(p.requires_grad for name, p in loaded.backbone.named_parameters() if "lora_" not in name)


@pytest.mark.parametrize("adapter_type", ["attention", "lora"])
def test_save_load_round_trip_is_exact(tmp_path, adapter_type):
    model = make_tiny_afclip(adapter_type=adapter_type)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.05)  # LoRA's B starts at zero
    torch.manual_seed(5)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    expected = model(images, reference_bank=model.build_reference_bank(references))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    actual = loaded(images, reference_bank=loaded.build_reference_bank(references))
    assert torch.equal(actual.image_scores, expected.image_scores)
    assert torch.equal(actual.anomaly_maps, expected.anomaly_maps)


def test_merged_lora_matches_unmerged():
    model = make_tiny_afclip(adapter_type="lora")
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.normal_(std=0.05)
    torch.manual_seed(6)
    references, images = torch.randn(2, 3, 240, 240), torch.randn(2, 3, 240, 240)
    unmerged = model(images, reference_bank=model.build_reference_bank(references))
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    model.merge_lora()
    assert model.config.adapter_type == "none"
    assert not any("lora_" in name for name, _ in model.named_parameters())
    # Every tensor: W + (alpha / r) B A where LoRA was, the base bias, and all others untouched.
    merged = model.state_dict()
    assert merged.keys() == {name.replace(".base_layer", "") for name in before if "lora_" not in name}
    scaling = model.config.lora_alpha / model.config.lora_rank
    folded = 0
    for name, tensor in merged.items():
        module, _, leaf = name.rpartition(".")
        if f"{module}.base_layer.{leaf}" not in before:
            assert torch.equal(tensor, before[name]), name
        elif leaf == "bias":
            assert torch.equal(tensor, before[f"{module}.base_layer.bias"]), name
        else:
            lora_b, lora_a = (before[f"{module}.lora_{part}.default.weight"].double() for part in "BA")
            expected = before[f"{module}.base_layer.weight"].double() + scaling * lora_b @ lora_a
            # float32 merge against float64: a rank-4 product and one add of values below 1, a few ulps
            torch.testing.assert_close(tensor.double(), expected, rtol=0, atol=1e-6)
            folded += 1
    assert folded == len(model.config.feature_layers) * len(model.config.lora_target_modules)
    merged = model(images, reference_bank=model.build_reference_bank(references))
    # merged weights round differently (~6e-8) through 2 blocks and the memory cosines: 1e-5 bound
    torch.testing.assert_close(merged.image_scores, unmerged.image_scores, rtol=0, atol=1e-5)
    torch.testing.assert_close(merged.anomaly_maps, unmerged.anomaly_maps, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="no LoRA"):
        model.merge_lora()


def _auroc(model, data, k: int) -> tuple[float, float]:
    processor = model.image_processor()
    test = processor(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values
    bank = None
    if k:
        references = [image.convert("RGB") for image in data["train"]["image"][:k]]
        bank = model.build_reference_bank(processor(references, return_tensors="pt").pixel_values)
    output = model.eval()(test, reference_bank=bank)
    masks = np.stack([mask_array(mask, model.config.image_size) for mask in data["test"]["mask"]])
    labels = np.asarray(data["test"]["label"])
    return image_auroc(labels, output.image_scores.numpy()), pixel_auroc(masks, output.anomaly_maps.numpy())


def test_toy_training_improves_zero_shot_on_unseen_images_and_two_shot_beats_zero_shot(tmp_path, one_thread):
    from hf_fsad.models.afclip.training_afclip import AfClipTrainer, AfClipTrainingArguments
    from hf_fsad.testing import save_random_clip
    from hf_fsad.training.recipes import _auxiliary_dataset, build_model, load_config

    clip = save_random_clip(small_clip_config(), tmp_path / "clip")
    config = load_config(
        REPO / "training" / "configs" / "afclip_toy.yaml",
        [f"model.clip={clip}", "data.categories=[weave]", "training.max_steps=200"],
    )
    args = AfClipTrainingArguments(**config["training"])
    model = build_model(config["model"], args.seed, config["method"])
    unseen = load_benchmark(
        "toy", category="weave", seed=1, num_train=4, num_test_good=12, num_test_anomalous=12
    )
    before = _auroc(model, unseen, 0)
    result = AfClipTrainer(model, _auxiliary_dataset(config["data"]), args, tmp_path / "run").train()
    after, two_shot = _auroc(model, unseen, 0), _auroc(model, unseen, 2)
    print(
        f"zero-shot image/pixel AUROC {before} -> {after}; 2-shot {two_shot}; {result.seconds_per_step:.3f} s/step"
    )
    # Everything is seeded (random CLIP, model init, batches, toy images) and one thread fixes the float32
    # reductions; measured image/pixel AUROC: zero-shot 0.514/0.603 -> 0.882/0.946, 2-shot 1.000/0.998. The
    # margins to the thresholds: 0.27/0.24 for the gains, 0.12/0.05 for 2-shot over zero-shot.
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.1
    assert two_shot[0] > after[0] and two_shot[1] > after[1]
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_lora_training_changes_only_lora_and_context(tmp_path):
    from hf_fsad.models.afclip.training_afclip import AfClipTrainer, AfClipTrainingArguments

    model = make_tiny_afclip(adapter_type="lora")
    data = load_benchmark("toy", category="weave", num_train=1, num_test_good=2, num_test_anomalous=2)["test"]
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    AfClipTrainer(
        model, data, AfClipTrainingArguments(batch_size=4, max_steps=2, learning_rate=0.01), tmp_path
    ).train()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert "context" in changed and any("lora_B" in name for name in changed)
    assert all(name == "context" or "lora_" in name for name in changed)


@pytest.mark.slow
def test_torchrun_two_cpu_processes_share_batches_and_stay_identical(tmp_path):
    """Each of 2 processes takes every other row of the same batch; the logged loss is the mean of theirs."""
    import json
    import os
    import subprocess
    import sys

    from hf_fsad.models.afclip.training_afclip import AfClipTrainer, AfClipTrainingArguments
    from hf_fsad.testing import save_random_clip
    from hf_fsad.training.recipes import _auxiliary_dataset, build_model, load_config

    clip = save_random_clip(tiny_clip_config(), tmp_path / "clip")
    config_path = REPO / "training" / "configs" / "afclip_toy.yaml"
    overrides = [f"model.clip={clip}", "data.num_test_good=2", "data.num_test_anomalous=4"]
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [
        str(torchrun), "--standalone", "--nproc_per_node", "2", str(REPO / "training" / "train_afclip.py"),
        "--config", str(config_path), "--output-dir", str(tmp_path / "run"), "--max-steps", "3",
        "--set", *overrides,
    ]  # fmt: skip
    completed = subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    summary = json.loads((tmp_path / "run" / "training_summary.json").read_text())
    digests = summary["result"]["rank_parameter_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]  # bit-identical ranks
    first = summary["result"]["history"][0]
    assert first["step"] == 1  # batch 0, at the initial parameters

    # Batch 0's loss in float64 in this process: each half alone, and the whole batch.
    config = load_config(config_path, overrides)
    args = AfClipTrainingArguments(**config["training"])
    model = build_model(config["model"], args.seed, config["method"]).double().train()
    trainer = AfClipTrainer(model, _auxiliary_dataset(config["data"]), args, None)
    batch = trainer.batch_rows(0)
    with torch.no_grad():
        whole = trainer.compute_loss(0).item()
        halves = []
        for share in (batch[0::2], batch[1::2]):
            trainer.batch_rows = lambda index, share=share: share
            halves.append(trainer.compute_loss(0).item())
    # 1e-4: about 6 times the float32-vs-float64 difference of this loss (1.6e-5 on 9.96, measured). The
    # whole batch's loss is 2.1e-3 from the mean of the halves (the patch alignment loss averages over the
    # images that have both kinds of patch) and each half's over 1.7 from it, so a process that took the
    # whole batch, or both taking the same half, fails.
    tolerance = 1e-4
    assert first["loss"] == pytest.approx(sum(halves) / 2, abs=tolerance)
    assert min(abs(whole - sum(halves) / 2), abs(halves[0] - halves[1]) / 2) > 4 * tolerance


def test_methods_with_equal_feature_keys_compute_equal_features():
    """The benchmark runner shares cached features between models whose `feature_key()` match."""
    from test_metacan import MetaCanModelTester

    metacan, afclip = (
        MetaCanModelTester.tiny_model(feature_layers=[1, 2]),
        make_tiny_afclip(feature_layers=[1, 2]),
    )
    afclip.backbone.load_state_dict(metacan.backbone.state_dict())
    assert metacan.feature_key() == afclip.feature_key()
    images = torch.randn(1, 3, 240, 240)
    first, second = metacan.encode_images(images), afclip.encode_images(images)
    assert first.keys() == second.keys() and all(torch.equal(first[name], second[name]) for name in first)


def test_from_clip_loads_the_clip_weights_under_lora_layers(tiny_clip_dir):
    from transformers import CLIPModel

    clip = CLIPModel.from_pretrained(tiny_clip_dir)
    model = AfClipModel.from_clip(tiny_clip_dir, adapter_type="lora", lora_rank=4, **SMALL)
    state = model.state_dict()
    lora_names = [name for name in state if "lora_" in name]
    loaded = {
        name.removeprefix("backbone.clip.").replace(".base_layer", ""): tensor
        for name, tensor in state.items()
        if name not in lora_names and name != "context"
    }
    assert loaded.keys() == clip.state_dict().keys()  # every CLIP tensor, under its LoRA layer or not
    assert all(torch.equal(loaded[name], tensor) for name, tensor in clip.state_dict().items())
    wrapped = len(SMALL["feature_layers"]) * len(model.config.lora_target_modules)
    assert len(lora_names) == 2 * wrapped  # lora_A and lora_B of every targeted projection
    # LoRA starts as the identity: every lora_B is zero.
    assert all(torch.count_nonzero(state[name]) == 0 for name in lora_names if "lora_B" in name)
    with pytest.raises(ValueError, match="do not fit"):
        model.backbone.load_clip_weights({"not.a.weight": torch.zeros(1)} | clip.state_dict())


def test_from_clip_runs_at_the_image_size_given(tiny_clip_dir):
    """`image_size` (the paper's 518 on ViT-L/14@336) reaches the processor, the patch grid and the position
    embeddings, resized bilinearly from the tower's grid (here 240 px, 15x15 -> 320 px, 20x20)."""
    from PIL import Image

    from hf_fsad.backbones.clip import resize_position_embeddings

    assert AfClipModel.from_clip(tiny_clip_dir).config.image_size == 240  # None: the tower's size
    model = AfClipModel.from_clip(tiny_clip_dir, image_size=320)
    assert model.grid_size() == (20, 20)
    pixel_values = model.image_processor()([Image.new("RGB", (70, 50))], return_tensors="pt").pixel_values
    assert pixel_values.shape[-2:] == (320, 320)
    embeddings = model.backbone.clip.vision_model.embeddings
    expected = resize_position_embeddings(embeddings.position_embedding.weight, (20, 20), "bilinear")
    # the patch convolution has no bias: a black image's tokens are the class embedding and the positions
    tokens = model.backbone.embed(torch.zeros(1, 3, 320, 320))[0]
    torch.testing.assert_close(tokens[1:], expected[1:], rtol=0, atol=0)  # the positions added to zeros
    # (class + position) - class: one float32 rounding each way, float32 defaults
    torch.testing.assert_close(tokens[0] - embeddings.class_embedding, expected[0])
    with torch.no_grad():
        assert model(pixel_values).anomaly_maps.shape == (1, 320, 320)
    with pytest.raises(ValueError, match="320x320"):
        model(torch.zeros(1, 3, 240, 240))
