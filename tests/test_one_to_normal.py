"""One-to-Normal (arXiv:2502.01201): Eqs. 1-7, img2img strength, DreamBooth LoRA, the pool, save/load.

The diffusion model is a tiny random Stable Diffusion pipeline saved locally (diffusers' test sizes): its
images are noise, so these tests prove the machinery, and a test double proves the scoring path.
"""

from __future__ import annotations

import hashlib
import math
import sys
import warnings
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import gaussian_filter
from transformers import AutoModel

import hf_fsad
from extras import import_extra
from hf_fsad import scoring
from hf_fsad.calibration_inputs import GENERATED_IMAGE_INFO
from hf_fsad.calibration_policy import calibrate_reference_bank
from hf_fsad.data import load_benchmark
from hf_fsad.metrics.functional import pixel_auroc
from hf_fsad.models.one_to_normal import functional_one_to_normal
from hf_fsad.models.one_to_normal.configuration_one_to_normal import OneToNormalConfig
from hf_fsad.models.one_to_normal.diffusion_one_to_normal import (
    Personalizer,
    load_img2img_pipeline,
    most_similar,
    require_diffusers,
)
from hf_fsad.models.one_to_normal.modeling_one_to_normal import OneToNormalModel
from hf_fsad.testing import (
    byte_level_clip_tokenizer,
    small_clip_config,
    tiny_clip_config,
)
from hf_fsad.visualization import mask_array
from model_tester import ModelTester

import_extra("diffusers", "diffusers")

FAST = {"diffusion_resolution": 32, "num_inference_steps": 10, "pool_size": 3}
TINY_FIT = {"num_class_images": 1, "class_image_steps": 2}


class OneToNormalModelTester(ModelTester):
    model_type = "one_to_normal"
    config = FAST
    config_fixtures: ClassVar[dict] = {"diffusion_model": "diffusion_dir"}  # the tiny Stable Diffusion
    fit_arguments = TINY_FIT


def make_model(diffusion_dir: str, clip_config=None, **config) -> OneToNormalModel:
    """The tester's tiny model on the tiny Stable Diffusion pipeline saved in `diffusion_dir`."""
    return OneToNormalModelTester.tiny_model(clip_config=clip_config, diffusion_model=diffusion_dir, **config)


def toy(category: str = "grid", **sizes):
    counts = {"num_train": 2, "num_test_good": 2, "num_test_anomalous": 2} | sizes
    return load_benchmark("toy", category=category, seed=2, **counts)


# --- equations -----------------------------------------------------------------------------------------------


def _reference_ssim(x: np.ndarray, y: np.ndarray, sigma: float = 1.5) -> float:
    """SSIM in float64 with scipy's Gaussian filter (same window: truncate at 3.5 sigma, valid region)."""
    radius = int(3.5 * sigma + 0.5)

    def blur(values):
        filtered = gaussian_filter(values, sigma=(0, sigma, sigma), truncate=radius / sigma, mode="constant")
        return filtered[:, radius:-radius, radius:-radius]

    c1, c2 = 0.01**2, 0.03**2
    mx, my = blur(x), blur(y)
    vx, vy, cov = blur(x * x) - mx**2, blur(y * y) - my**2, blur(x * y) - mx * my
    return float((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx**2 + my**2 + c1) * (vx + vy + c2))).mean())


def test_ssim_matches_a_float64_reference_and_is_one_for_identical_images():
    rng = np.random.default_rng(0)
    x = rng.random((3, 20, 24))
    y = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    actual = functional_one_to_normal.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    # both float64; the separable convolutions and scipy's filter sum in different orders
    assert actual.item() == pytest.approx(_reference_ssim(x, y), rel=1e-9)
    # exactly 1: with x = y numerator and denominator are the same float64 products
    assert functional_one_to_normal.ssim(torch.from_numpy(x)[None], torch.from_numpy(x)[None]).item() == 1.0
    with pytest.raises(ValueError, match="one shape"):
        functional_one_to_normal.ssim(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 24))


def test_eq_2_selection_picks_the_candidate_most_similar_to_the_query():
    rng = np.random.default_rng(1)
    query = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    slightly = np.clip(query.astype(int) + rng.integers(-10, 11, query.shape), 0, 255).astype(np.uint8)
    strongly = np.clip(query.astype(int) + rng.integers(-90, 91, query.shape), 0, 255).astype(np.uint8)
    other = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    candidates = [Image.fromarray(a) for a in (other, strongly, slightly)]
    reference = [
        _reference_ssim(query.transpose(2, 0, 1) / 255, c.transpose(2, 0, 1) / 255)
        for c in (other, strongly, slightly)
    ]
    assert reference[0] < reference[1] < reference[2]  # float64 SSIM ranks the candidates as built
    assert most_similar(Image.fromarray(query), candidates) == 2
    personalizer = Personalizer(pipeline=None, resolution=32)
    personalizer.generate = lambda image, prompts: candidates  # one candidate per prompt
    (chosen,) = personalizer.personalize([Image.fromarray(query)], ["p1", "p2", "p3"])
    assert np.array_equal(np.asarray(chosen), slightly)  # Eq. 3's x_hat_q is the selected candidate


