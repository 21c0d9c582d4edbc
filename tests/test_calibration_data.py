"""Calibrated thresholds keep their false-alarm promise on real scores: toy textures and ELPV solar cells.

The conformal promise holds in expectation over draws of the calibration normals, not for each draw. So
each check scores the images once with a tiny random WinCLIP, then draws calibration and test normals many
times (seeded) and compares the mean false-alarm rate (FAR) over the draws with the bound, within a slack
of the Monte-Carlo error:

    mean FAR <= bound + Z * SE,   SE = (standard deviation of the per-draw FARs) / sqrt(draws).

The draws are independent given the scores, so by the central limit theorem the mean lies within Z standard
errors of the true expected FAR except with probability 3e-5 (one-sided normal tail at Z = 4): a check that
fails is a broken promise, not an unlucky seed. The check of `confidence` (the share of draws whose
threshold alarms more often than asked) uses exact margins instead: Hoeffding's for the mean and the binomial
quantile for the share, each at FAILURE_PROBABILITY.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.stats import binom

from extras import import_extra
from hf_fsad.calibration import apply_calibration, conformal_rank, fit_calibration
from hf_fsad.data import load_benchmark
from hf_fsad.features import FeatureCache
from test_winclip import WinClipModelTester

Z = 4.0
NUM_REFERENCES = 4  # the bank of the held-out checks
NUM_NORMALS = 96  # scored normal images per dataset


def monte_carlo_slack(false_alarm_rates: list[float]) -> float:
    """Z standard errors of the mean of independent per-draw false-alarm rates (module docstring)."""
    return Z * float(np.std(false_alarm_rates, ddof=1)) / np.sqrt(len(false_alarm_rates))


@pytest.fixture(scope="module", params=["toy", "elpv"])
def normals(request):
    """(model, the first NUM_REFERENCES normals' pixels and bank, features of the NUM_NORMALS next normals,
    their scores against that bank) on the train split's normal images of toy "stripes" or ELPV "mono"."""
    if request.param == "elpv":
        import_extra("elpv_dataset", "elpv")
        train, class_name = load_benchmark("elpv", category="mono")["train"], "solar cell"
    else:
        size = NUM_REFERENCES + NUM_NORMALS
        toy = load_benchmark("toy", category="stripes", num_train=size, num_test_good=1, num_test_anomalous=1)
        train, class_name = toy["train"], "textured surface"
    model = WinClipModelTester.tiny_model()
    features = FeatureCache().features(model, train, range(NUM_REFERENCES, NUM_REFERENCES + NUM_NORMALS), 16)
    images = [image.convert("RGB") for image in train.select(range(NUM_REFERENCES))["image"]]
    pixels = model.paper_image_processor()(images, return_tensors="pt").pixel_values
    with torch.no_grad():
        bank = model.build_reference_bank(pixels, class_name=class_name)
        scores = model.score_features(features, bank).image_scores
    return model, pixels, bank, features, scores


def test_held_out_conformal_threshold_meets_its_promise_from_both_sides(normals):
    """Calibration and test normals as a random split of the scored ones: a test image's score and the n
    calibration scores are exchangeable, so with distinct scores the j-th smallest calibration score is
    exceeded with probability exactly (n - j + 1) / (n + 1), the bound; and as j = ceil((n + 1)(1 - alpha)),
    the bound exceeds alpha - 1 / (n + 1)."""
    *_, scores = normals
    assert torch.unique(scores).numel() == scores.numel()  # no ties: the expectation is the bound exactly
    alpha, n = 0.1, 25  # rank ceil(26 x 0.9) = 24: bound 2/26 = 7.7 %, above 10 % - 1/26 = 6.2 %
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(4000):
        order = torch.from_numpy(rng.permutation(scores.numel()))
        calibration = fit_calibration(
            scores[order[:n]], None, normal_source="held_out", false_alarm_rate=alpha
        )
        rates.append(calibration.labels(scores[order[n:]]).double().mean().item())
    assert calibration.false_alarm_bound == 2 / 26  # the same for every draw
    mean, slack = float(np.mean(rates)), monte_carlo_slack(rates)
    assert mean <= calibration.false_alarm_bound + slack  # the promise
    assert mean >= alpha - 1 / (n + 1) - slack  # and not much more cautious than asked
    assert abs(mean - calibration.false_alarm_bound) <= slack  # exact here: distinct, exchangeable scores


