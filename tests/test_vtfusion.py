"""VTFusion (Jiang et al., "VTFusion: A Vision-Text Multimodal Fusion Network for Few-Shot Anomaly Detection"):
Eqs. 1-10 on small tensors, the MPF by hand, fitting, save/load, runner, CLI."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModel, pipeline

import hf_fsad
from hf_fsad import scoring
from hf_fsad.cli import main
from hf_fsad.data import load_benchmark
from hf_fsad.evaluation import DatasetSpec, run_benchmark
from hf_fsad.metrics.functional import image_auroc, pixel_auroc
from hf_fsad.models.vtfusion import functional_vtfusion
from hf_fsad.models.vtfusion.configuration_vtfusion import VtFusionConfig
from hf_fsad.models.vtfusion.losses_vtfusion import (
    compactness_loss,
    mse_segmentation_loss,
    separation_loss,
    vtfusion_loss,
)
from hf_fsad.models.vtfusion.modeling_vtfusion import (
    FusionBlock,
    SegmentationNetwork,
    SpatialSelfAttention,
    VtFusionModel,
)
from hf_fsad.models.vtfusion.training_vtfusion import anomalous_patches
from hf_fsad.synthesis import SYNTHESIS_KINDS, random_anomaly
from hf_fsad.testing import small_clip_config, tiny_clip_config
from hf_fsad.training.trainer import parameter_digest
from hf_fsad.visualization import mask_array
from model_tester import ModelTester

REPO = Path(__file__).resolve().parents[1]
TINY = {"feature_layers": [1, 2], "fusion_channels": 4, "segmentation_channels": 8}


class VtFusionModelTester(ModelTester):
    model_type = "vtfusion"
    config = TINY


def toy_normals(count: int, category: str = "weave", seed: int = 1) -> list[Image.Image]:
    data = load_benchmark(
        "toy", category=category, seed=seed, num_train=count, num_test_good=1, num_test_anomalous=1
    )
    return [image.convert("RGB") for image in data["train"]["image"]]


# --- equations -----------------------------------------------------------------------------------------------


def test_eq_1_prototypes_average_the_stacked_normal_features_per_location():
    levels = [torch.tensor([[[1.0], [2.0]], [[3.0], [6.0]]]), torch.tensor([[[0.0], [1.0]], [[2.0], [1.0]]])]
    stacked = functional_vtfusion.stack_levels(levels)  # (2 images, 2 locations, 2 = c x L)
    assert stacked.tolist() == [[[1, 0], [2, 1]], [[3, 2], [6, 1]]]
    assert functional_vtfusion.initial_prototypes(stacked).tolist() == [[2, 1], [4, 1]]


def test_eqs_2_5_squared_distance_to_the_nearest_prototype_of_any_location():
    features = torch.tensor([[[0.0, 0.0], [3.0, 4.0]]])
    prototypes = torch.tensor([[1.0, 0.0], [3.0, 3.0]])
    # location 0: min(1, 18) = 1; location 1: min(4 + 16, 0 + 1) = 1 (nearest is the other location's)
    assert functional_vtfusion.nearest_prototype_distance(features, prototypes).tolist() == [[1.0, 1.0]]
    torch.manual_seed(0)
    features, prototypes = torch.randn(3, 7, 5, dtype=torch.float64), torch.randn(4, 5, dtype=torch.float64)
    brute = ((features[:, :, None] - prototypes[None, None]) ** 2).sum(-1).amin(-1)
    # float64 defaults (rtol 1e-7): |f|^2 - 2 f.p + |p|^2 vs the squared difference (~1e-15)
    torch.testing.assert_close(functional_vtfusion.nearest_prototype_distance(features, prototypes), brute)
    with pytest.raises(ValueError, match="no prototypes"):
        functional_vtfusion.nearest_prototype_distance(features, prototypes[:0])
    # "mean_squared": the same nearest distance per channel (width 5); a division by 5 in float64
    per_channel = functional_vtfusion.nearest_prototype_distance(features, prototypes, "mean_squared")
    torch.testing.assert_close(per_channel, brute / 5)
    with pytest.raises(ValueError, match="distance must be one of"):
        functional_vtfusion.nearest_prototype_distance(features, prototypes, "cosine")


def test_eqs_3_4_compactness_and_separation_losses_by_hand():
    r, alpha = 0.1, 0.2
    distances = torch.tensor([[0.0, 0.005, 0.05, 0.2]])
    # NFC: mean of max(0, d - 0.01) = (0 + 0 + 0.04 + 0.19) / 4
    # float32 constants (6e-8 rel) through a subtraction and a mean: ~3e-7, approx's default rel 1e-6
    assert compactness_loss(distances, r).item() == pytest.approx(0.23 / 4)
    # AFS on the anomalous locations only: (r + alpha)^2 = 0.09; max(0, 0.09 - d) at locations 1 and 3
    locations = torch.tensor([[False, True, False, True]])
    assert separation_loss(distances, locations, r, alpha).item() == pytest.approx((0.085 + 0) / 2)
    none = separation_loss(distances.requires_grad_(), torch.zeros_like(locations), r, alpha)
    assert none.item() == 0 and none.requires_grad


def test_eq_6_text_map_sums_each_levels_anomalous_softmax():
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    level_1 = torch.tensor([[[1.0, 0.0], [0.6, 0.8]]])
    level_2 = torch.tensor([[[0.0, 1.0], [0.8, 0.6]]])
    scale = 10.0

    def anomalous(cos_normal, cos_anomalous):
        return math.exp(scale * cos_anomalous) / (
            math.exp(scale * cos_normal) + math.exp(scale * cos_anomalous)
        )

    expected = [[anomalous(1, 0) + anomalous(0, 1), anomalous(0.6, 0.8) + anomalous(0.8, 0.6)]]
    actual = functional_vtfusion.text_guided_map([level_1, level_2], text, temperature=1 / scale)
    # float32 exp / softmax vs Python float64 rounded to float32: a few ulp, float32 defaults
    torch.testing.assert_close(actual, torch.tensor(expected))


def test_eqs_8_10_segmentation_and_total_loss():
    maps, masks = torch.tensor([[[0.5, 0.0], [1.0, 0.2]]]), torch.tensor([[[True, False], [True, False]]])
    # float32 constants through squares and a mean: ~3e-7 relative, approx's default rel 1e-6 (and below)
    assert mse_segmentation_loss(maps, masks).item() == pytest.approx((0.25 + 0 + 0 + 0.04) / 4)
    normal, anomalous = torch.tensor([[0.5, 0.0]]), torch.tensor([[0.0, 0.3]])
    locations = torch.tensor([[True, True]])
    losses = vtfusion_loss(normal, anomalous, locations, maps, masks, 0.0, 0.5, segmentation_weight=2.0)
    # NFC (0.5 + 0) / 2, AFS (0.25 + 0) / 2, SEG 0.0725
    assert losses["compactness"].item() == pytest.approx(0.25)
    assert losses["separation"].item() == pytest.approx(0.125)
    assert losses["total"].item() == pytest.approx(0.25 + 0.125 + 2 * 0.0725)
    without = vtfusion_loss(normal, anomalous, locations, maps, masks, 0.0, 0.5, 2.0, use_separation=False)
    assert without["total"].item() == pytest.approx(2 * 0.0725)


def test_anomalous_patches_are_those_with_more_than_the_fraction_changed():
    masks = torch.zeros(1, 4, 4, dtype=torch.bool)
    masks[0, 0, 0] = True  # 1/4 of patch (0, 0)
    masks[0, 2:, 2:] = True  # all of patch (1, 1)
    assert anomalous_patches(masks, (2, 2)).tolist() == [[True, False, False, True]]  # default: any pixel
    assert anomalous_patches(masks, (2, 2), 0.25).tolist() == [[False, False, False, True]]
    assert VtFusionConfig(clip_config=tiny_clip_config()).anomalous_patch_fraction == 0
    with pytest.raises(ValueError, match="anomalous_patch_fraction"):
        VtFusionConfig(clip_config=tiny_clip_config(), anomalous_patch_fraction=1)


def test_the_distance_setting_reaches_the_vision_map():
    model = VtFusionModelTester.tiny_model()
    torch.manual_seed(0)
    with torch.no_grad():
        features = model.encode_images(torch.randn(2, 3, 240, 240))
        state_embeddings = model.backbone.state_embeddings("object")
        width = sum(level.shape[-1] for level in model.level_features(features))
        prototypes = torch.randn(model.grid_size()[0] ** 2, width)
        default = model.predict(features, state_embeddings, prototypes).vision_map
        model.config.distance = "mean_squared"
        per_channel = model.predict(features, state_embeddings, prototypes).vision_map
    assert VtFusionConfig(clip_config=tiny_clip_config()).distance == "squared_euclidean"
    torch.testing.assert_close(per_channel, default / width)  # one float32 division: float32 defaults
    with pytest.raises(ValueError, match="distance must be one of"):
        VtFusionConfig(clip_config=tiny_clip_config(), distance="cosine")


@pytest.mark.parametrize("kind", SYNTHESIS_KINDS)
def test_every_synthetic_anomaly_kind_gives_afs_patches(kind):
    """The AFS locations of a synthetic anomaly are exactly the 16 px patches holding a changed pixel, for
    every kind: thin cracks included (under a 25 % rule they rarely counted)."""
    normal = toy_normals(1)[0].resize((240, 240))
    for seed in range(4):
        _, mask, _ = random_anomaly(normal, np.random.default_rng(seed), (kind,))
        patches = anomalous_patches(torch.from_numpy(mask)[None], (15, 15))
        by_hand = mask.reshape(15, 16, 15, 16).any(axis=(1, 3)).reshape(1, 225)
        assert patches.any() and patches.tolist() == by_hand.tolist()


def test_self_attention_by_hand_in_float64():
    torch.manual_seed(0)
    attention = SpatialSelfAttention(3).double()
    prediction = torch.randn(2, 1, 2, 3, dtype=torch.float64)
    embedded = attention.embed(prediction).flatten(2)  # (B, C, N)

    def project(conv):
        return torch.einsum("oc,bcn->bon", conv.weight[:, :, 0, 0], embedded) + conv.bias[None, :, None]

    q, k, v = project(attention.query), project(attention.key), project(attention.value)
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(3), dim=-1)
    expected = torch.einsum("bnm,bcm->bcn", weights, v).reshape(2, 3, 2, 3)
    # float32 defaults: einsum here vs the module's 1x1 convolutions (reduction order of 3 terms)
    torch.testing.assert_close(attention(prediction), expected)


def _randomised_batch_norms(module: torch.nn.Module) -> torch.nn.Module:
    """float64, eval mode, every BatchNorm with random statistics and affine parameters (so none is the
    identity it starts as)."""
    module = module.double().eval()
    with torch.no_grad():
        for norm in module.modules():
            if isinstance(norm, torch.nn.BatchNorm2d):
                norm.running_mean.normal_()
                norm.running_var.uniform_(0.5, 2.0)
                norm.weight.normal_()
                norm.bias.normal_()
    return module


def _conv(inputs, conv, stride=1):
    return F.conv2d(inputs, conv.weight, conv.bias, stride=stride, padding=conv.kernel_size[0] // 2)


def _batch_norm(inputs, norm):
    def channel(values):
        return values[None, :, None, None]

    scale = channel(norm.weight) / channel(norm.running_var + norm.eps).sqrt()
    return (inputs - channel(norm.running_mean)) * scale + channel(norm.bias)


def _conv_bn_relu(inputs, block, stride=1):
    return torch.relu(_batch_norm(_conv(inputs, block[0], stride), block[1]))


def _nearest(values, size):
    rows = (torch.arange(size[0]) * values.shape[-2] // size[0]).long()
    columns = (torch.arange(size[1]) * values.shape[-1] // size[1]).long()
    return values[..., rows, :][..., columns]


def _self_attention(prediction, attention):
    embedded = _conv(prediction, attention.embed)
    batch, channels, height, width = embedded.shape
    q, k, v = (_conv(embedded, conv).flatten(2) for conv in (attention.query, attention.key, attention.value))
    weights = torch.softmax(torch.einsum("bcn,bcm->bnm", q, k) / math.sqrt(channels), dim=-1)
    return torch.einsum("bnm,bcm->bcn", weights, v).reshape(batch, channels, height, width)


@pytest.mark.parametrize("grid", [(1, 1), (2, 2), (5, 7), (15, 15)])
def test_eqs_7_9_fusion_block_and_segmentation_network_by_hand_in_float64(grid):
    """M_vt = G(SAM(M_v) (+) SAM(M_t)) and phi's bottom-up, top-down and multi-scale aggregation, written out
    step by step with random weights and batch-norm statistics."""
    torch.manual_seed(0)
    fusion = _randomised_batch_norms(FusionBlock(4))
    segmentation = _randomised_batch_norms(SegmentationNetwork(3, 8, 3))
    vision, text = torch.rand(2, 1, *grid, dtype=torch.float64), torch.rand(2, 1, *grid, dtype=torch.float64)

    attended = torch.cat(
        [_self_attention(vision, fusion.vision_attention), _self_attention(text, fusion.text_attention)], 1
    )
    residual = fusion.residual
    body = _batch_norm(_conv(_conv_bn_relu(attended, residual.body[0]), residual.body[1]), residual.body[2])
    fused = _conv(torch.relu(body + _conv(attended, residual.skip)), fusion.output)
    # same float64 operations in another order: rounding at the 1e-15 level, inside the float64 defaults
    torch.testing.assert_close(fusion(vision, text), fused)

    inputs = torch.cat([vision, text, fused], dim=1)
    bottom_up = [_conv_bn_relu(inputs, segmentation.stages[0])]
    for stage in segmentation.stages[1:]:
        bottom_up.append(_conv_bn_relu(bottom_up[-1], stage, stride=2))
    top_down = [_conv(bottom_up[2], segmentation.laterals[2])]
    for level in (1, 0):
        coarser = _nearest(top_down[0], bottom_up[level].shape[-2:])
        top_down.insert(0, _conv(bottom_up[level], segmentation.laterals[level]) + coarser)
    smoothed = [
        F.interpolate(_conv_bn_relu(level, smooth), size=grid, mode="bilinear", align_corners=False)
        for smooth, level in zip(segmentation.smoothing, top_down)
    ]
    expected = torch.sigmoid(_conv(torch.cat(smoothed, dim=1), segmentation.head))
    # as above: float64 defaults
    torch.testing.assert_close(segmentation(inputs), expected)
    assert expected.shape == (2, 1, *grid) and 0 < expected.min() and expected.max() < 1


def test_unfitted_encoders_are_clip_features_and_the_adaptor_convolves_the_patch_grid():
    model = VtFusionModelTester.tiny_model()
    torch.manual_seed(1)
    features = model.encode_images(torch.randn(2, 3, 240, 240))
    tokens = features["tokens.1"][:, 1:]
    clip_features = F.normalize(model.backbone.project(tokens), dim=-1)
    # float32 defaults: the model projects (B, 225) tokens as one (B * 225) batch, another kernel blocking
    torch.testing.assert_close(model.level_features(features)[0], clip_features)
    text = torch.randn(2, model.config.clip_config.projection_dim)
    # float32 defaults: the model's normalisation divides in another order than F.normalize (1 ulp seen)
    torch.testing.assert_close(model.text_features(text), F.normalize(text, dim=-1))

    adaptor = model.image_encoder.adaptors[0]
    with torch.no_grad():
        adaptor.weight.normal_()
    linear = model.backbone.project(tokens)  # (B, 225, P): row-major over the 15 x 15 grid
    grid = linear.transpose(1, 2).reshape(2, -1, 15, 15)
    expected = F.normalize(
        F.conv2d(grid, adaptor.weight, adaptor.bias, padding=1).flatten(2).transpose(1, 2), dim=-1
    )
    # float32 defaults: the model's convolution may pick another kernel (reduction order)
    torch.testing.assert_close(model.level_features(features)[0], expected)


def _fitted(model: VtFusionModel, steps: int = 2, **arguments) -> VtFusionModel:
    model.fit(toy_normals(2), class_name="fabric", steps=steps, **arguments)
    return model


def test_scores_are_the_maximum_of_the_maps_and_branches_follow_eqs_5_6():
    model = _fitted(VtFusionModelTester.tiny_model(text_logit_scale=20.0))  # not the default 100
    torch.manual_seed(2)
    images = torch.randn(2, 3, 240, 240)
    bank = model.build_reference_bank()
    assert bank.class_name == "fabric" and bank.k == 2
    output = model(images, reference_bank=bank)
    assert output.anomaly_maps.shape == (2, 240, 240)
    # a maximum picks an element; below, the model's own ops on the same batch: bit-identical
    torch.testing.assert_close(output.image_scores, output.anomaly_maps.flatten(1).amax(-1), rtol=0, atol=0)
    features = model.encode_images(images)
    levels = model.level_features(features)
    vision = functional_vtfusion.nearest_prototype_distance(
        functional_vtfusion.stack_levels(levels), model.prototypes
    )
    text = functional_vtfusion.text_guided_map(
        levels, model.text_features(bank.tensors["state_embeddings"]), 1 / 20.0
    )
    torch.testing.assert_close(output.branch_scores["vision"], vision.amax(-1), rtol=0, atol=0)
    torch.testing.assert_close(output.branch_scores["text"], text.amax(-1), rtol=0, atol=0)
    # Eqs. 7 and 9 through the model: M_f = Upsample(phi(M_v (+) M_t (+) M_vt)) to the input size
    grids = [vision.reshape(2, 1, 15, 15), text.reshape(2, 1, 15, 15)]
    fused = model.fusion(*grids)
    coarse = model.segmentation(torch.cat([*grids, fused], dim=1)).squeeze(1)
    torch.testing.assert_close(output.anomaly_maps, scoring.upsample_maps(coarse, (240, 240)), rtol=0, atol=0)
    torch.testing.assert_close(output.branch_scores["fused"], fused.flatten(1).amax(-1), rtol=0, atol=0)
    # Eq. 1 through the model: fitting without updates sets the prototypes to the normals' mean features
    unfitted = VtFusionModelTester.tiny_model()
    normals = toy_normals(2)
    unfitted.fit(normals, steps=0)
    normal_features = unfitted.encode_images(
        unfitted.image_processor()(normals, return_tensors="pt").pixel_values
    )
    stacked = functional_vtfusion.stack_levels(unfitted.level_features(normal_features))
    # float32 defaults: a mean over 2 images x 225 locations, summed in the model's order
    torch.testing.assert_close(unfitted.prototypes, stacked.mean(0))


def test_without_mpf_the_map_is_the_upsampled_sum_of_both_predictions():
    model = _fitted(VtFusionModelTester.tiny_model(use_fusion=False))
    assert model.fusion is None and model.segmentation is None
    features = model.encode_images(torch.randn(1, 3, 240, 240))
    bank = model.build_reference_bank()
    prediction = model.predict(features, bank.tensors["state_embeddings"], bank.tensors["prototypes"])
    coarse = (prediction.vision_map + prediction.text_map).reshape(1, 15, 15)
    # the model's own ops on the same features: bit-identical
    torch.testing.assert_close(
        prediction.anomaly_maps, scoring.upsample_maps(coarse, (240, 240)), rtol=0, atol=0
    )


@pytest.mark.parametrize("ablated", [False, True])
def test_the_training_loss_is_eq_10_and_the_ablation_drops_the_separation_terms(ablated):
    """The trainer's loss on batch 0, recomputed in float64 from the same batch: NFC + AFS + lambda SEG, or
    lambda SEG alone "w/o AIE" (no adaptor, and then no contrastive losses)."""
    from hf_fsad.models.vtfusion.training_vtfusion import VtFusionTrainer, VtFusionTrainingArguments

    switches = {"use_feature_adaptor": False, "use_text_adapter": False} if ablated else {}
    model = VtFusionModelTester.tiny_model(segmentation_weight=2.0, margin=0.3, **switches)
    assert (model.image_encoder.adaptors is None, model.text_adapter is None) == (ablated, ablated)
    trainable = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"image_encoder", "fusion", "segmentation"} | (
        {"text_adapter"} if not ablated else set()
    )
    trainer = VtFusionTrainer(model, toy_normals(2), "fabric", VtFusionTrainingArguments(max_steps=1))
    loss = trainer.compute_loss(0)

    views, anomalies, masks = trainer.training_batch(0)
    pixel_values = model.image_processor()(views + anomalies, return_tensors="pt").pixel_values
    prediction = model.predict(model.encode_images(pixel_values), trainer.state_embeddings, model.prototypes)
    distances = prediction.vision_map.double()
    targets = torch.cat([torch.zeros_like(masks), masks]).double()
    expected = 2.0 * (prediction.anomaly_maps.double() - targets).pow(2).mean()
    if not ablated:
        r, alpha = model.config.radius, model.config.margin
        locations = torch.from_numpy(
            masks.numpy().reshape(2, 15, 16, 15, 16).any(axis=(2, 4)).reshape(2, 225)
        )
        assert locations.any()
        expected = expected + (distances[:2] - r**2).clamp_min(0).mean()
        expected = expected + ((r + alpha) ** 2 - distances[2:]).clamp_min(0)[locations].mean()
    # float32 means of 450 terms vs float64: typical sqrt(n) * eps32 ~ 1e-6 (worst n * eps32 ~ 3e-5)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_banks_need_a_fitted_model_and_no_references():
    model = VtFusionModelTester.tiny_model()
    with pytest.raises(ValueError, match="not fitted"):
        model.build_reference_bank()
    with pytest.raises(ValueError, match="fitted on its normal images"):
        _fitted(model).build_reference_bank(torch.randn(1, 3, 240, 240))


# --- fitting ---------------------------------------------------------------------------------------------------


def test_fit_trains_only_aie_ate_mpf_with_the_papers_learning_rates():
    from hf_fsad.models.vtfusion.training_vtfusion import VtFusionTrainer, VtFusionTrainingArguments

    model = VtFusionModelTester.tiny_model()
    backbone = {name: p.clone() for name, p in model.backbone.state_dict().items()}
    trainer = VtFusionTrainer(model, toy_normals(2), "fabric", VtFusionTrainingArguments(max_steps=2))
    rates = {id(p): group["lr"] for group in trainer.optimizer.param_groups for p in group["params"]}
    for name, parameter in model.named_parameters():
        if parameter.requires_grad:
            assert rates[id(parameter)] == (1e-3 if name.startswith("image_encoder.") else 1e-4), name
    before = {name: p.clone() for name, p in model.named_parameters() if p.requires_grad}
    prototypes = model.prototypes.clone()
    trainer.train()
    assert all(torch.equal(p, backbone[name]) for name, p in model.backbone.state_dict().items())
    assert torch.equal(model.prototypes, prototypes)  # frozen anchors
    changed = {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if p.requires_grad and not torch.equal(p, before[name])
    }
    assert changed == {"image_encoder", "text_adapter", "fusion", "segmentation"}


def test_fitting_is_bit_reproducible_and_seeded():
    base = VtFusionModelTester.tiny_model()
    runs = [_fitted(copy.deepcopy(base), steps=3, seed=seed) for seed in (0, 0, 1)]
    digests = [parameter_digest(run) for run in runs]
    assert digests[0] == digests[1] != digests[2]
    assert torch.equal(runs[0].prototypes, runs[2].prototypes)  # the anchors come from the normals alone
    for name, buffer in runs[0].named_buffers():
        assert torch.equal(buffer, dict(runs[1].named_buffers())[name]), name


BF16_FIT = """
import math, sys, torch
from accelerate import Accelerator
sys.path.insert(0, {tests!r})
from test_vtfusion import VtFusionModelTester, toy_normals
model = VtFusionModelTester.tiny_model()
seen = set()
model.segmentation.register_forward_hook(lambda module, inputs, output: seen.add(output.dtype))
result = model.fit(toy_normals(2), steps=2, accelerator=Accelerator(cpu=True, mixed_precision="bf16"))
assert all(math.isfinite(entry["loss"]) for entry in result.history), result.history
assert seen == {{torch.bfloat16}}, seen  # autocast ran the segmentation network in bfloat16
output = model(torch.randn(1, 3, 240, 240))
assert torch.isfinite(output.anomaly_maps).all() and output.anomaly_maps.dtype == torch.float32
"""


def test_fit_takes_an_accelerator_with_mixed_precision():
    """Accelerate's precision is fixed per process, so the bf16 fit gets its own process; a hook shows the
    fit's forward passes ran in bfloat16, and scoring afterwards in float32."""
    script = BF16_FIT.format(tests=str(Path(__file__).parent))
    completed = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=600, check=False
    )
    assert completed.returncode == 0, completed.stderr[-3000:]


