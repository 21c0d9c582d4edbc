"""What a calibrated verdict promises: non-finite scores fail, the normalised score neither saturates nor
contradicts the label, `confidence` holds over many calibration draws, the bank's format versions, copies kept
out of the calibration and the runtime and precision it was fitted at."""

from __future__ import annotations

import dataclasses
import json
import math
import warnings

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from hf_fsad.bank import BANK_FORMAT_VERSION, ReferenceBank
from hf_fsad.calibration import (
    CALIBRATION_FORMAT_VERSION,
    FALLBACK_RELATIVE_SCALE,
    MIN_RELATIVE_SCALE,
    Calibration,
    conformal_rank,
    conformal_threshold,
    fit_calibration,
    logistic_scale,
    normalize_around,
    normals_needed,
    score_at_level,
    score_error,
)
from hf_fsad.calibration_inputs import GENERATED_IMAGE_INFO, calibration_mismatch, separate_calibration_images
from hf_fsad.deploy import run_exported
from hf_fsad.io import json_safe

DTYPES = (torch.float32, torch.float64)
NON_FINITE = (float("nan"), float("inf"), float("-inf"))


def conformal(normal_scores, false_alarm_rate: float = 0.05, **changes) -> Calibration:
    """The conformal `Calibration` of held-out `normal_scores`, as `fit_calibration` makes it."""
    rule = fit_calibration(
        torch.tensor(normal_scores, dtype=torch.float64),
        None,
        normal_source="held_out",
        false_alarm_rate=false_alarm_rate,
    )
    return dataclasses.replace(rule, **changes)


# The saturating example: normals at 0.300-0.303 gave a logistic scale of 6.8e-4, and 0.34 and 0.40
# both normalised to exactly 1.0, even in float64.
SATURATING_NORMALS = np.linspace(0.300, 0.303, 20)


# --- non-finite scores -------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_non_finite_score_fails_the_part_and_says_why(dtype):
    rule = conformal(SATURATING_NORMALS)
    scores = torch.tensor([0.2, *NON_FINITE], dtype=dtype)
    assert rule.labels(scores).tolist() == [0, 1, 1, 1]
    assert rule.normalize(scores).tolist()[1:] == [1.0, 1.0, 1.0]  # "fail above 0.5" fails them too
    assert score_error(0.2) is None
    for value in NON_FINITE:
        assert f"the image score is {value}" in score_error(value) and "the part fails" in score_error(value)
    pixel_rule = dataclasses.replace(
        rule, pixel_threshold=0.5, pixel_scale=0.1, pixel_rule="false_alarm_rate"
    )
    maps = torch.tensor([[[0.1, float("nan")], [float("-inf"), 0.6]]], dtype=dtype)
    assert pixel_rule.masks(maps).tolist() == [[[False, True], [True, True]]]


def test_the_exported_runner_fails_a_non_finite_score_as_the_library_does():
    rule = conformal(SATURATING_NORMALS)
    manifest_calibration = json.loads(rule.to_json())
    scores = np.array([0.2, 0.35, *NON_FINITE], dtype=np.float32)  # as the exported graph returns them
    assert (
        run_exported.labels(scores, manifest_calibration).tolist()
        == rule.labels(torch.from_numpy(scores)).tolist()
    )
    np.testing.assert_array_equal(
        run_exported.normalized_scores(scores, manifest_calibration),
        rule.normalize(torch.from_numpy(scores)).numpy(),
    )


# --- ties: a value at its threshold is normal --------------------------------------------------------------


