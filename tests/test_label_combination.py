"""The PROPS label-combination rules on hand-computed cases and simulated labels."""

import math

import numpy as np
import pytest

from props_ray.privacy.label_combination import (calibrate_margin_scale, combine_labels, combine_mle,
                                                 combine_posterior, estimate_model_error, posterior_confidence)
from props_ray.privacy.randomized_response import flip_probability


def test_estimate_model_error_formula_and_clamp():
    g = 0.25
    assert estimate_model_error(0.35, g) == pytest.approx((0.35 - 0.25) / 0.5)
    assert estimate_model_error(0.1, g) == pytest.approx(1e-3)  # below gamma: clamped
    assert estimate_model_error(0.9, g) == pytest.approx(0.5 - 1e-3)
    with pytest.raises(ValueError):
        estimate_model_error(0.3, 0.6)


def test_mle_hand_computed():
    eps = math.log(3)  # gamma = 0.25
    # 10 pairs; the model disagrees on 4 -> d = 0.4, gamma_M = (0.4 - 0.25)/0.5 = 0.3 > gamma: RR wins
    margins = np.array([1, 2, 3, 1, 1, 1, -1, -2, -1, -1.0])
    c = combine_mle(margins, eps)
    assert c.disagreement == pytest.approx(0.4)
    assert c.model_error == pytest.approx(0.3)
    assert not c.flipped.any()  # keep every RR label
    # posterior log-odds log 3 +- log(7/3): 7/8 where the model agrees, 9/16 where it does not
    assert c.confidence.tolist() == pytest.approx([7 / 8] * 6 + [9 / 16] * 4)
    # disagreement 0.3 -> gamma_M = 0.1 < gamma: the model wins where they disagree
    margins = np.array([1, 2, 3, 1, 1, 1, 1, -2, -1, -1.0])
    c = combine_mle(margins, eps)
    assert c.model_error == pytest.approx(0.1)
    assert c.flipped.tolist() == [False] * 7 + [True] * 3
    assert c.confidence.tolist() == pytest.approx([27 / 28] * 7 + [1 / 4] * 3)  # log 3 +- log 9


def test_mle_sign_rule_matches_formula():
    rng = np.random.default_rng(0)
    margins = rng.normal(size=200)
    eps = 0.5
    c = combine_mle(margins, eps)
    g, gm = flip_probability(eps), c.model_error
    l_m = (margins < 0).astype(int)
    score = np.log((1 - g) / g) + (-1.0) ** l_m * np.log((1 - gm) / gm)  # l_RR = 0 in RR orientation
    assert np.array_equal(~c.flipped, score >= 0)
    np.testing.assert_allclose(c.confidence, 1 / (1 + np.exp(-score)))


def test_gamma_m_estimated_on_simulated_labels():
    rng = np.random.default_rng(1)
    n, eps, true_gm = 200_000, 0.5, 0.2
    g = flip_probability(eps)
    truth = rng.integers(0, 2, n)
    rr = np.where(rng.random(n) < g, 1 - truth, truth)
    model = np.where(rng.random(n) < true_gm, 1 - truth, truth)
    margins = np.where(model == rr, 1.0, -1.0)  # in RR orientation
    c = combine_mle(margins, eps)
    assert c.model_error == pytest.approx(true_gm, abs=0.01)
    combined_ok = np.where(c.flipped, 1 - rr, rr) == truth
    assert combined_ok.mean() > 1 - true_gm - 0.01 > 1 - g  # better than RR alone
    # its confidence is calibrated: where it says p, the RR-chosen response is truly preferred a p share
    rr_right = rr == truth
    for agree in (True, False):
        group = (margins > 0) == agree
        assert rr_right[group].mean() == pytest.approx(c.confidence[group].mean(), abs=0.02)


def test_posterior_hand_computed():
    eps = math.log(3)  # prior odds of RR being right: 3
    p = posterior_confidence(np.array([0.0, math.log(2), -math.log(6)]), eps, alpha=1.0)
    # odds 3 * exp(alpha m): 3, 6, 0.5
    assert p.tolist() == pytest.approx([0.75, 6 / 7, 1 / 3])