def test_eqs_4_to_7_on_hand_computed_features():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1 image, 2 patches, 2 dims)
    personalized = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert functional_one_to_normal.personalized_difference(query, personalized).tolist() == [[0.0, 1.0]]
    memory = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    # 0.6 and 0.8 round in float32 (ulp 6e-8), and so does their norm
    torch.testing.assert_close(
        functional_one_to_normal.pool_difference(query, memory), torch.tensor([[0.4, 0.2]]), rtol=0, atol=1e-7
    )
    level_maps = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]])]
    assert functional_one_to_normal.level_mean_of_maxima(level_maps).tolist() == [0.75]  # (1 + 0.5) / 2
    total = functional_one_to_normal.one_to_normal_score(
        torch.tensor([0.75]), torch.tensor([0.3]), torch.tensor([0.8]), 1.0, 0.5
    )
    assert total.item() == pytest.approx(0.75 + 0.3 + 0.4, rel=1e-7)  # float32 0.3 and 0.8 (ulp 3e-8, 6e-8)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    expected = math.exp(100 * 0.6) / (math.exp(100 * 0.8) + math.exp(100 * 0.6))  # Eq. 6, cos 0.8 / 0.6
    scores = scoring.class_scores(torch.tensor([[0.8, 0.6]], dtype=torch.float64), text, 0.01)
    # float64: the normalisation's rounding (1e-16) is amplified 100x by the logit scale
    assert scores.item() == pytest.approx(expected, rel=1e-12, abs=0)


# --- diffusion -------------------------------------------------------------------------------------------------


def test_strength_0_3_starts_denoising_at_0_3_T(diffusion_dir):
    pipeline = load_img2img_pipeline(diffusion_dir)
    seen = []
    original = pipeline.unet.forward

    def recording(sample, timestep, *args, **kwargs):
        seen.append(int(timestep))
        return original(sample, timestep, *args, **kwargs)

    pipeline.unet.forward = recording
    personalizer = Personalizer(pipeline, strength=0.3, num_inference_steps=10, resolution=32)
    personalizer.generate(Image.new("RGB", (40, 40), (120, 60, 30)), ["a photo of normal grid"])
    assert pipeline.scheduler.config.num_train_timesteps == 1000
    # "trailing" spacing of 10 steps over T = 1000: 999, 899, ..., 99; strength 0.3 keeps the last 0.3 x 10,
    # so denoising starts at 299 = 0.3 T - 1 (the noised level of x_q,t, Eq. 3); one UNet call per step
    # (guidance batches the conditional and unconditional passes)
    assert seen == [299, 199, 99]


def test_the_configured_strengths_and_step_count_reach_the_diffusion(diffusion_dir):
    """num_inference_steps=4, strength=0.5 and pool_strength=0.75 (defaults 50, 0.3, 0.5): "trailing" spacing
    of 4 steps over T = 1000 is 999, 749, 499, 249; a query's personalization keeps the last 0.5 x 4 of them,
    a generated pool image the last 0.75 x 4."""
    model = make_model(diffusion_dir, num_inference_steps=4, strength=0.5, pool_strength=0.75)
    unet = model.get_personalizer().pipeline.unet
    seen, original = [], unet.forward

    def recording(sample, timestep, *args, **kwargs):
        seen.append(int(timestep))
        return original(sample, timestep, *args, **kwargs)

    unet.forward = recording
    image = Image.new("RGB", (40, 40), (120, 60, 30))
    model.get_personalizer().generate(image, ["a photo of normal grid"])
    assert seen == [499, 249]
    seen.clear()
    model.generate_normals([image], 1)
    assert seen == [749, 499, 249]


def test_bad_inputs_get_clear_errors(diffusion_dir, monkeypatch):
    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    with pytest.raises(ValueError, match="at least one normal image"):
        model.fit([], class_name="grid")
    with pytest.raises(ValueError, match="class_name"):
        model.fit(normals)
    with pytest.raises(ValueError, match="one size"):
        model.fit([normals[0], normals[1].resize((100, 80))], class_name="grid", steps=1, **TINY_FIT)
    with pytest.raises(ValueError, match="No anomaly-free pool"):
        model.build_reference_bank()
    monkeypatch.setitem(sys.modules, "diffusers", None)
    with pytest.raises(ImportError, match=r"hf-fsad\[diffusers\]"):
        require_diffusers()


