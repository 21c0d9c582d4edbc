"""Synthetic anomalies (VTFusion's DAS): exact masks, seeded, each type doing what it says."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_fsad.data import load_benchmark
from hf_fsad.synthesis import ANOMALY_TYPES, SYNTHESIS_KINDS, random_anomaly, synthesize


@pytest.fixture(scope="module")
def textures() -> list[Image.Image]:
    data = load_benchmark("toy", num_train=2, num_test_good=0, num_test_anomalous=0, image_size=96)
    return list(data["train"]["image"])


@pytest.mark.parametrize("kind", SYNTHESIS_KINDS)
def test_the_mask_is_exactly_the_changed_pixels(textures, kind):
    for seed, texture in enumerate(textures):
        original = np.asarray(texture.convert("RGB")).astype(int)
        image, mask = synthesize(texture, kind, np.random.default_rng(seed), tolerance=8)
        changed = np.asarray(image).astype(int)
        assert mask.shape == original.shape[:2] and mask.dtype == bool and mask.any()
        assert np.array_equal(changed[~mask], original[~mask])  # nothing outside the mask changes
        assert (np.abs(changed - original).max(axis=-1)[mask] > 8).all()  # everything inside changed visibly


@pytest.mark.parametrize("kind", SYNTHESIS_KINDS)
def test_synthesis_is_seeded(textures, kind):
    first = synthesize(textures[0], kind, np.random.default_rng(7))
    again = synthesize(textures[0], kind, np.random.default_rng(7))
    other = synthesize(textures[0], kind, np.random.default_rng(8))
    assert np.array_equal(np.asarray(first[0]), np.asarray(again[0])) and np.array_equal(first[1], again[1])
    assert not np.array_equal(first[1], other[1])


def test_each_type_changes_the_image_in_its_own_way(textures):
    texture = textures[0]
    original = np.asarray(texture.convert("RGB")).astype(float)

    def local_variation(array, mask):
        return np.abs(np.diff(array, axis=1)).max(axis=-1)[mask[:, 1:]].mean()

    image, mask = synthesize(texture, "blurry", np.random.default_rng(0))
    assert local_variation(np.asarray(image).astype(float), mask) < local_variation(original, mask)
    image, mask = synthesize(texture, "noise", np.random.default_rng(0))
    assert local_variation(np.asarray(image).astype(float), mask) > local_variation(original, mask)
    _, mask = synthesize(texture, "crack", np.random.default_rng(0))
    assert mask.mean() < 0.1  # thin strokes
    image, mask = synthesize(texture, "misplaced", np.random.default_rng(0))
    colours = {tuple(pixel) for pixel in original.astype(int).reshape(-1, 3)}
    pasted = np.asarray(image).astype(int)[mask]
    assert np.mean([tuple(pixel) in colours for pixel in pasted]) > 0.99  # texture from the same image


def test_random_anomaly_draws_only_the_allowed_kinds(textures):
    rng = np.random.default_rng(0)
    kinds = {random_anomaly(textures[0], rng, kinds=("noise", "crack"))[2] for _ in range(12)}
    assert kinds == {"noise", "crack"}
    assert set(ANOMALY_TYPES) < set(SYNTHESIS_KINDS)


def test_bad_inputs_are_refused():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="Unknown anomaly type"):
        synthesize(Image.new("RGB", (32, 32)), "scratch", rng)
    with pytest.raises(ValueError, match="at least 8x8"):
        synthesize(Image.new("RGB", (4, 4)), "noise", rng)
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        synthesize(np.zeros((32, 32)), "noise", rng)
    with pytest.raises(ValueError, match="flat"):
        synthesize(Image.new("RGB", (32, 32), (90, 90, 90)), "blurry", rng)
    with pytest.raises(ValueError, match="at least one"):
        random_anomaly(Image.new("RGB", (32, 32)), rng, kinds=())