def next_above(value: float, dtype: torch.dtype) -> torch.Tensor:
    return torch.nextafter(torch.tensor(value, dtype=dtype), torch.tensor(math.inf, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_a_score_or_pixel_at_its_threshold_is_normal_and_the_next_float_above_is_not(dtype):
    """The conformal threshold is a normal's own score (here the largest of 3): that normal passes. Scores
    and pixels are anomalous strictly above their thresholds (0.75 and 0.5, exact in float32)."""
    rule = conformal([0.25, 0.5, 0.75])
    assert rule.image_threshold == 0.75
    scores = torch.stack([torch.tensor(0.75, dtype=dtype), next_above(0.75, dtype)])
    assert rule.labels(scores).tolist() == [0, 1]
    normalized = rule.normalize(scores)
    assert normalized[0] == 0.5 and normalized[1] > 0.5
    pixel_rule = dataclasses.replace(
        rule, pixel_threshold=0.5, pixel_scale=0.1, pixel_rule="false_alarm_rate"
    )
    maps = torch.stack([torch.tensor(0.5, dtype=dtype), next_above(0.5, dtype)]).reshape(1, 1, 2)
    assert pixel_rule.masks(maps).tolist() == [[[False, True]]]


def test_the_exported_runner_decides_a_score_at_the_threshold_as_the_library_does():
    rule = conformal([0.25, 0.5, 0.75])
    manifest_calibration = json.loads(rule.to_json())
    scores = torch.stack([torch.tensor(0.75), next_above(0.75, torch.float32)]).numpy()  # the graph's float32
    assert run_exported.labels(scores, manifest_calibration).tolist() == [0, 1]
    normalized = run_exported.normalized_scores(scores, manifest_calibration)
    assert normalized[0] == 0.5 and normalized[1] > 0.5


def test_the_exported_runner_marks_a_pixel_at_the_threshold_normal():
    """A map at the image's own size is resized exactly (each output pixel is one input pixel, weight 1)."""
    above = float(next_above(0.5, torch.float32))
    anomaly_map = np.array([[0.5, above], [0.25, 0.75]], dtype=np.float32)
    at_size, mask = run_exported.pixels_above(Image.new("RGB", (2, 2)), anomaly_map, {"pixel_threshold": 0.5})
    np.testing.assert_array_equal(at_size, anomaly_map)
    assert mask.tolist() == [[False, True], [False, True]]
    for no_pixel_threshold in (None, {"pixel_threshold": None}):
        assert run_exported.pixels_above(Image.new("RGB", (2, 2)), anomaly_map, no_pixel_threshold) is None


def test_the_exported_runner_compares_float32_scores_with_the_threshold_in_float64():
    """float32(0.1) is 1.5e-9 above the float64 threshold 0.1: anomalous, as the library decides (compared
    in float32 the two would tie). Non-finite scores raise no numpy warning on the way."""
    rule = conformal([0.0], image_threshold=0.1, image_scale=0.05)
    manifest_calibration = json.loads(rule.to_json())
    scores = np.array([0.1, np.inf, -np.inf, np.nan], dtype=np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        labels = run_exported.labels(scores, manifest_calibration)
        normalized = run_exported.normalized_scores(scores, manifest_calibration)
    assert labels.tolist() == rule.labels(torch.from_numpy(scores)).tolist() == [1, 1, 1, 1]
    np.testing.assert_array_equal(normalized, rule.normalize(torch.from_numpy(scores)).numpy())


def test_json_safe_records_write_null_for_non_finite_floats():
    record = {
        "path": "a.png",
        "score": float("nan"),
        "branch_scores": {"text": float("inf"), "memory": np.float32("-inf"), "fine": 0.25},
        "history": [1.0, float("nan")],
        "label": "anomalous",
    }
    text = json.dumps(json_safe(record), allow_nan=False)  # raises on any NaN left
    assert json.loads(text) == {
        "path": "a.png",
        "score": None,
        "branch_scores": {"text": None, "memory": None, "fine": 0.25},
        "history": [1.0, None],
        "label": "anomalous",
    }


# --- the normalised score ----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_the_normalised_score_stays_strictly_increasing_where_the_logistic_saturated(dtype):
    rule = conformal(SATURATING_NORMALS)
    assert rule.image_threshold == pytest.approx(0.303)  # linspace's float64 end point, ulps from 0.303
    # raw scores from 0 to 3.3 times the threshold, a thousandth apart, in the scores' own dtype
    scores = torch.arange(0, 1, 1e-3, dtype=dtype)
    values = rule.normalize(scores)
    assert values.dtype == dtype
    assert torch.all(values[1:] > values[:-1]) and values.min() > 0 and values.max() < 1
    defects = rule.normalize(torch.tensor([0.34, 0.40], dtype=dtype))
    assert 0.5 < defects[0] < defects[1] < 1
    if dtype == torch.float64:  # and far beyond: up to 330 times the threshold
        far = rule.normalize(torch.arange(1, 100, 1e-3, dtype=dtype))
        assert torch.all(far[1:] > far[:-1]) and far.max() < 1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("threshold", "scale"), [(0.25, 3.75e-4), (-2.5, 1.0), (0.0, 1e6), (1e3, 1e-9)])
def test_the_label_is_exactly_a_normalised_score_above_one_half(dtype, threshold, scale):
    rule = conformal([0.0], image_threshold=threshold, image_scale=scale)
    generator = torch.Generator().manual_seed(0)
    exact = torch.tensor(threshold, dtype=torch.float64)
    neighbours = [torch.nextafter(exact, exact + direction) for direction in (1.0, -1.0)]
    scores = torch.cat(
        [
            exact.repeat(50),  # ties: normal, and at most 0.5
            torch.stack(neighbours),  # the closest scores on either side
            threshold + scale * torch.randn(10_000, generator=generator, dtype=torch.float64) * 1e-9,
            threshold + scale * torch.randn(10_000, generator=generator, dtype=torch.float64),
            threshold + scale * torch.randn(10_000, generator=generator, dtype=torch.float64) * 1e6,
        ]
    ).to(dtype)
    labels, values = rule.labels(scores), rule.normalize(scores)
    assert torch.equal(labels == 1, values > 0.5)
    assert torch.all(values[:50] == 0.5)  # the threshold is representable in both dtypes: ties are exact
    assert 0 < labels.sum() < labels.numel()


# lifts: only where the scale dwarfs float32's spacing at the threshold does a score above it round to 0.5
@pytest.mark.parametrize(
    ("threshold", "scale", "lifts"), [(0.25, 3.75e-4, False), (0.0, 1e6, True), (1e3, 1e-9, False)]
)
def test_the_exported_runner_normalises_every_score_as_the_library_does(threshold, scale, lifts):
    """The same float32 scores from the exported graph, around the threshold (where the normalised score
    rounds to 0.5 and is lifted to the next float above it) and far off (where it rounds to 1.0 and is held
    just below): the runner's numpy arithmetic gives the library's floats exactly."""
    rule = conformal([0.0], image_threshold=threshold, image_scale=scale)
    generator = torch.Generator().manual_seed(0)
    exact = torch.tensor(threshold, dtype=torch.float32)
    scores = torch.cat(
        [
            torch.stack([exact, torch.nextafter(exact, exact + 1), torch.nextafter(exact, exact - 1)]),
            threshold + scale * torch.randn(1_000, generator=generator) * 1e-9,
            threshold + scale * torch.randn(1_000, generator=generator),
            threshold + scale * torch.randn(1_000, generator=generator) * 1e9,
        ]
    ).numpy()
    manifest_calibration = json.loads(rule.to_json())
    expected = rule.normalize(torch.from_numpy(scores)).numpy()
    assert np.any(expected == np.nextafter(np.float32(0.5), np.float32(1))) == lifts  # to just above 0.5
    assert np.any(expected == np.nextafter(np.float32(1), np.float32(0)))  # held just below 1
    np.testing.assert_array_equal(run_exported.normalized_scores(scores, manifest_calibration), expected)
    np.testing.assert_array_equal(
        run_exported.labels(scores, manifest_calibration), rule.labels(torch.from_numpy(scores)).numpy()
    )


def test_a_failing_part_never_reads_one_half():
    rule = conformal(SATURATING_NORMALS)
    for dtype in DTYPES:
        threshold = torch.tensor(rule.image_threshold, dtype=dtype)
        just_above = torch.nextafter(threshold, threshold + 1).reshape(1)  # the logistic gave exactly 0.5
        assert rule.labels(just_above).item() == 1 and rule.normalize(just_above).item() > 0.5


def test_score_at_level_inverts_the_normalisation():
    levels = torch.tensor([0.01, 0.1, 0.5, 0.75, 0.99], dtype=torch.float64)
    raw = torch.tensor([score_at_level(level, 0.25, 0.002) for level in levels.tolist()], dtype=torch.float64)
    # float64, a few operations per level: approx's default 1e-6 relative is far above their rounding
    assert raw.tolist() == pytest.approx(
        [0.25 - 49 * 0.002, 0.25 - 4 * 0.002, 0.25, 0.25 + 0.002, 0.25 + 0.098]
    )
    # float64 round trip through a quotient of z ~ 50: error ~ 50 ulps of 1, far under 1e-12
    torch.testing.assert_close(normalize_around(raw, 0.25, 0.002), levels, rtol=0, atol=1e-12)


def test_the_fallback_scale_is_a_tenth_of_the_threshold():
    for normals in ([0.3], [0.3, 0.3, 0.3]):  # one normal, or equal normals: the median is the threshold
        rule = conformal(normals)
        # float64 scores (`conformal`), one product on each side: a few ulps
        assert rule.image_scale == pytest.approx(FALLBACK_RELATIVE_SCALE * 0.3, rel=1e-15)
        # a clear defect, a third above the threshold (10 / 3 scales): 1 - 1 / (2 (1 + 10 / 3)), not 0.505
        clear_defect = rule.normalize(torch.tensor([0.4], dtype=torch.float64)).item()
        # float64 throughout (a float64 query, float64 threshold and scale): a few operations, a few ulps
        assert clear_defect == pytest.approx(1 - 1 / (2 * (1 + 10 / 3)), rel=1e-12)


def test_the_scale_has_a_floor_from_the_threshold():
    packed = 0.303 + np.arange(20) * 1e-12  # normals a hair apart: the median rule alone gives 2.5e-12
    # one float64 product on both sides; approx's 1e-6 relative is far above it
    assert logistic_scale(float(packed.max()), packed) == pytest.approx(MIN_RELATIVE_SCALE * packed.max())


# --- confidence ---------------------------------------------------------------------------------------------


def probability_within(num_scores: int, rank: int, false_alarm_rate: float) -> float:
    """P(the rank-th smallest of n uniform normal scores is exceeded by at most false_alarm_rate of the
    normals): fewer than `rank` of the n scores lie below 1 - alpha, a binomial sum (not scipy's Beta)."""
    below = 1 - false_alarm_rate
    return sum(math.comb(num_scores, i) * below**i * (1 - below) ** (num_scores - i) for i in range(rank))


@pytest.mark.parametrize(("n", "alpha", "confidence"), [(50, 0.1, 0.9), (200, 0.05, 0.95), (30, 0.2, 0.5)])
def test_confidence_picks_the_smallest_rank_that_keeps_the_target_with_that_probability(n, alpha, confidence):
    rank = conformal_rank(n, alpha, confidence)
    assert probability_within(n, rank, alpha) >= confidence > probability_within(n, rank - 1, alpha)
    assert rank >= conformal_rank(
        n, alpha
    )  # a per-draw promise costs a higher threshold than the average one


def test_too_few_normals_for_the_confidence_use_the_maximum_and_say_how_many_would_do():
    # the maximum of n keeps 10 % with probability 1 - 0.9^n: 0.8906 for n = 21, 0.9015 for n = 22
    assert normals_needed(0.1, 0.9) == 22 and normals_needed(0.05) == 19
    assert conformal_rank(22, 0.1, 0.9) == 22 and conformal_rank(21, 0.1, 0.9) == 21
    enough = conformal(np.arange(22.0), 0.1, confidence=None)
    assert enough.normals_needed is None
    scores = torch.arange(21.0, dtype=torch.float64)
    rule = fit_calibration(scores, None, normal_source="held_out", false_alarm_rate=0.1, confidence=0.9)
    assert (rule.image_threshold, rule.confidence, rule.normals_needed) == (20.0, 0.9, 22)
    assert rule.shortfall() == (
        "21 normal scores cannot guarantee a false-alarm rate of 10.0% with 90% confidence: the threshold "
        "(their maximum) keeps it with probability 89.1%. Give at least 22 normal images for the rate asked."
    )
    assert "with probability only 89.1% over the calibration draw" in rule.describe()
    with pytest.raises(ValueError, match=r"confidence must lie in \(0, 1\)"):
        conformal_rank(10, 0.1, 1.0)


def test_the_realised_false_alarm_rate_keeps_the_promise_over_many_calibration_draws():
    """2,000 draws of n = 50 uniform normal scores: a threshold t is exceeded by a new normal with
    probability 1 - t exactly, the realised false-alarm rate. On average it stays within the bound; with
    confidence 0.9 the share of draws above the target stays within 0.1, up to 3 binomial standard errors
    (a correct rule fails this with probability about 0.1 %)."""
    draws, n, alpha, confidence = 2_000, 50, 0.1, 0.9
    normals = np.random.default_rng(27).random((draws, n))
    on_average = np.array([1 - conformal_threshold(scores, alpha)[0] for scores in normals])
    per_draw = np.array([1 - conformal_threshold(scores, alpha, confidence)[0] for scores in normals])
    bound = conformal_threshold(normals[0], alpha)[1]  # (n - j + 1) / (n + 1) = 5 / 51
    assert on_average.mean() <= bound + 3 * on_average.std(ddof=1) / math.sqrt(draws)
    allowed_share = 1 - confidence
    margin = 3 * math.sqrt(allowed_share * confidence / draws)  # 3 binomial standard errors: 0.020
    assert (per_draw > alpha).mean() <= allowed_share + margin
    # the average promise is no per-draw promise: about 40 % of its draws exceed the target
    assert (on_average > alpha).mean() > allowed_share + margin


def test_model_calibrate_records_the_confidence_and_warns_with_the_normals_needed(tiny_winclip, tmp_path):
    references = torch.randn(3, 3, 240, 240, generator=torch.Generator().manual_seed(0))
    bank = tiny_winclip.build_reference_bank(references)
    # the maximum of n keeps 5 % with probability 1 - 0.95^n >= 0.9 from n = 45
    with pytest.warns(UserWarning, match=r"5.0% with 90% confidence.*Give at least 45 normal images"):
        calibrated = tiny_winclip.calibrate(bank, references, confidence=0.9)
    rule = calibrated.calibration
    assert (rule.confidence, rule.normals_needed, rule.num_normal) == (0.9, 45, 3)
    calibrated.save(tmp_path / "bank.safetensors")
    assert ReferenceBank.load(tmp_path / "bank.safetensors").calibration == rule


# --- format versions ----------------------------------------------------------------------------------------


def saved_bank(path, calibration: Calibration) -> dict[str, str]:
    """Save a bank with `calibration` at `path` and return its metadata."""
    bank = ReferenceBank("winclip", "hash", "tile", 2, {"patches": torch.zeros(2, 4)}, calibration)
    bank.save(path)
    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_a_bank_of_the_previous_format_loads(tmp_path):
    current = conformal(SATURATING_NORMALS)
    metadata = saved_bank(tmp_path / "current.safetensors", current)
    assert (metadata["format_version"], json.loads(metadata["calibration"])["format_version"]) == (
        BANK_FORMAT_VERSION,
        3,
    )
    # version 1 wrote no calibration format_version and had neither confidence, normals_needed, runtime nor
    # precision (version 2) nor the calibration scores (version 3), and its bank no generated_references
    later = ("format_version", "confidence", "normals_needed", "runtime", "precision", "normal_scores")
    version_1 = {key: value for key, value in json.loads(current.to_json()).items() if key not in later}
    old = tmp_path / "version1.safetensors"
    old_metadata = {key: value for key, value in metadata.items() if key != "generated_references"}
    save_file(
        {"patches": torch.zeros(2, 4)},
        old,
        metadata=old_metadata | {"format_version": "1", "calibration": json.dumps(version_1)},
    )
    loaded = ReferenceBank.load(old)
    assert loaded.calibration == dataclasses.replace(current, normal_scores=None)
    assert loaded.generated_references == 0
    assert (loaded.calibration.runtime, loaded.calibration.precision) == ("torch", "float32")


def test_a_file_of_a_future_format_is_refused_naming_both_versions(tmp_path):
    metadata = saved_bank(tmp_path / "bank.safetensors", conformal(SATURATING_NORMALS))
    future_bank = tmp_path / "future_bank.safetensors"
    future = str(int(BANK_FORMAT_VERSION) + 1)
    save_file({"patches": torch.zeros(2, 4)}, future_bank, metadata=metadata | {"format_version": future})
    with pytest.raises(
        ValueError, match=rf"format version {future}, but this hf_fsad reads .* up to {BANK_FORMAT_VERSION}"
    ):
        ReferenceBank.load(future_bank)

    future = CALIBRATION_FORMAT_VERSION + 1
    future_fields = json.loads(metadata["calibration"]) | {"format_version": future, "next_field": [0.4]}
    future_calibration = tmp_path / "future_calibration.safetensors"
    save_file(
        {"patches": torch.zeros(2, 4)},
        future_calibration,
        metadata=metadata | {"calibration": json.dumps(future_fields)},
    )
    expected = (
        rf"Reference bank {future_calibration}: The calibration is in format version {future}, but this "
        rf"hf_fsad reads calibration format versions up to {CALIBRATION_FORMAT_VERSION}: upgrade hf_fsad"
    )
    with pytest.raises(ValueError, match=expected):
        ReferenceBank.load(future_calibration)
    with pytest.raises(ValueError, match="format_version must be a positive integer, got 'two'"):
        Calibration.from_json(json.dumps(future_fields | {"format_version": "two"}))


# --- where the calibration scores come from ----------------------------------------------------------------


def test_the_calibration_records_its_runtime_and_precision_and_a_mismatch_names_both():
    rule = conformal(SATURATING_NORMALS, runtime="openvino", precision="bfloat16")
    assert Calibration.from_json(rule.to_json()) == rule
    assert calibration_mismatch(rule, "openvino", "bfloat16") is None
    assert calibration_mismatch(rule, "torch", "float32") == (
        "the bank's calibration was fitted on openvino at bfloat16, but the images are scored on torch at "
        "float32"
    )
    with pytest.raises(ValueError, match="precision must be one of"):
        conformal(SATURATING_NORMALS, precision="int4")


def test_separate_calibration_images_keeps_copies_out_by_their_pixels():
    def image(value: int) -> Image.Image:
        return Image.new("RGB", (8, 8), (value, 0, 0))

    generated = image(3)
    generated.info[GENERATED_IMAGE_INFO] = True
    # a copy re-encoded as another mode, the same pixels, is a copy; one pixel apart is not
    references = [image(1), image(1).convert("RGBA"), image(2), generated]
    separated = separate_calibration_images(references, [image(2), image(4)])
    assert [im.getpixel((0, 0))[0] for im in separated.references] == [1, 2, 3]
    assert [im.getpixel((0, 0))[0] for im in separated.held_out_normals] == [4]
    assert separated.generated_references == 1 and len(separated.notes) == 2
    with pytest.raises(ValueError, match="all 1 held-out normal images are also reference images"):
        separate_calibration_images(references, [image(1)])
