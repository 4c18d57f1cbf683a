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
    assert c.confidence.tolist() == [1.0] * 10  # keep every RR label
    # disagreement 0.3 -> gamma_M = 0.1 < gamma: the model wins where they disagree
    margins = np.array([1, 2, 3, 1, 1, 1, 1, -2, -1, -1.0])
    c = combine_mle(margins, eps)
    assert c.model_error == pytest.approx(0.1)
    assert c.confidence.tolist() == [1.0] * 7 + [0.0] * 3
    assert c.flipped.sum() == 3


def test_mle_sign_rule_matches_formula():
    rng = np.random.default_rng(0)
    margins = rng.normal(size=200)
    eps = 0.5
    c = combine_mle(margins, eps)
    g, gm = flip_probability(eps), c.model_error
    l_m = (margins < 0).astype(int)
    score = np.log((1 - g) / g) + (-1.0) ** l_m * np.log((1 - gm) / gm)  # l_RR = 0 in RR orientation
    assert np.array_equal(c.confidence == 1.0, score >= 0)


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