def test_posterior_calibration_recovers_scale():
    rng = np.random.default_rng(2)
    n, eps, alpha = 100_000, 0.5, 1.7
    g = flip_probability(eps)
    m = rng.normal(scale=1.5, size=n)  # margin of response A over B
    truth_a = rng.random(n) < 1 / (1 + np.exp(-alpha * m))
    rr_a = np.where(rng.random(n) < g, ~truth_a, truth_a)
    margins_rr = np.where(rr_a, m, -m)  # RR orientation
    assert calibrate_margin_scale(margins_rr, eps) == pytest.approx(alpha, rel=0.05)
    c = combine_posterior(margins_rr, eps)
    # calibrated: mean confidence equals the fraction of RR-chosen that are truly preferred
    assert c.confidence.mean() == pytest.approx(np.mean(rr_a == truth_a), abs=0.01)


def test_posterior_of_uninformative_model_is_rr_prior():
    rng = np.random.default_rng(3)
    margins = rng.normal(size=50_000)  # unrelated to anything
    c = combine_posterior(margins, 0.5)
    assert c.calibration_scale < 0.05
    assert c.confidence.mean() == pytest.approx(1 - flip_probability(0.5), abs=0.01)


def test_unknown_rule():
    with pytest.raises(ValueError, match="rule"):
        combine_labels(np.ones(3), 1.0, "vote")


def test_model_error_upper_bound_covers_the_true_error_and_shrinks_with_epsilon():
    """Coverage by simulation: with a model of known error, the 95% bound is >= the true gamma_M in
    about 95% of partitions; and it is far looser at epsilon 0.1 than at 2."""
    from props_ray.privacy.label_combination import model_error_upper_bound

    rng = np.random.default_rng(7)
    n, gamma_m, trials = 1000, 0.3, 400
    for eps in (0.5, 2.0):
        gamma = flip_probability(eps)
        covered = 0
        for _ in range(trials):
            rr_wrong = rng.random(n) < gamma
            model_wrong = rng.random(n) < gamma_m
            d = float((rr_wrong != model_wrong).mean())
            covered += model_error_upper_bound(d, n, gamma, 0.95) >= gamma_m
        assert 0.91 <= covered / trials <= 0.99, (eps, covered / trials)
    # The same model (gamma_M = 0.3) seen through RR labels at epsilon 0.1 and at 2 (noise-free d):
    slack = {}
    for eps in (0.1, 2.0):
        gamma = flip_probability(eps)
        slack[eps] = model_error_upper_bound(gamma + gamma_m * (1 - 2 * gamma), n, gamma, 0.95) - gamma_m
    assert 0 < slack[2.0] < 0.05 and slack[0.1] > 0.15, slack
    with pytest.raises(ValueError, match="confidence"):
        model_error_upper_bound(0.4, n, 0.3, 0.4)


def test_mle_with_a_confidence_bound_keeps_rr_labels_unless_the_model_is_shown_better():
    # epsilon 0.1: d = 0.48 says gamma_M ~ 0.1 by the point estimate, but 1000 labels cannot show it
    gamma = flip_probability(0.1)
    margins = np.r_[-np.ones(480), np.ones(520)]
    point = combine_mle(margins, 0.1)
    bounded = combine_mle(margins, 0.1, model_error_confidence=0.95)
    assert point.model_error < gamma and point.flipped.sum() == 480  # the paper's rule trusts the model
    assert bounded.model_error_bound >= gamma and bounded.flipped.sum() == 0  # the bound does not
    # epsilon 1 with a clearly better model: the bound is still below gamma, so the model decides
    margins = np.r_[-np.ones(330), np.ones(670)]
    bounded = combine_mle(margins, 1.0, model_error_confidence=0.95)
    assert bounded.model_error_bound < flip_probability(1.0) and bounded.flipped.sum() == 330
