"""Augmentations: each view is the transform it claims, seeded; crops show the region and scale they claim."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from hf_fsad.augmentation import _perspective_coefficients, _transform, augment_views, random_crop

FLIPS = (Image.Transpose.FLIP_LEFT_RIGHT, Image.Transpose.FLIP_TOP_BOTTOM)


def random_image(side: int = 32, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (side, side, 3)).astype(np.uint8))


def ramp_image(side: int = 64, slope: int = 3) -> Image.Image:
    """Red = slope x column + 10, green = slope x row + 10: bicubic resampling reproduces linear ramps, so a
    resampled pixel's value says which input position it shows."""
    y, x = np.mgrid[0:side, 0:side]
    return Image.fromarray(
        np.stack([slope * x + 10, slope * y + 10, np.full_like(x, 90)], -1).astype(np.uint8)
    )


def corners(side: int) -> np.ndarray:
    return np.array([[0, 0], [side, 0], [side, side], [0, side]], float)


def test_perspective_coefficients_map_the_output_corners_to_the_input_corners():
    identity = _perspective_coefficients(corners(32), corners(32))
    np.testing.assert_allclose(identity, [1, 0, 0, 0, 1, 0, 0, 0], atol=1e-12)  # float64 linear solve
    moved = corners(32) + np.random.default_rng(0).uniform(-3, 3, size=(4, 2))
    a, b, c, d, e, f, g, h = _perspective_coefficients(corners(32), moved)
    for (x, y), (u, v) in zip(moved, corners(32)):  # PIL samples input (u, v) for output (x, y)
        denominator = g * x + h * y + 1
        np.testing.assert_allclose(
            [(a * x + b * y + c) / denominator, (d * x + e * y + f) / denominator], [u, v], atol=1e-12
        )  # float64 solve of an 8 x 8 system with entries up to ~1e3


def test_flip_and_quarter_turn_are_exact_and_the_identity_changes_nothing():
    image = random_image()
    identity = _perspective_coefficients(corners(32), corners(32))
    assert np.array_equal(np.asarray(_transform(image, [], 0.0, 0.0, identity, (0, 0, 0))), np.asarray(image))
    turned = _transform(image, [FLIPS[0]], 90.0, 0.0, identity, (0, 0, 0))
    expected = image.transpose(FLIPS[0]).transpose(Image.Transpose.ROTATE_90)
    assert np.array_equal(np.asarray(turned), np.asarray(expected))


def test_skew_shifts_each_row_by_shear_times_its_offset_from_the_centre():
    side, shear = 64, 0.1
    image = ramp_image(side, slope=2)
    identity = _perspective_coefficients(corners(side), corners(side))
    red = np.asarray(_transform(image, [], 0.0, shear, identity, (0, 0, 0)))[..., 0].astype(float)
    rows, columns = np.mgrid[0:side, 0:side]
    source = columns + shear * (rows + 0.5 - side / 2)  # input column shown at each output pixel
    inside = (source > 3) & (source < side - 4)  # away from the clamped image border
    # uint8 rounding and PIL's bicubic weights: within one grey level
    assert np.abs(red - (2 * source + 10))[inside].max() <= 1.0


def test_views_are_the_seeded_draws_of_flip_rotation_skew_and_distortion():
    image = random_image(40)
    views = augment_views(image, 4, seed=3)
    rng = np.random.default_rng(3)
    fill = tuple(int(c) for c in np.asarray(image).reshape(-1, 3).mean(axis=0))
    for view in views:
        flips = [method for method, flip in zip(FLIPS, rng.random(2) < 0.5) if flip]
        angle, shear = float(rng.uniform(-30, 30)), float(rng.uniform(-0.2, 0.2))
        offsets = rng.uniform(-0.08, 0.08, size=(4, 2))
        assert -30 <= angle <= 30 and -0.2 <= shear <= 0.2 and np.abs(offsets).max() <= 0.08
        coefficients = _perspective_coefficients(corners(40), corners(40) + offsets * 40)
        expected = _transform(image, flips, angle, shear, coefficients, fill)
        assert np.array_equal(np.asarray(view), np.asarray(expected))
    again = augment_views(image, 4, seed=3)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, again))
    other = augment_views(image, 4, seed=4)
    assert not any(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(views, other))
    assert all(view.size == image.size and view.mode == "RGB" for view in views)


def test_uncovered_corners_take_the_mean_colour():
    image = random_image(40)
    identity = _perspective_coefficients(corners(40), corners(40))
    rotated = np.asarray(_transform(image, [], 30.0, 0.0, identity, (7, 8, 9)))
    assert tuple(rotated[0, 0]) == (7, 8, 9) and tuple(rotated[-1, -1]) == (7, 8, 9)


def test_random_crop_shows_the_drawn_box_at_the_drawn_scale():
    side, slope, low, high = 64, 3, 0.5, 0.8
    image = ramp_image(side, slope)
    for seed in range(20):
        crop = np.asarray(random_crop(image, np.random.default_rng(seed), (low, high))).astype(float)
        rng = np.random.default_rng(seed)  # the same draws: scale, then left, then top
        width = round(side * rng.uniform(low, high))
        left, top = rng.integers(0, side - width + 1), rng.integers(0, side - width + 1)
        positions = (np.arange(side) + 0.5) * width / side - 0.5  # crop pixel -> box position
        inside = slice(6, side - 6)  # bicubic support away from the image border
        # uint8 rounding and PIL's bicubic weights: within one grey level
        assert np.abs(crop[0, inside, 0] - (slope * (left + positions[inside]) + 10)).max() <= 1.0
        assert np.abs(crop[inside, 0, 1] - (slope * (top + positions[inside]) + 10)).max() <= 1.0
        # the scale read off the ramp alone lies in the range (one pixel of rounding of the box side)
        scale = (crop[0, 50, 0] - crop[0, 10, 0]) / (slope * 40)
        assert low - 1.5 / side <= scale <= high + 1.5 / side
    whole = random_crop(image, np.random.default_rng(0), (1.0, 1.0))
    assert np.array_equal(np.asarray(whole), np.asarray(image))


@pytest.mark.parametrize("scale_range", [(0.0, 0.5), (0.9, 0.8), (0.5, 1.2)])
def test_random_crop_refuses_impossible_ranges(scale_range):
    with pytest.raises(ValueError, match="scale_range"):
        random_crop(ramp_image(), np.random.default_rng(0), scale_range)
