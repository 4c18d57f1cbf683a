"""Win rate and reward intervals clustered by prompt, and the normalised gain."""

import math

import numpy as np
import pytest

from props_ray.win_rate import clustered_mean_ci, normalised_gain, reward_summary, win_rate


def _correlated(rng, prompts=100, samples=4, spread=1.0):
    """Rewards with a per-prompt effect shared by the prompt's samples (true mean 0)."""
    effect = rng.normal(0, spread, size=prompts)
    values = np.repeat(effect, samples) + rng.normal(0, 0.1, size=prompts * samples)
    return values, np.repeat(np.arange(prompts), samples)


def test_the_prompt_clustered_interval_covers_and_the_naive_one_does_not():
    rng = np.random.default_rng(0)
    clustered = naive = 0
    reps = 300
    for i in range(reps):
        v, g = _correlated(rng)
        _, lo, hi = clustered_mean_ci(v, g, resamples=500, seed=i)
        clustered += lo <= 0.0 <= hi
        half = 1.96 * v.std(ddof=1) / math.sqrt(len(v))  # treats the 4 samples of a prompt as independent
        naive += abs(v.mean()) <= half
    # nominal 95%: the clustered interval covers about that often; the naive one far less (about 68%)
    assert 0.90 <= clustered / reps <= 0.99
    assert naive / reps < 0.80


def test_independent_samples_give_the_usual_interval_width():
    rng = np.random.default_rng(1)
    v = rng.normal(0, 1, size=400)
    mean, lo, hi = clustered_mean_ci(v, np.arange(400))
    assert mean == pytest.approx(v.mean())
    assert (hi - lo) / 2 == pytest.approx(1.96 / math.sqrt(400), rel=0.15)


def test_win_rate_with_prompts_keeps_the_counts_and_widens_the_interval():
    rng = np.random.default_rng(2)
    v, g = _correlated(rng, prompts=50, samples=4)
    policy, reference = v + 0.2, np.zeros_like(v)
    naive, clustered = win_rate(policy, reference), win_rate(policy, reference, groups=g)
    assert (naive.wins, naive.ties, naive.losses) == (clustered.wins, clustered.ties, clustered.losses)
    assert naive.win_rate == pytest.approx(clustered.win_rate)
    assert clustered.ci_high - clustered.ci_low > 1.3 * (naive.ci_high - naive.ci_low)


def test_reward_summary_and_normalised_gain():
    s = reward_summary([1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0], [0, 0, 1, 1])
    assert s["reward_mean"] == 2.5 and s["reference_reward_mean"] == 0.5
    assert s["reward_ci_low"] <= 2.5 <= s["reward_ci_high"]
    assert normalised_gain(0.5, 0.5, 2.5) == 0.0 and normalised_gain(2.5, 0.5, 2.5) == 1.0
    assert normalised_gain(1.5, 0.5, 2.5) == 0.5 and math.isnan(normalised_gain(1.0, 0.5, 0.5))
