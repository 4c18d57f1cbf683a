"""Randomized response: flip rates by a statistical test (persistence of the draw: test_ledger.py)."""

import math

import numpy as np
import pytest
from scipy.stats import binomtest

from props_ray.privacy.randomized_response import (derived_flip_probability, flip_probability, randomized_response,
                                                   randomized_response_flips)


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_flip_rate_binomial(eps):
    n = 40_000
    flips = randomized_response_flips(n, eps, rng=np.random.default_rng(int(eps * 100)))
    gamma = 1 / (1 + math.exp(eps))
    assert binomtest(int(flips.sum()), n, gamma).pvalue > 1e-3
    # and it is not some other rate: a 10% relative error in gamma is rejected
    assert binomtest(int(flips.sum()), n, gamma * 1.1).pvalue < 1e-3


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_secure_flip_rate_binomial(eps):
    n = 20_000
    flips = randomized_response_flips(n, eps, secure=True)
    assert binomtest(int(flips.sum()), n, flip_probability(eps)).pvalue > 1e-3


def test_flip_probability_values_and_errors():
    assert flip_probability(math.log(3)) == pytest.approx(0.25)
    assert flip_probability(0.5) == pytest.approx(0.3775406687981454)
    assert flip_probability(800.0) == pytest.approx(0.0, abs=1e-300)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            flip_probability(bad)
    with pytest.raises(ValueError, match="seeded"):
        randomized_response_flips(3, 1.0)


def test_randomized_response_flips_labels():
    labels = np.zeros(10_000, dtype=np.int8)
    out = randomized_response(labels, 1.0, rng=np.random.default_rng(0))
    assert set(np.unique(out)) == {0, 1}
    assert binomtest(int(out.sum()), out.size, flip_probability(1.0)).pvalue > 1e-3
    with pytest.raises(ValueError):
        randomized_response(np.array([0, 2]), 1.0, rng=np.random.default_rng(0))


@pytest.mark.parametrize("eps,eps_max", [(0.1, 0.5), (0.5, 2.0), (1.0, 2.0), (0.25, 4.0)])
def test_derived_flip_composes_to_gamma_eps(eps, eps_max):
    """Two independent flips, gamma_max then gamma', are one flip at gamma_eps (binomial test, with a control)."""
    n = 60_000
    rng = np.random.default_rng(int(eps * 1000 + eps_max))
    first = randomized_response_flips(n, eps_max, rng=rng)
    second = rng.random(n) < derived_flip_probability(eps, eps_max)
    total = int((first ^ second).sum())
    assert binomtest(total, n, flip_probability(eps)).pvalue > 1e-3
    assert binomtest(total, n, flip_probability(eps_max)).pvalue < 1e-6  # not just the first flip
    assert derived_flip_probability(eps_max, eps_max) == 0.0
    with pytest.raises(ValueError, match="cannot derive"):
        derived_flip_probability(eps_max, eps)