# The per-draw checks below fail a correct rule with probability at most this (each margin's derivation says
# why), so a failure is a broken promise, not an unlucky seed.
FAILURE_PROBABILITY = 1e-6


def hoeffding_margin(draws: int) -> float:
    """How far the mean of `draws` independent values in [0, 1] exceeds their expectation with probability
    at most FAILURE_PROBABILITY: Hoeffding, P(mean - E >= margin) <= exp(-2 draws margin^2)."""
    return math.sqrt(math.log(1 / FAILURE_PROBABILITY) / (2 * draws))


def binomial_margin(draws: int, share: float) -> float:
    """How far the share of `draws` independent events, each of probability at most `share`, exceeds
    `share` with probability at most FAILURE_PROBABILITY: the count is at most Binomial(draws, share) in
    distribution, and its exact upper quantile, scipy's `binom.isf`, is the smallest m with P(count > m) <=
    FAILURE_PROBABILITY."""
    return float(binom.isf(FAILURE_PROBABILITY, draws, share)) / draws - share


def test_the_realised_false_alarm_rate_keeps_the_promise_on_average_and_with_confidence(normals):
    """The scored normals as the population of a line's normal parts: each draw takes n calibration scores
    independently from it (with replacement), and the threshold's realised false-alarm rate is exactly the
    share of the population above it (the chance that the next normal part alarms, not an estimate from a
    few test normals, whose sampling noise would count towards the share of draws above the target).

    Why the promises hold here: a draw is X_i = F^-1(U_i) with U_i uniform and F the population's
    distribution, so the j-th smallest X_(j) = F^-1(U_(j)) and its realised rate 1 - F(X_(j)) lies in
    (1 - U_(j) - 1/N, 1 - U_(j)] for N distinct scores. 1 - U_(j) is the continuous case, Beta(n + 1 - j, j)
    distributed: mean (n - j + 1) / (n + 1), the average promise, and above alpha with probability <= 1 -
    confidence for the `confidence` rank. Ties in a draw only lower the realised rate."""
    *_, scores = normals
    population = scores.double()
    assert torch.unique(population).numel() == population.numel()  # N distinct scores: the 1/N above
    draws, n, alpha, confidence = 100_000, 50, 0.1, 0.9
    drawn = population[
        torch.from_numpy(np.random.default_rng(27).integers(0, population.numel(), (draws, n)))
    ]
    ordered = drawn.sort(dim=1).values

    def realised_rates(rank: int) -> torch.Tensor:
        """Each draw's realised false-alarm rate at the rank-th smallest of its scores."""
        thresholds = ordered[:, rank - 1]
        return (population[None, :] > thresholds[:, None]).double().mean(dim=1)

    on_average_rank, per_draw_rank = conformal_rank(n, alpha), conformal_rank(n, alpha, confidence)
    on_average, per_draw = realised_rates(on_average_rank), realised_rates(per_draw_rank)
    # the sorted draws are the library's thresholds: its own calibration, from the first draws, agrees
    for index in range(20):
        for rank, rates, asked in (
            (on_average_rank, on_average, None),
            (per_draw_rank, per_draw, confidence),
        ):
            rule = fit_calibration(
                drawn[index], None, normal_source="held_out", false_alarm_rate=alpha, confidence=asked
            )
            assert rule.image_threshold == ordered[index, rank - 1].item()
            assert rule.labels(population).double().mean().item() == rates[index].item()

    bound = fit_calibration(
        drawn[0], None, normal_source="held_out", false_alarm_rate=alpha
    ).false_alarm_bound
    assert bound == 5 / 51  # rank ceil(51 x 0.9) = 46 of 50
    margin = hoeffding_margin(draws)  # 0.0083
    assert on_average.mean().item() <= bound + margin  # the average promise
    assert on_average.mean().item() >= bound - 1 / population.numel() - margin  # and not much more cautious
    allowed_share = 1 - confidence
    share_margin = binomial_margin(draws, allowed_share)  # 0.0045
    assert (per_draw > alpha).double().mean().item() <= allowed_share + share_margin  # the per-draw promise
    # the average promise is no per-draw promise: about 40 % of its draws exceed the target
    assert (on_average > alpha).double().mean().item() > allowed_share + share_margin