def test_save_load_round_trip_is_exact_and_automodel_loads_a_fitted_model(tmp_path):
    model = _fitted(VtFusionModelTester.tiny_model(), steps=3)
    images = torch.randn(2, 3, 240, 240)
    expected = model(images, reference_bank=model.build_reference_bank())
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_fsad.VtFusionModel) and loaded.is_fitted
    assert loaded.config.fitted_class_name == "fabric"
    bank = loaded.build_reference_bank()
    assert bank.config_hash == model.build_reference_bank().config_hash
    actual = loaded(images, reference_bank=bank)
    assert torch.equal(actual.image_scores, expected.image_scores)
    assert torch.equal(actual.anomaly_maps, expected.anomaly_maps)
    assert not any(p.requires_grad for p in loaded.backbone.parameters())
    pipe = pipeline("image-anomaly-detection", model=str(tmp_path))  # no references: the fitted model's own
    image = toy_normals(1)[0]
    pixels = loaded.image_processor()([image], return_tensors="pt").pixel_values
    assert pipe([image])[0]["score"] == pytest.approx(loaded(pixels).image_scores.item(), rel=1e-5)


def _auroc(model: VtFusionModel, data) -> tuple[float, float]:
    processor = model.image_processor()
    test = processor(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values
    output = model(test, reference_bank=model.build_reference_bank())
    masks = np.stack([mask_array(mask, model.config.image_size) for mask in data["test"]["mask"]])
    labels = np.asarray(data["test"]["label"])
    return image_auroc(labels, output.image_scores.numpy()), pixel_auroc(masks, output.anomaly_maps.numpy())


def test_toy_fitting_on_four_normals_raises_image_and_pixel_auroc(one_thread):
    data = load_benchmark(
        "toy", category="weave", seed=1, num_train=4, num_test_good=12, num_test_anomalous=12
    )
    normals = [image.convert("RGB") for image in data["train"]["image"]]
    model = VtFusionModelTester.tiny_model(
        clip_config=small_clip_config(), fusion_channels=16, segmentation_channels=32
    )
    model.fit(normals, class_name="fabric", steps=0)  # prototypes only: the unfitted model
    before = _auroc(model, data)
    result = model.fit(normals, class_name="fabric", steps=200, learning_rate=1e-3)  # vtfusion_toy.yaml
    after = _auroc(model, data)
    print(f"k=4 toy weave: image/pixel AUROC {before} -> {after}; {result.seconds_per_step:.3f} s/step")
    # on one thread (the same float32 sums everywhere); measured over model and fit seeds 0-2: image AUROC
    # gains 0.25, 0.32, 0.17 (0.17: from 0.83 to the ceiling 1.0), pixel gains 0.30, 0.46, 0.50
    assert after[0] > before[0] + 0.1 and after[1] > before[1] + 0.1
    assert result.history[-1]["loss"] < result.history[0]["loss"]


# --- runner and CLI ---------------------------------------------------------------------------------------------


def test_benchmark_runner_fits_a_copy_per_cell(tmp_path):
    model = VtFusionModelTester.tiny_model()
    spec = DatasetSpec(
        "toy", categories=["stripes"], options={"num_train": 4, "num_test_good": 2, "num_test_anomalous": 2}
    )
    results = run_benchmark(
        {"vtfusion": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path, fit_arguments={"steps": 2}
    )
    (cell,) = results["cells"]
    assert not model.is_fitted  # the runner fitted a copy
    assert cell["fit_seconds"] > 0 and cell["metrics"]["pixel_auroc"] is not None
    data = load_benchmark("toy", category="stripes", **spec.options)
    chosen = [data["train"]["path"].index(image_id) for image_id in cell["reference_ids"]]
    direct = copy.deepcopy(model)
    direct.fit(data["train"].select(chosen)["image"], class_name="textured surface", steps=2, seed=0)
    processor = direct.image_processor()
    test = processor(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values
    expected = direct(test, reference_bank=direct.build_reference_bank())
    # the runner encodes in batches of its own size: float32 reduction order through the model, 1e-5
    np.testing.assert_allclose(cell["image_scores"], expected.image_scores.numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="k = 0"):
        run_benchmark({"vtfusion": model}, [spec], ks=[0], seeds=[0], out_dir=tmp_path / "zero")


def test_cli_fit_saves_a_model_that_scores_and_reports_bad_files(tiny_clip_dir, tmp_path, capsys):
    normal_dir = tmp_path / "normal"
    normal_dir.mkdir()
    for index, image in enumerate(toy_normals(2)):
        image.save(normal_dir / f"{index}.png")
    (normal_dir / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "fitted"
    arguments = ["fit", "--method", "vtfusion", "--normal", str(normal_dir), "--out", str(out)]
    status = main([*arguments, "--clip", tiny_clip_dir, "--class-name", "fabric", "--steps", "2"])
    assert status == 0
    assert "skipped normal image" in capsys.readouterr().err
    model = AutoModel.from_pretrained(out)
    assert model.config.num_fitted_normals == 2 and model.config.fitted_class_name == "fabric"
    assert json.loads((out / "fit_summary.json").read_text())["result"]["steps"] == 2
    assert "build_reference_bank()" in (out / "README.md").read_text()
    results = tmp_path / "scores.jsonl"
    assert main(["score", "--model", str(out), "--output", str(results), str(normal_dir / "0.png")]) == 0
    assert len(results.read_text().splitlines()) == 1
    assert main([*arguments, "--method", "winclip", "--clip", tiny_clip_dir]) == 2
    assert "not fitted per category" in capsys.readouterr().err


def test_fit_protocol_entry_point_runs_the_config(tiny_clip_dir, tmp_path):
    from hf_fsad.training.recipes import fit_main

    config = str(REPO / "training" / "configs" / "vtfusion_toy.yaml")
    dataset = (
        "{name: toy, categories: [grid], options: {num_train: 4, num_test_good: 2, num_test_anomalous: 2}}"
    )
    overrides = [f"model.clip={tiny_clip_dir}", "training.steps=2", "evaluation.seeds=[0]"]
    status = fit_main(
        [
            "--config",
            config,
            "--output-dir",
            str(tmp_path),
            "--set",
            *overrides,
            f"evaluation.datasets=[{dataset}]",
        ]
    )
    assert status == 0
    (cell,) = json.loads((tmp_path / "results.json").read_text())["cells"]
    assert (cell["method"], cell["category"], cell["k"]) == ("vtfusion", "grid", 4)
    with pytest.raises(ValueError, match="Unknown fit settings"):
        fit_main(["--config", config, "--set", f"model.clip={tiny_clip_dir}", "training.max_steps=3"])
