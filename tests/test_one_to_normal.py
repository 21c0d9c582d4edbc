"""One-to-Normal (papers/one-to-normal.txt): Eqs. 2 and 4-7, img2img strength, DreamBooth LoRA, save/load.

The diffusion model is a tiny random Stable Diffusion pipeline saved locally (diffusers' test sizes): its
images are noise, so these tests prove the machinery, and a test double proves the scoring path.
"""

from __future__ import annotations

import hashlib
import math
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.ndimage import gaussian_filter
from transformers import AutoModel

import hf_fsad
from hf_fsad import scoring
from hf_fsad.data import load_benchmark
from hf_fsad.diffusion import Personalizer, load_img2img_pipeline, most_similar, require_diffusers
from hf_fsad.metrics.functional import pixel_auroc
from hf_fsad.models.one_to_normal.configuration_one_to_normal import OneToNormalConfig
from hf_fsad.models.one_to_normal.modeling_one_to_normal import OneToNormalModel
from hf_fsad.testing import (
    byte_level_clip_tokenizer,
    save_tiny_diffusion_pipeline,
    small_clip_config,
    tiny_clip_config,
)
from hf_fsad.visualization import mask_array

pytest.importorskip("diffusers", reason="One-to-Normal needs the diffusers extra (installed by `make test`)")

FAST = {"diffusion_resolution": 32, "num_inference_steps": 10, "pool_size": 3}
TINY_FIT = {"num_class_images": 1, "class_image_steps": 2}


@pytest.fixture(scope="module")
def diffusion_dir(tmp_path_factory) -> str:
    return save_tiny_diffusion_pipeline(tmp_path_factory.mktemp("tiny_sd"))


def make_model(diffusion_dir: str, clip_config=None, **config) -> OneToNormalModel:
    torch.manual_seed(0)
    settings = FAST | {"diffusion_model": diffusion_dir} | config
    model = OneToNormalModel(OneToNormalConfig(clip_config=clip_config or tiny_clip_config(), **settings))
    model.tokenizer = byte_level_clip_tokenizer()
    return model.eval()


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
    actual = scoring.ssim(torch.from_numpy(x)[None], torch.from_numpy(y)[None])
    assert actual.item() == pytest.approx(_reference_ssim(x, y), rel=1e-9)
    assert scoring.ssim(torch.from_numpy(x)[None], torch.from_numpy(x)[None]).item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="one shape"):
        scoring.ssim(torch.zeros(1, 3, 20, 20), torch.zeros(1, 3, 20, 24))


def test_eq_2_selection_picks_the_candidate_most_similar_to_the_query():
    rng = np.random.default_rng(1)
    query = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    slightly = np.clip(query.astype(int) + rng.integers(-10, 11, query.shape), 0, 255).astype(np.uint8)
    strongly = np.clip(query.astype(int) + rng.integers(-90, 91, query.shape), 0, 255).astype(np.uint8)
    other = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
    candidates = [Image.fromarray(a) for a in (other, strongly, slightly)]
    assert most_similar(Image.fromarray(query), candidates) == 2


def test_eqs_4_to_7_on_hand_computed_features():
    query = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])  # (1 image, 2 patches, 2 dims)
    personalized = torch.tensor([[[1.0, 0.0], [1.0, 0.0]]])
    assert scoring.personalized_difference(query, personalized).tolist() == [[0.0, 1.0]]
    memory = torch.tensor([[0.6, 0.8], [-1.0, 0.0]])
    torch.testing.assert_close(scoring.pool_difference(query, memory), torch.tensor([[0.4, 0.2]]))
    level_maps = [torch.tensor([[0.0, 1.0]]), torch.tensor([[0.5, 0.2]])]
    assert scoring.level_mean_of_maxima(level_maps).tolist() == [0.75]  # (1 + 0.5) / 2
    total = scoring.one_to_normal_score(
        torch.tensor([0.75]), torch.tensor([0.3]), torch.tensor([0.8]), 1.0, 0.5
    )
    assert total.item() == pytest.approx(0.75 + 0.3 + 0.4)
    text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    expected = math.exp(100 * 0.6) / (math.exp(100 * 0.8) + math.exp(100 * 0.6))  # Eq. 6, cos 0.8 / 0.6
    assert scoring.class_scores(torch.tensor([[0.8, 0.6]]), text, 0.01).item() == pytest.approx(expected)


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
    total = pipeline.scheduler.config.num_train_timesteps
    assert seen[0] == round(0.3 * total) - 1  # trailing spacing: 299 of 0..999, the noised level of x_q,t
    assert len(set(seen)) == 3  # 0.3 x 10 steps, each run once (guidance batches both prompts)


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


def _fixed_denoising_loss(trainer, images) -> float:
    """The instance denoising loss on fixed draws (images, noise, timesteps)."""
    generator = torch.Generator().manual_seed(123)
    with torch.no_grad():
        latents = trainer._encode(images, generator)
        return float(
            sum(trainer._denoising_loss(latents, trainer.instance_embedding, generator) for _ in range(8)) / 8
        )