def test_leave_one_out_threshold_of_a_nearest_neighbour_method_meets_its_promise(normals):
    """k references drawn from the normals calibrate their own bank leave-one-out, and the bank scores other
    normals. Leave-one-out banks hold k - 1 references; WinCLIP+'s score (its nearest-reference distances,
    averaged and maxed) only falls as references are added, so each reference's leave-one-out score is at
    least its score against the other k - 1 plus the test image, and those k + 1 scores are exchangeable with
    the test image's: the threshold is at least the exchangeable one, and the promise holds (conservatively,
    so only its upper side is checked)."""
    model, _, bank, pool, _ = normals
    alpha, k, num_test = 0.2, 9, 16  # rank ceil(10 x 0.8) = 8 of 9: bound 2/10
    rng = np.random.default_rng(0)
    rates = []
    for _ in range(150):
        drawn = torch.from_numpy(rng.choice(NUM_NORMALS, size=k + num_test, replace=False))
        references = {name: tensor[drawn[:k]] for name, tensor in pool.items()}
        test = {name: tensor[drawn[k:]] for name, tensor in pool.items()}
        with torch.no_grad():
            drawn_bank = model.build_reference_bank(class_name=bank.class_name, reference_features=references)
            calibrated = model.calibrate(drawn_bank, reference_features=references, false_alarm_rate=alpha)
            output = apply_calibration(model.score_features(test, calibrated), calibrated.calibration)
        rates.append(output.labels.double().mean().item())
    assert calibrated.calibration.normal_source == "leave_one_out"
    assert calibrated.calibration.false_alarm_bound == 2 / 10
    mean = float(np.mean(rates))
    assert mean <= 0.2 + monte_carlo_slack(rates)
    assert mean > 0  # a threshold above every score would keep any promise: this one does flag normals


def test_normalised_scores_are_monotone_in_the_raw_scores(normals):
    *_, scores = normals
    calibration = fit_calibration(scores[:25], None, normal_source="held_out", false_alarm_rate=0.1)
    normalised = calibration.normalize(scores)
    order = torch.argsort(scores)
    assert (normalised[order].diff() >= 0).all()  # float32 sigmoid: close raw scores may round to one value
    above = scores.double() > calibration.image_threshold
    assert above.any() and not above.all()
    assert (normalised[above] >= 0.5).all() and (normalised[~above] <= 0.5).all()
    assert calibration.normalize(torch.tensor([calibration.image_threshold])).item() == 0.5


def test_a_bank_without_calibration_scores_exactly_as_before(normals):
    model, pixels, bank, *_ = normals
    with torch.no_grad():
        calibrated_bank = model.calibrate(bank, pixels, false_alarm_rate=0.25)  # 4 normals reach 25 %
        plain, calibrated = model(pixels, reference_bank=bank), model(pixels, reference_bank=calibrated_bank)
    assert bank.calibration is None
    assert list(plain.keys()) == ["image_scores", "anomaly_maps", "branch_scores"]
    assert plain.normalized_scores is None and plain.labels is None and plain.anomaly_masks is None
    # the calibration adds decisions and leaves the scores, bit for bit
    torch.testing.assert_close(calibrated.image_scores, plain.image_scores, rtol=0, atol=0)
    torch.testing.assert_close(calibrated.anomaly_maps, plain.anomaly_maps, rtol=0, atol=0)
    assert torch.equal(calibrated.labels, calibrated_bank.calibration.labels(plain.image_scores))