def test_dreambooth_views_are_flips_and_quarter_turns_of_crops():
    """Sec. 3.2's augmentation: with whole-image crops every view is one of the 8 flips x quarter turns of the
    image, and seeded draws reach all 8; smaller crops zoom in (a view no flip or turn gives)."""
    from hf_fsad.models.one_to_normal.training_one_to_normal import augment

    array = (np.random.default_rng(0).random((12, 12, 3)) * 255).astype(np.uint8)
    dihedral = [np.rot90(flipped, turns) for flipped in (array, array[:, ::-1]) for turns in range(4)]
    rng = np.random.default_rng(1)
    views = [np.asarray(augment(Image.fromarray(array), rng, (1.0, 1.0))) for _ in range(64)]
    matches = [[np.array_equal(view, candidate) for candidate in dihedral] for view in views]
    assert all(any(row) for row in matches) and all(any(column) for column in zip(*matches))
    zoomed = np.asarray(augment(Image.fromarray(array), rng, (0.5, 0.5)))
    assert not any(np.array_equal(zoomed, candidate) for candidate in dihedral)


def _fixed_denoising_loss(trainer, images) -> float:
    """The instance denoising loss on fixed draws (images, noise, timesteps)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = trainer._encode(images, generator)
        return float(
            sum(trainer._denoising_loss(latents, trainer.instance_embedding, generator) for _ in range(8)) / 8
        )


def test_lora_fit_lowers_the_denoising_loss_and_touches_only_lora(diffusion_dir, one_thread):
    from hf_fsad.models.one_to_normal.training_one_to_normal import (
        DreamBoothLoraTrainer,
        OneToNormalTrainingArguments,
    )

    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    args = OneToNormalTrainingArguments(
        max_steps=40, learning_rate=1e-2, num_class_images=0, crop_scale_range=(1.0, 1.0)
    )
    trainer = DreamBoothLoraTrainer(model, normals, "grid", args)
    base = {name: p.clone() for name, p in trainer.unet.named_parameters() if "lora_" not in name}
    before = _fixed_denoising_loss(trainer, trainer.normals)
    trainer.train()
    after = _fixed_denoising_loss(trainer, trainer.normals)
    print(f"instance denoising loss {before:.4f} -> {after:.4f}")
    # on one thread (the same float32 sums everywhere); measured over training seeds 0-4: after / before
    # 0.968, 0.960, 0.981, 0.962, 0.980
    assert after < before
    assert all(
        torch.equal(p, base[name]) for name, p in trainer.unet.named_parameters() if "lora_" not in name
    )
    assert model.lora_weights and all("lora" in name for name in model.lora_weights)


def test_eq_1_denoising_loss_is_the_mse_to_the_noise(diffusion_dir):
    from hf_fsad.models.one_to_normal.training_one_to_normal import (
        DreamBoothLoraTrainer,
        OneToNormalTrainingArguments,
    )

    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    trainer = DreamBoothLoraTrainer(
        model, normals, "grid", OneToNormalTrainingArguments(max_steps=1, num_class_images=0)
    )
    prediction = torch.full((2, 4, 16, 16), 0.5)
    trainer.unet = lambda noisy, timesteps, encoder_hidden_states: type("Out", (), {"sample": prediction})
    latents = torch.zeros(2, 4, 16, 16)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    loss = trainer._denoising_loss(latents, trainer.instance_embedding, torch.Generator().manual_seed(7))
    # float32 means of 2,048 squares, reduced in different orders
    assert loss.item() == pytest.approx(((0.5 - noise) ** 2).mean().item(), rel=1e-6)


def test_adapter_save_load_reproduces_generations_bit_for_bit(diffusion_dir, tmp_path):
    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    model.fit(normals, class_name="grid", steps=2, learning_rate=1e-2, **TINY_FIT)
    prompts = model.prompts(model.config.normal_state_prompts)
    expected = model.get_personalizer().generate(normals[0], prompts)
    base = Personalizer(load_img2img_pipeline(diffusion_dir), resolution=32, num_inference_steps=10)
    assert not np.array_equal(np.asarray(base.generate(normals[0], prompts)[0]), np.asarray(expected[0]))
    model.save_pretrained(tmp_path)
    loaded = AutoModel.from_pretrained(tmp_path)
    assert isinstance(loaded, hf_fsad.OneToNormalModel) and loaded.config.fitted_class_name == "grid"
    actual = loaded.get_personalizer().generate(normals[0], prompts)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(actual, expected))
    pixels = model.image_processor()(normals, return_tensors="pt").pixel_values
    before = model(pixels[1:], reference_bank=model.build_reference_bank(pixels[:1]))
    after = loaded(pixels[1:], reference_bank=loaded.build_reference_bank(pixels[:1]))
    assert torch.equal(before.image_scores, after.image_scores)
    assert torch.equal(before.anomaly_maps, after.anomaly_maps)


def test_training_entry_point_fits_and_saves(diffusion_dir, tiny_clip_dir, tmp_path, capsys):
    """The script reports the unreadable file and goes on; the saved model holds the LoRA a library fit with
    the same settings trains (bit for bit; PEFT's Gaussian init starts every up-projection at zero, so a
    non-zero one was trained) and the anomaly-free pool, so it scores without references once loaded."""
    from safetensors.torch import load_file

    from hf_fsad.models.one_to_normal.diffusion_one_to_normal import LORA_WEIGHTS_NAME
    from hf_fsad.training.recipes import dreambooth_main as train_main

    normal_dir = tmp_path / "normal"
    normal_dir.mkdir()
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    for index, image in enumerate(normals):
        image.save(normal_dir / f"{index}.png")
    (normal_dir / "broken.png").write_bytes(b"not an image")
    out = tmp_path / "fitted"
    arguments = [
        "--normal",
        str(normal_dir),
        "--class-name",
        "grid",
        "--out",
        str(out),
        "--clip",
        tiny_clip_dir,
    ]
    settings = ["--diffusion-model", diffusion_dir, "--steps", "2", "--num-class-images", "1"]
    assert train_main([*arguments, *settings, "--resolution", "32", "--pool-size", "3"]) == 0
    printed = capsys.readouterr()
    assert f"skipped normal image {normal_dir / 'broken.png'}: not an image PIL can read" in printed.err
    assert f"fitted One-to-Normal on 2 normal images -> {out}" in printed.out

    saved_lora = {
        name.removeprefix("unet."): tensor for name, tensor in load_file(out / LORA_WEIGHTS_NAME).items()
    }
    assert any(
        name.endswith("lora.up.weight") and tensor.abs().sum() > 0 for name, tensor in saved_lora.items()
    )
    reference = OneToNormalModel.from_clip(
        tiny_clip_dir, image_size=32, diffusion_model=diffusion_dir, diffusion_resolution=32, pool_size=3
    )
    reference.fit(normals, class_name="grid", steps=2, seed=0, num_class_images=1)
    assert saved_lora.keys() == reference.lora_weights.keys()
    assert all(torch.equal(saved_lora[name], reference.lora_weights[name].cpu()) for name in saved_lora)

    loaded = AutoModel.from_pretrained(out)
    assert loaded.lora_source is not None and loaded.config.fitted_class_name == "grid"
    assert loaded.config.image_size == 32 and loaded.config.num_pool_images == 3
    assert torch.equal(loaded.pool_pixels, reference.pool_pixels)
    pixels = loaded.image_processor()(normals, return_tensors="pt").pixel_values
    assert torch.equal(loaded(pixels).image_scores, reference(pixels).image_scores)


# --- scoring end to end ------------------------------------------------------------------------------------------


def _float64_triplet_scores(
    features: dict, bank, layers: list[int], alpha: float, beta: float, text_temperature: float
) -> dict:
    """Eqs. 4-7 recomputed in float64 from `encode_images` features and a bank, every cosine at once: the
    per-level S_P and S_N maps, the branch scores and A = S_P + alpha S_N + beta S_text."""

    def unit(tensor: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(tensor.double(), dim=-1)

    personal = [
        1 - (unit(features[f"query.{l}"]) * unit(features[f"personalized.{l}"])).sum(-1) for l in layers
    ]
    pool = [1 - (unit(features[f"query.{l}"]) @ unit(bank.tensors[f"memory.{l}"]).T).amax(-1) for l in layers]
    cosines = unit(features["query.global"]) @ unit(bank.tensors["text_embeddings"]).T
    s_p = torch.stack([level.amax(-1) for level in personal]).mean(0)
    s_n = torch.stack([level.amax(-1) for level in pool]).mean(0)
    s_text = (cosines / text_temperature).softmax(-1)[:, 1]
    patch_map = torch.stack(personal).mean(0) + alpha * torch.stack(pool).mean(0)
    return {
        "personalized": s_p,
        "pool": s_n,
        "text": s_text,
        "A": s_p + alpha * s_n + beta * s_text,
        "map": patch_map,
    }


def test_end_to_end_fit_pool_and_scores_are_eq_7_of_the_features(diffusion_dir):
    """fit makes the pool (the normals, then generated ones, at the model's input size); its bank is the
    pool's patch tokens per level; the scores, branch scores and maps equal Eqs. 4-7 recomputed in float64
    from the features (at non-default alpha 0.7, beta 0.2 and text temperature 0.05, written as literals); the
    fitted model refuses leave-one-out and marks the references it generates."""
    model = make_model(diffusion_dir, alpha=0.7, beta=0.2, text_temperature=0.05)
    data = toy()
    normals = [image.convert("RGB") for image in data["train"]["image"]]
    model.fit(normals, class_name="grid", steps=2, **TINY_FIT)
    processor = model.image_processor()
    normal_pixels = processor(normals, return_tensors="pt").pixel_values
    pool_pixels = processor(model.pool_images, return_tensors="pt").pixel_values
    assert len(model.pool_images) == model.config.pool_size == 3
    assert torch.equal(pool_pixels[:2], normal_pixels)  # the normals first, then one generated image
    assert not torch.equal(pool_pixels[2], pool_pixels[0]) and not torch.equal(pool_pixels[2], pool_pixels[1])

    bank = model.build_reference_bank()
    assert bank.k == model.config.pool_size and bank.class_name == "grid"
    pool_tokens = model.clip_features(pool_pixels)
    for layer in model.config.feature_layers:
        assert torch.equal(bank.tensors[f"memory.{layer}"], pool_tokens[str(layer)].flatten(0, 1))

    pixels = processor([image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt")
    features = model.encode_images(pixels.pixel_values)
    output = model(pixels.pixel_values, reference_bank=bank)
    expected = _float64_triplet_scores(features, bank, model.config.feature_layers, 0.7, 0.2, 0.05)
    # the model computes in float32: scores up to ~2 here (ulp 2.4e-7) after a few roundings; measured 4e-7
    for name in ("personalized", "pool", "text"):
        torch.testing.assert_close(output.branch_scores[name].double(), expected[name], rtol=0, atol=1e-6)
    torch.testing.assert_close(output.image_scores.double(), expected["A"], rtol=0, atol=1e-6)
    expected_maps = model.to_pixel_maps(expected["map"].float())
    # as above: float32 maps in [0, 2] after a few roundings
    torch.testing.assert_close(output.anomaly_maps, expected_maps, rtol=0, atol=1e-6)
    assert output.branch_scores["personalized"].min() > 0  # the personalized images differ from the queries

    augmented = model.augment_references_with_generated(normals, 2)
    assert len(augmented) == 4 and augmented[:2] == normals
    # the generated ones are marked, so a bank built from them counts them and refuses leave-one-out
    assert [GENERATED_IMAGE_INFO in image.info for image in augmented] == [False, False, True, True]

    # fitted on the normals, the model still knows a left-out one: leave-one-out is refused (not unfitted)
    assert make_model(diffusion_dir).leave_one_out_refusal(2) is None
    same, refusal = calibrate_reference_bank(
        model, model.build_reference_bank(normal_pixels), reference_pixel_values=normal_pixels
    )
    assert same.calibration is None and "was fitted (`fit`) on normal images" in refusal


def test_a_saved_fitted_model_comes_back_fitted(diffusion_dir, tmp_path):
    """The anomaly-free pool is saved in the safetensors weights: a loaded model scores without references,
    exactly as the fitted one did."""
    from safetensors import safe_open

    model = make_model(diffusion_dir)
    data = toy()
    model.fit(
        [image.convert("RGB") for image in data["train"]["image"]], class_name="grid", steps=2, **TINY_FIT
    )
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as weights:
        assert weights.get_slice("pool_pixels").get_shape() == [3, 240, 240, 3]
    loaded = AutoModel.from_pretrained(tmp_path)
    assert loaded.config.num_pool_images == 3 and torch.equal(loaded.pool_pixels, model.pool_pixels)
    pixels = model.image_processor()(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values
    before, after = model(pixels), loaded(pixels)
    assert torch.equal(before.image_scores, after.image_scores)
    assert torch.equal(before.anomaly_maps, after.anomaly_maps)
    assert not make_model(diffusion_dir).pool_images  # an unfitted model has none


def test_default_input_is_the_papers_240_px_a_17x17_grid_at_patch_14(tmp_path):
    """Whatever the tower's size (224 here, as openai/clip-vit-large-patch14), a fresh model (`from_clip`,
    which `hf-fsad fit` uses) takes 240 px images: 17 x 17 patches of 14 pixels."""
    from hf_fsad.loading import load_method
    from hf_fsad.testing import save_random_clip

    clip_dir = save_random_clip(tiny_clip_config(image_size=224, patch_size=14), tmp_path / "clip")
    model = load_method(f"one_to_normal@{clip_dir}")
    assert model.config.image_size == 240 and model.grid_size() == (17, 17)
    assert model.image_processor().size == {"height": 240, "width": 240}
    tokens = model.clip_features(torch.randn(1, 3, 240, 240))
    assert all(tokens[str(layer)].shape[1] == 17 * 17 for layer in model.config.feature_layers)
    assert OneToNormalConfig(clip_config=tiny_clip_config(image_size=224), image_size=None).image_size == 224


def test_pool_above_8192_items_is_searched_exactly_unless_thinning_is_asked(diffusion_dir, coreset_warnings):
    """37 pool images x 225 patches = 8,325 items per level (the paper's 30 x 289 at ViT-L/14 is 8,670): the
    default bank keeps them all and S_N equals a float64 brute-force min over them; max_memory_items=8192 thins
    each level to a coreset of exact items, with a warning, and S_N can then only rise."""
    torch.manual_seed(1)
    pool, queries = torch.randn(37, 3, 240, 240), torch.randn(2, 3, 240, 240)
    exact_model, thinned_model = make_model(diffusion_dir), make_model(diffusion_dir, max_memory_items=8192)
    layers = exact_model.config.feature_layers
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the default thins nothing, so it warns of nothing
        exact = exact_model.build_reference_bank(pool, class_name="grid")
    with pytest.warns(UserWarning) as caught:
        thinned = thinned_model.build_reference_bank(pool, class_name="grid")
    assert coreset_warnings(caught) == {
        f"one_to_normal: memory 'memory.{layer}' holds 8325 items; keeping a greedy k-center coreset of 8192"
        for layer in layers
    }

    pool_tokens = exact_model.clip_features(pool)
    query_tokens = exact_model.clip_features(queries)
    features = {f"query.{key}": value for key, value in query_tokens.items()}
    features |= {f"personalized.{layer}": query_tokens[str(layer)] for layer in layers}  # S_P = 0
    expected = []
    for layer in layers:
        memory = exact.tensors[f"memory.{layer}"]
        assert torch.equal(memory, pool_tokens[str(layer)].flatten(0, 1)) and memory.shape[0] == 8325
        rows = thinned.tensors[f"memory.{layer}"]
        exact_rows = {row.numpy().tobytes() for row in memory}
        assert rows.shape[0] == 8192 and all(row.numpy().tobytes() in exact_rows for row in rows)
        cosines = (
            F.normalize(query_tokens[str(layer)].double(), dim=-1) @ F.normalize(memory.double(), dim=-1).T
        )
        expected.append((1 - cosines.amax(-1)).amax(-1))
    s_n = exact_model.score_features(features, exact).branch_scores["pool"]
    # float32 cosines of 32-d tokens against float64: rounding of a few ulp of 1
    torch.testing.assert_close(s_n.double(), torch.stack(expected).mean(0), rtol=0, atol=1e-6)
    thinned_s_n = thinned_model.score_features(features, thinned).branch_scores["pool"]
    assert (thinned_s_n >= s_n - 1e-6).all()  # a subset's nearest item is never nearer (same rounding)


class RestoreDefectRegions:
    """Test double of the personalizer: the identity on normal regions, and inside the known defect of an
    image its median normal colour. It stands in for a diffusion model that restored the defect perfectly,
    to test the scoring path (S_P) apart from the generation."""

    def __init__(self, masks_by_image: dict[str, np.ndarray]):
        self.masks_by_image = masks_by_image

    @staticmethod
    def key(image: Image.Image) -> str:
        return hashlib.sha256(np.asarray(image).tobytes()).hexdigest()

    def personalize(self, images, prompts):
        restored = []
        for image in images:
            array = np.asarray(image).copy()
            mask = self.masks_by_image.get(self.key(image))
            if mask is not None and mask.any():
                array[mask] = np.median(array[~mask], axis=0).astype(np.uint8)
            restored.append(Image.fromarray(array))
        return restored


def test_with_a_perfect_restorer_s_p_localises_planted_defects(diffusion_dir):
    model = make_model(diffusion_dir, clip_config=small_clip_config())
    data = toy(num_test_good=4, num_test_anomalous=8)
    size = model.config.image_size
    pixels = model.image_processor()(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    )
    masks = np.stack([mask_array(mask, size) for mask in data["test"]["mask"]])
    images = model.to_images(pixels.pixel_values)
    model.personalizer = RestoreDefectRegions({RestoreDefectRegions.key(i): m for i, m in zip(images, masks)})
    features = model.encode_images(pixels.pixel_values)
    layers = model.config.feature_layers
    s_p_map = torch.stack(
        [
            functional_one_to_normal.personalized_difference(
                features[f"query.{l}"], features[f"personalized.{l}"]
            )
            for l in layers
        ]
    ).mean(0)
    auroc = pixel_auroc(masks, model.to_pixel_maps(s_p_map).numpy())
    print(f"S_P pixel AUROC with a perfect restorer: {auroc:.3f}")
    assert auroc >= 0.85
    normals = np.asarray(data["test"]["label"]) == 0
    # identity: S_P = 1 - cos of each token with itself, 0 up to the float32 rounding of the normalisation
    assert torch.allclose(s_p_map[torch.from_numpy(normals)], torch.zeros(1), atol=1e-6)


def test_full_finetune_saves_the_unet_and_reloads_it_exactly(diffusion_dir, tmp_path):
    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    base = load_img2img_pipeline(diffusion_dir).unet.state_dict()
    model.fit(normals, class_name="grid", steps=2, learning_rate=1e-3, full_finetune=True, **TINY_FIT)
    tuned = model.get_personalizer().pipeline.unet.state_dict()
    assert model.lora_weights is None and any(not torch.equal(tuned[k], base[k]) for k in base)
    prompts = model.prompts(model.config.normal_state_prompts)
    expected = model.get_personalizer().generate(normals[0], prompts)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "unet").is_dir() and not (tmp_path / "pytorch_lora_weights.safetensors").exists()
    loaded = AutoModel.from_pretrained(tmp_path)
    actual = loaded.get_personalizer().generate(normals[0], prompts)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(actual, expected))
    assert (
        loaded.feature_key() != make_model(diffusion_dir).feature_key()
    )  # the fine-tune enters the features


def test_runner_fits_one_to_normal_per_cell_and_augments_other_methods_references(diffusion_dir, tmp_path):
    """The One-to-Normal cell scores what a copy fitted on the cell's references scores; the WinCLIP+ cell with
    generated references scores what a bank of the references plus the images a fitted generator makes
    scores, and the plain cell what the references alone score."""
    from hf_fsad.data import class_name_for
    from hf_fsad.data.sampling import select_ids
    from hf_fsad.evaluation import DatasetSpec, run_benchmark
    from hf_fsad.models.one_to_normal.modeling_one_to_normal import GeneratedReferences
    from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel

    options = {"num_train": 3, "num_test_good": 2, "num_test_anomalous": 2}
    spec = DatasetSpec("toy", categories=["grid"], options=options)
    data = load_benchmark("toy", category="grid", **options)
    class_name = class_name_for("toy", "grid")
    fit = {"steps": 1} | TINY_FIT
    model = make_model(diffusion_dir)
    results = run_benchmark(
        {"one_to_normal": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "o", fit_arguments=fit
    )
    (cell,) = results["cells"]
    assert cell["fit_seconds"] > 0
    assert not model.pool_images  # the runner fitted a copy
    normals = select_ids(data["train"], cell["reference_ids"])["image"]
    test_pixels = model.image_processor()(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values
    fitted = make_model(diffusion_dir)
    fitted.fit(normals, class_name=class_name, seed=0, **fit)
    expected = fitted(test_pixels, reference_bank=fitted.build_reference_bank(class_name=class_name))
    # the runner encodes and scores in its own batches: other matrix shapes may round the last float32 bits
    np.testing.assert_allclose(cell["image_scores"], expected.image_scores.numpy(), rtol=0, atol=1e-6)

    torch.manual_seed(0)
    winclip = WinClipModel(WinClipConfig(clip_config=tiny_clip_config())).eval()
    winclip.tokenizer = byte_level_clip_tokenizer()
    generated = GeneratedReferences(make_model(diffusion_dir, pool_size=1), 2, fit)
    plain = run_benchmark({"winclip": winclip}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "p")
    augmented = run_benchmark(
        {"winclip+generated": winclip},
        [spec],
        ks=[2],
        seeds=[0],
        out_dir=tmp_path / "a",
        generated_references=generated,
    )
    (plain_cell,), (augmented_cell,) = plain["cells"], augmented["cells"]
    assert augmented_cell["generated_references"] == 2 and plain_cell["generated_references"] == 0
    assert augmented_cell["reference_ids"] == plain_cell["reference_ids"] == cell["reference_ids"]
    generator = make_model(diffusion_dir, pool_size=1)
    generator.fit(normals, class_name=class_name, seed=0, **fit)
    references = [image.convert("RGB") for image in normals] + generator.generate_normals(normals, 2)
    reference_pixels = winclip.image_processor()(references, return_tensors="pt").pixel_values
    test_pixels = winclip.image_processor()(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    ).pixel_values

    @torch.no_grad()
    def winclip_scores(reference_pixels: torch.Tensor) -> np.ndarray:
        bank = winclip.build_reference_bank(reference_pixels, class_name=class_name)
        return winclip(test_pixels, reference_bank=bank).image_scores.numpy()

    with_generated, without = winclip_scores(reference_pixels), winclip_scores(reference_pixels[:2])
    # as above: the runner's batches may round the last float32 bits differently
    np.testing.assert_allclose(augmented_cell["image_scores"], with_generated, rtol=0, atol=1e-6)
    np.testing.assert_allclose(plain_cell["image_scores"], without, rtol=0, atol=1e-6)
    assert np.abs(with_generated - without).max() > 1e-3  # the two generated references do move the scores


# `runwayml/stable-diffusion-v1-5` left the Hub in 2024; its maintained copy is this repository.
MAINTAINED_SD15 = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def test_every_default_diffusion_model_is_the_maintained_stable_diffusion_1_5(capsys):
    from hf_fsad.cli import main
    from hf_fsad.training.recipes import dreambooth_main

    assert OneToNormalConfig().diffusion_model == MAINTAINED_SD15
    for command in (lambda: main(["fit", "--help"]), lambda: dreambooth_main(["--help"])):
        with pytest.raises(SystemExit):
            command()
        assert MAINTAINED_SD15 in "".join(capsys.readouterr().out.split())


def test_no_file_of_the_repository_names_the_removed_stable_diffusion_repository():
    root = Path(__file__).resolve().parents[1]
    removed = "runway" + "ml/stable-diffusion"  # split, so that this file does not name it
    folders = ("src", "training", "docs", "spaces", "benchmarks")
    files = [root / "README.md"] + [path for folder in folders for path in (root / folder).rglob("*")]
    named = [
        str(path.relative_to(root))
        for path in files
        if path.suffix in {".py", ".md", ".yaml", ".txt"} and path.is_file() and removed in path.read_text()
    ]
    assert named == []


def test_eq_6_as_printed_is_a_sigmoid_of_the_cosine_gap_close_to_one_half():
    """text_temperature=1 (Eq. 6 with no scale): S_text = sigmoid(cos_a - cos_n), within a quarter of the gap
    of 0.5, where CLIP's scale 100 (the default 0.01) spreads the same gaps over (0, 1)."""
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)  # (normal, anomalous)
    embeddings = torch.tensor([[0.8, 0.6], [0.6, 0.8], [0.71, 0.70]], dtype=torch.float64)
    gaps = torch.tensor([0.6 - 0.8, 0.8 - 0.6, 0.70 - 0.71], dtype=torch.float64)
    gaps = gaps / embeddings.norm(dim=-1)  # cosines of the normalised embeddings
    literal = scoring.class_scores(embeddings, text, 1.0)
    # float64: the same exp in another form (~1e-16)
    torch.testing.assert_close(literal, torch.sigmoid(gaps), rtol=1e-12, atol=0)
    assert ((literal - 0.5).abs() <= gaps.abs() / 4).all()  # sigmoid's slope is at most 1/4
    scaled = scoring.class_scores(embeddings, text, 0.01)
    assert scaled[1] - scaled[0] > 0.99 and literal[1] - literal[0] < 0.11


