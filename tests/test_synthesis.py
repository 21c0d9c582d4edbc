"""Synthetic anomalies (VTFusion's DAS): exact masks, seeded, each type doing what it says."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_fsad.data import load_benchmark
from hf_fsad.synthesis import (
    ANOMALY_TYPES,
    DEFAULT_SIZE_RANGE,
    SYNTHESIS_KINDS,
    estimate_foreground,
    random_anomaly,
    synthesize,
)


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


def object_on_background(texture: Image.Image, radius: int = 30) -> tuple[Image.Image, np.ndarray]:
    """The texture cut to a centred disk on a dark, slightly noisy background, and the disk."""
    side = texture.size[0]
    y, x = np.mgrid[0:side, 0:side]
    disk = (y - side / 2 + 0.5) ** 2 + (x - side / 2 + 0.5) ** 2 <= radius**2
    background = 30 + np.random.default_rng(0).normal(0, 2, size=(side, side, 3))
    array = np.where(disk[..., None], np.asarray(texture.convert("RGB")), np.clip(background, 0, 255))
    return Image.fromarray(array.astype(np.uint8)), disk


def test_foreground_is_the_object_off_the_border_colour_or_the_whole_texture(textures):
    image, disk = object_on_background(textures[0])
    foreground = estimate_foreground(image)
    assert (foreground & disk).sum() / (foreground | disk).sum() > 0.97  # IoU with the true disk
    assert all(estimate_foreground(texture).all() for texture in textures)  # textures: no background colour
    assert estimate_foreground(Image.new("RGB", (32, 32), (90, 90, 90))).all()  # nothing stands out


@pytest.mark.parametrize("kind", ["crack", "combined"])
def test_cracks_stay_on_the_foreground(textures, kind):
    image, _ = object_on_background(textures[0])
    foreground = estimate_foreground(image)
    cracks = 0
    for seed in range(8):
        _, mask = synthesize(image, kind, np.random.default_rng(seed), misplaced_rotation=0.0)
        if kind == "crack":
            assert mask.any() and not (mask & ~foreground).any()
        cracks += mask.any()
    assert cracks == 8


def coordinate_image(side: int = 96) -> np.ndarray:
    """Red = column, green = row: a translated copy keeps the +1 steps, a 180-degree rotation reverses them."""
    y, x = np.mgrid[0:side, 0:side]
    return np.stack([x, y, np.full_like(x, 128)], axis=-1).astype(np.uint8)


@pytest.mark.parametrize(("rotation", "step"), [(0.0, 1), (1.0, -1)])
def test_misplaced_patches_are_translated_copies_unless_rotation_is_asked(rotation, step):
    image = coordinate_image()
    for seed in range(6):
        changed, mask = synthesize(
            image, "misplaced", np.random.default_rng(seed), misplaced_rotation=rotation
        )
        red, green = np.asarray(changed)[..., 0].astype(int), np.asarray(changed)[..., 1].astype(int)
        pairs = mask[:, 1:] & mask[:, :-1]  # horizontal neighbours both pasted
        steps = (red[:, 1:] - red[:, :-1])[pairs]
        assert np.mean(steps == step) > 0.9, seed  # the rest: seams where one pasted patch overlaps another
        rows = mask[1:] & mask[:-1]
        assert np.mean((green[1:] - green[:-1])[rows] == step) > 0.9, seed
    with pytest.raises(ValueError, match="probability"):
        synthesize(image, "misplaced", np.random.default_rng(0), misplaced_rotation=2)


def test_region_sizes_span_the_default_range():
    """Noise regions are rectangles of side 2 x half-size, half-size drawn from 1-40 % of the side: their
    bounding boxes reach beyond the earlier 20 % cap and never beyond 40 %."""
    assert DEFAULT_SIZE_RANGE == (0.01, 0.4)
    image = Image.new("RGB", (100, 100), (128, 128, 128))
    halves = []
    for seed in range(40):
        _, mask = synthesize(image, "noise", np.random.default_rng(seed))
        rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        halves += [(rows[-1] - rows[0] + 1) / 2, (columns[-1] - columns[0] + 1) / 2]
    assert max(halves) <= 40 and max(halves) > 20 and min(halves) < 10


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


def test_normal_only_splits_get_synthetic_anomalies_with_exact_masks():
    from hf_fsad.data.synthetic import with_synthetic_anomalies

    normals = load_benchmark(
        "toy", category="stripes", num_train=2, num_test_good=0, num_test_anomalous=0, image_size=96
    )["train"]
    augmented = with_synthetic_anomalies(normals, per_image=2, kinds=("crack", "noise"), seed=3)
    assert augmented.num_rows == 6 and augmented["label"] == [0, 0, 1, 1, 1, 1]
    assert augmented.features == normals.features
    for row in range(2, 6):
        example = augmented[row]
        source_path, _, suffix = example["path"].partition("#")
        source = np.asarray(normals[normals["path"].index(source_path)]["image"].convert("RGB")).astype(int)
        changed = np.asarray(example["image"]).astype(int)
        mask = np.asarray(example["mask"]) > 0
        assert example["defect_type"] in ("synthetic-crack", "synthetic-noise") and suffix.startswith(
            "synthetic-"
        )
        assert mask.any() and np.array_equal(changed[~mask], source[~mask])
    again = with_synthetic_anomalies(normals, per_image=2, kinds=("crack", "noise"), seed=3)
    assert all(
        np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(augmented["image"], again["image"])
    )


def test_training_configs_can_add_synthetic_anomalies_to_normal_only_data():
    from hf_fsad.training.recipes import _auxiliary_dataset

    data = {"dataset": "toy", "categories": ["grid"], "splits": ["train"], "num_train": 3, "image_size": 96}
    assert set(_auxiliary_dataset(data)["label"]) == {0}
    dataset = _auxiliary_dataset(data | {"synthetic_anomalies": 1, "synthetic_kinds": ["blurry"]})
    assert dataset["label"] == [0, 0, 0, 1, 1, 1]
    assert set(dataset["defect_type"][3:]) == {"synthetic-blurry"}