def test_lora_fit_lowers_the_denoising_loss_and_touches_only_lora(diffusion_dir):
    from hf_fsad.training.dreambooth import DreamBoothArguments, DreamBoothLoraTrainer

    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    args = DreamBoothArguments(
        max_steps=40, learning_rate=1e-2, num_class_images=0, crop_scale_range=(1.0, 1.0)
    )
    trainer = DreamBoothLoraTrainer(model, normals, "grid", args)
    base = {name: p.clone() for name, p in trainer.unet.named_parameters() if "lora_" not in name}
    before = _fixed_denoising_loss(trainer, trainer.normals)
    trainer.train()
    after = _fixed_denoising_loss(trainer, trainer.normals)
    print(f"instance denoising loss {before:.4f} -> {after:.4f}")
    assert after < before
    assert all(
        torch.equal(p, base[name]) for name, p in trainer.unet.named_parameters() if "lora_" not in name
    )
    assert model.lora_weights and all("lora" in name for name in model.lora_weights)


def test_eq_1_denoising_loss_is_the_mse_to_the_noise(diffusion_dir):
    from hf_fsad.training.dreambooth import DreamBoothArguments, DreamBoothLoraTrainer

    model = make_model(diffusion_dir)
    normals = [image.convert("RGB") for image in toy()["train"]["image"]]
    trainer = DreamBoothLoraTrainer(
        model, normals, "grid", DreamBoothArguments(max_steps=1, num_class_images=0)
    )
    prediction = torch.full((2, 4, 16, 16), 0.5)
    trainer.unet = lambda noisy, timesteps, encoder_hidden_states: type("Out", (), {"sample": prediction})
    latents = torch.zeros(2, 4, 16, 16)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(7))
    loss = trainer._denoising_loss(latents, trainer.instance_embedding, torch.Generator().manual_seed(7))
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
    from hf_fsad.training.dreambooth import main as train_main

    normal_dir = tmp_path / "normal"
    normal_dir.mkdir()
    for index, image in enumerate(toy()["train"]["image"]):
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
    settings = [
        "--diffusion-model",
        diffusion_dir,
        "--steps",
        "2",
        "--num-class-images",
        "1",
        "--resolution",
        "32",
    ]
    assert train_main([*arguments, *settings, "--pool-size", "3"]) == 0
    assert "skipped normal image" in capsys.readouterr().err
    loaded = AutoModel.from_pretrained(out)
    assert loaded.lora_source is not None and loaded.config.fitted_class_name == "grid"


# --- scoring end to end ------------------------------------------------------------------------------------------


def test_end_to_end_fit_pool_and_scores_are_finite(diffusion_dir, tmp_path):
    model = make_model(diffusion_dir)
    data = toy()
    normals = [image.convert("RGB") for image in data["train"]["image"]]
    model.fit(normals, class_name="grid", steps=2, **TINY_FIT)
    assert len(model.pool_images) == model.config.pool_size
    bank = model.build_reference_bank()
    assert bank.k == model.config.pool_size and bank.class_name == "grid"
    pixels = model.image_processor()(
        [image.convert("RGB") for image in data["test"]["image"]], return_tensors="pt"
    )
    output = model(pixels.pixel_values, reference_bank=bank)
    assert torch.isfinite(output.image_scores).all() and torch.isfinite(output.anomaly_maps).all()
    parts = output.branch_scores
    combined = parts["personalized"] + parts["pool"] + 0.5 * parts["text"]
    torch.testing.assert_close(output.image_scores, combined)
    augmented = model.augment_references_with_generated(normals, 2)
    assert len(augmented) == 4 and augmented[:2] == normals


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
            scoring.personalized_difference(features[f"query.{l}"], features[f"personalized.{l}"])
            for l in layers
        ]
    ).mean(0)
    auroc = pixel_auroc(masks, model.to_pixel_maps(s_p_map).numpy())
    print(f"S_P pixel AUROC with a perfect restorer: {auroc:.3f}")
    assert auroc >= 0.85
    normals = np.asarray(data["test"]["label"]) == 0
    assert torch.allclose(s_p_map[torch.from_numpy(normals)], torch.zeros(1), atol=1e-5)  # identity: S_P = 0


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
    from hf_fsad.benchmark import DatasetSpec, GeneratedReferences, run_benchmark
    from hf_fsad.models.winclip.configuration_winclip import WinClipConfig
    from hf_fsad.models.winclip.modeling_winclip import WinClipModel

    spec = DatasetSpec(
        "toy", categories=["grid"], options={"num_train": 3, "num_test_good": 2, "num_test_anomalous": 2}
    )
    fit = {"steps": 1} | TINY_FIT
    model = make_model(diffusion_dir)
    results = run_benchmark(
        {"one_to_normal": model}, [spec], ks=[2], seeds=[0], out_dir=tmp_path / "o", fit_arguments=fit
    )
    (cell,) = results["cells"]
    assert cell["fit_seconds"] > 0 and np.isfinite(cell["image_scores"]).all()
    assert not model.pool_images  # the runner fitted a copy

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
    assert augmented_cell["reference_ids"] == plain_cell["reference_ids"]
    assert augmented_cell["image_scores"] != plain_cell["image_scores"]  # two more references in the bank