def test_paper_settings_are_valid_and_the_script_passes_them(tiny_clip_dir, tmp_path, monkeypatch):
    from hf_fsad.models.one_to_normal.configuration_one_to_normal import PAPER_SETTINGS, UNDETERMINED_SETTINGS
    from hf_fsad.models.one_to_normal.training_one_to_normal import OneToNormalTrainingArguments
    from hf_fsad.training.recipes import dreambooth_main

    config = OneToNormalConfig(clip_config=tiny_clip_config(), **PAPER_SETTINGS["config"])
    assert (config.image_size, config.text_temperature) == (240, 1.0)
    assert OneToNormalTrainingArguments(**PAPER_SETTINGS["training"]).full_finetune
    assert "diffusion_resolution" in UNDETERMINED_SETTINGS

    seen = {}

    class Stop(Exception):
        pass

    def fit(model, normals, class_name, **arguments):
        seen.update(config=model.config, arguments=arguments)
        raise Stop

    monkeypatch.setattr(OneToNormalModel, "fit", fit)
    toy()["train"]["image"][0].convert("RGB").save(tmp_path / "normal.png")
    arguments = ["--normal", str(tmp_path / "normal.png"), "--class-name", "grid", "--out", str(tmp_path)]
    paper = ["--full-finetune", "--learning-rate", "5e-6", "--text-temperature", "1"]
    with pytest.raises(Stop):
        dreambooth_main([*arguments, "--clip", tiny_clip_dir, *paper, "--diffusion-resolution", "512"])
    assert (seen["config"].text_temperature, seen["config"].image_size) == (1.0, 240)
    assert seen["config"].diffusion_resolution == 512
    assert seen["arguments"]["full_finetune"] and seen["arguments"]["learning_rate"] == 5e-6
