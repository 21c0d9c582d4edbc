"""The toy benchmark: seeded, labelled consistently, masks exactly where the defect is."""

from __future__ import annotations

import numpy as np
import pytest

from hf_fsad.data.common import FEATURES
from hf_fsad.data.toy import TOY_CATEGORIES, TOY_DEFECTS, load_toy, toy_records


def test_same_seed_same_images_other_seed_other_images():
    first, again, other = (toy_records("grid", seed=s, num_train=1) for s in (0, 0, 1))
    assert np.array_equal(np.asarray(first["test"][-1].image), np.asarray(again["test"][-1].image))
    assert not np.array_equal(np.asarray(first["train"][0].image), np.asarray(other["train"][0].image))


@pytest.mark.parametrize("category", sorted(TOY_CATEGORIES))
def test_labels_masks_and_defect_types_agree(category):
    dataset = load_toy(category, num_train=3, num_test_good=2, num_test_anomalous=6, image_size=96)
    assert dataset["train"]["label"] == [0, 0, 0]
    test = dataset["test"]
    assert test["label"] == [0, 0] + [1] * 6
    assert test["defect_type"] == ["good", "good", *TOY_DEFECTS, *TOY_DEFECTS]
    for example in test:
        if example["label"] == 0:
            assert example["mask"] is None
        else:
            mask = np.asarray(example["mask"])
            assert mask.shape == (96, 96) and set(np.unique(mask)) == {0, 255}
            assert 0 < (mask > 0).mean() < 0.2
    assert len(set(dataset["train"]["path"]) | set(test["path"])) == 11


def test_planted_pixels_are_exactly_the_masked_ones():
    """The defect changes the texture only inside its mask: outside it, the image is the defect-free one."""
    clean = toy_records("stripes", num_train=0, num_test_good=1, num_test_anomalous=0, seed=4)["test"][0]
    damaged = toy_records("stripes", num_train=0, num_test_good=0, num_test_anomalous=1, seed=4)["test"][0]
    difference = np.abs(np.asarray(clean.image, int) - np.asarray(damaged.image, int)).sum(-1)
    mask = np.asarray(damaged.mask) > 0
    assert not difference[~mask].any()
    assert (difference[mask] > 0).mean() > 0.9


def test_empty_split_keeps_the_features():
    dataset = load_toy("weave", num_train=0, num_test_good=1, num_test_anomalous=1, image_size=64)
    assert dataset["train"].num_rows == 0
    assert dataset["train"].features == FEATURES


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"category": "marble"}, "Unknown toy category"), ({"defects": ("dent",)}, "Toy defects must be")],
)
def test_unknown_names_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        toy_records(**kwargs)
