"""The DP histogram filter of DP synthetic instructions: the Gaussian release's noise scale, its
composition with the generator's DP-SGD in Opacus's accountant, resampling to the noisy histogram, and
a filter fitted on synthetic prompts only that moves their topic mixture toward the real one."""

import numpy as np
import pytest
from scipy import stats

from props_ray.embedded.task import EmbeddedTask
from props_ray.privacy import accounting
from props_ray.privacy.histogram import (gaussian_histogram, histogram_mechanism, resample_to_histogram,
                                         target_counts, total_variation, vote_counts)
from props_ray.synthetic.embedding import Filter, hash_embed


@pytest.mark.parametrize("sigma", [0.5, 10.0])
def test_histogram_noise_has_the_stated_scale(sigma):
    counts = np.full(20_000, 1_000.0)  # far from 0: no clipping
    rng = np.random.default_rng(7)
    noise = gaussian_histogram(counts, sigma, rng.standard_normal) - counts
    # mean 0 and variance sigma^2: a t-test and a chi-square test on the sample variance, each at 1e-3
    assert stats.ttest_1samp(noise, 0.0).pvalue > 1e-3
    chi2 = (len(noise) - 1) * noise.var(ddof=1) / sigma ** 2
    assert 1e-3 < stats.chi2.cdf(chi2, len(noise) - 1) < 1 - 1e-3
    assert stats.kstest(noise / sigma, "norm").pvalue > 1e-3
    # a mechanism with the noise at the wrong scale fails the same variance test
    wrong = gaussian_histogram(counts, sigma * 1.1, np.random.default_rng(7).standard_normal) - counts
    chi2 = (len(wrong) - 1) * wrong.var(ddof=1) / sigma ** 2
    assert stats.chi2.cdf(chi2, len(wrong) - 1) > 1 - 1e-3


def test_negative_noisy_counts_are_clipped_and_zero_noise_is_refused():
    out = gaussian_histogram(np.zeros(1000), 5.0, np.random.default_rng(0).standard_normal)
    assert out.min() == 0.0 and (out == 0).mean() == pytest.approx(0.5, abs=0.05)
    with pytest.raises(ValueError, match="no noise has no DP guarantee"):
        gaussian_histogram(np.zeros(3), 0.0, np.random.default_rng(0).standard_normal)


def test_votes_count_each_private_prompt_once():
    counts = vote_counts(np.array([0, 2, 2, 1, 2]), 4)
    assert counts.tolist() == [1, 1, 3, 0]
    # add/remove one vote changes one count by one: L2 sensitivity 1
    assert np.linalg.norm(vote_counts(np.array([0, 2, 2, 1]), 4) - counts) == 1.0


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_composed_epsilon_is_opacus_for_the_generator_steps_plus_one_gaussian_release(name):
    from opacus.accountants import PRVAccountant, RDPAccountant

    delta, q, steps = 1e-5, 0.02, 150
    released = histogram_mechanism(2.0)
    assert released == (2.0, 1.0, 1)
    sigma = accounting.calibrate_composed(4.0, delta, q, steps, [released], name)
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[name]()
    acc.history = [(sigma, q, steps), (2.0, 1.0, 1)]
    with np.errstate(divide="ignore"):
        opacus_eps = acc.get_epsilon(delta=delta)
    got = accounting.composed_epsilon([(sigma, q, steps), released], delta, name)
    assert got == pytest.approx(opacus_eps, rel=1e-9)
    assert 4.0 * (1 - accounting.CALIBRATION_REL_TOL) <= got <= 4.0
    # the histogram costs something: the generator alone at that sigma spends clearly less
    alone = accounting.epsilon_after(steps, q, sigma, delta, name)
    assert alone < got - 0.05


def test_a_histogram_that_spends_the_whole_budget_is_refused():
    with pytest.raises(accounting.PrivacyConfigError, match="other mechanisms alone spend"):
        accounting.calibrate_composed(0.1, 1e-5, 0.02, 100, [histogram_mechanism(1.0)])


def test_resampling_obeys_the_noisy_histogram():
    rng = np.random.default_rng(0)
    cluster_of = rng.integers(0, 5, size=400)
    cluster_of[cluster_of == 4] = 3  # cluster 4 has no synthetic member
    noisy = np.array([10.0, 0.0, 35.5, 20.0, 50.0])
    idx = resample_to_histogram(cluster_of, noisy, 300, rng)
    got = np.bincount(cluster_of[idx], minlength=5)
    want = target_counts(np.array([10.0, 0.0, 35.5, 20.0, 0.0]), 300)  # the empty cluster drops out
    assert got.tolist() == want.tolist() and want.sum() == 300
    assert abs(got[2] / 300 - 35.5 / 65.5) < 1 / 300
    # within a cluster, members are drawn without replacement while they last
    for c in (0, 2, 3):
        picked = idx[cluster_of[idx] == c]
        assert len(set(picked.tolist())) == min(len(picked), (cluster_of == c).sum())


def test_target_counts_split_n_by_largest_remainder():
    assert target_counts(np.array([1.0, 1.0, 1.0]), 10).tolist() == [4, 3, 3]
    with pytest.raises(ValueError, match="every noisy count is 0"):
        target_counts(np.zeros(3), 10)


def test_the_filter_is_fitted_on_synthetic_prompts_only():
    synthetic = ["tell me about the garden answer:", "describe the ocean answer:", "the city now answer:"] * 20
    real = ["zebra quokka axolotl answer:"] * 50  # words no synthetic prompt has
    fitted = Filter.fit(synthetic, 3, np.random.default_rng(0))
    before = (fitted.projection.mean.copy(), fitted.projection.components.copy(), fitted.centres.copy())
    fitted.assign(real)
    assert all(np.array_equal(a, b) for a, b in zip(before, (fitted.projection.mean, fitted.projection.components,
                                                             fitted.centres)))
    # had the real prompts entered the PCA, its span would hold their embedding; it holds none of it
    x = hash_embed(real[:1]) - fitted.projection.mean
    residual = x - (x @ fitted.projection.components.T) @ fitted.projection.components
    assert np.linalg.norm(residual) / np.linalg.norm(x) > 0.9
    leaky = Filter.fit(synthetic + real, 3, np.random.default_rng(0))
    x = hash_embed(real[:1]) - leaky.projection.mean
    residual = x - (x @ leaky.projection.components.T) @ leaky.projection.components
    assert np.linalg.norm(residual) / np.linalg.norm(x) < 0.1


def test_the_filter_moves_a_wrong_topic_mixture_toward_the_real_one():
    task = EmbeddedTask(prompt_mix="skewed")
    rng = np.random.default_rng(0)
    real = task.sample_prompts(2500, rng)
    synthetic = task.sample_prompts(4000, rng, mix="uniform")  # a generator that missed the skew
    before = total_variation(task.topic_mixture(synthetic), task.topic_shares)
    fitted = Filter.fit(synthetic, 16, np.random.default_rng(1))
    noisy = gaussian_histogram(vote_counts(fitted.assign(real), 16), 10.0, np.random.default_rng(2).standard_normal)
    idx = resample_to_histogram(fitted.assign(synthetic), noisy, 2500, np.random.default_rng(3))
    after = total_variation(task.topic_mixture([synthetic[i] for i in idx]), task.topic_shares)
    print(f"\ntopic TV to the real mixture: {before:.3f} before the filter, {after:.3f} after")
    assert before > 0.3 and after < before / 3


def test_the_skewed_prompt_mixture_has_its_stated_shape():
    task = EmbeddedTask(prompt_mix="skewed")
    shares = task.topic_shares
    assert shares.sum() == pytest.approx(1.0) and shares[0] > 0.4 and shares[-1] < 0.035
    assert np.all(np.diff(shares) < 0)  # a power law: every topic rarer than the one before
    prompts = task.sample_prompts(20_000, np.random.default_rng(0))
    counts = task.topic_mixture(prompts) * len(prompts)
    assert stats.chisquare(counts, shares * len(prompts)).pvalue > 1e-3
    # each topic's prompts use its intent words most of the time (0.85 + 0.15 * 4/16 of context words)
    from props_ray.embedded.task import CONTEXT_WORDS, TOPICS
    for t in (0, 7):
        own = {CONTEXT_WORDS[j] for j in task.intent_words(t)}
        words = [w for p in prompts if p.split()[-2] == TOPICS[t] for w in p.split()[:-2]]
        assert abs(np.mean([w in own for w in words]) - (0.85 + 0.15 * 4 / 16)) < 0.03
    assert all(task.parse_topic(p) is not None for p in prompts[:100])
    assert task.parse_topic("garden answer:") is None and task.parse_topic("a b c garden") is None
    # the reward, the warm-up and the reference cache do not depend on the mixture
    assert task.fingerprint() == EmbeddedTask().fingerprint()
    assert np.allclose(EmbeddedTask().topic_shares, 1 / len(TOPICS))
    with pytest.raises(ValueError, match="prompt_mix"):
        EmbeddedTask(prompt_mix="zipf")


@pytest.mark.parametrize("n,dim", [(400, 48), (12, 48)])
def test_the_projection_is_the_principal_subspace_of_an_svd(n, dim):
    from props_ray.synthetic.embedding import Projection

    rng = np.random.default_rng(5)
    x = rng.standard_normal((n, dim)) * np.linspace(3.0, 0.1, dim)  # a decaying spectrum
    fitted = Projection.fit(x, 0.9)
    _, s, vt = np.linalg.svd(x - x.mean(0), full_matrices=False)
    k = int(np.searchsorted(np.cumsum(s ** 2) / (s ** 2).sum(), 0.9) + 1)
    assert len(fitted.components) == min(k, n) and 1 < k < dim
    # the same axes, each up to its sign: |<ours_i, svd_i>| = 1
    np.testing.assert_allclose(np.abs((fitted.components * vt[:len(fitted.components)]).sum(1)), 1.0, atol=1e-8)
    np.testing.assert_allclose(fitted.mean, x.mean(0))


def test_kmeans_plus_plus_seeding_draws_what_the_full_recomputation_draws():
    from props_ray.synthetic.embedding import kmeans

    def reference(x, k, rng):  # every point's distance to every centre chosen so far, at each new centre
        centres = [x[rng.integers(len(x))]]
        for _ in range(1, k):
            d = ((x[:, None, :] - np.array(centres)[None]) ** 2).sum(-1).min(1)
            centres.append(x[rng.choice(len(x), p=d / d.sum())])
        return np.array(centres)

    x = np.random.default_rng(6).standard_normal((500, 6)) + np.repeat(np.eye(6) * 4, 84, axis=0)[:500]
    seeds = kmeans(x, 8, np.random.default_rng(9), iterations=0)  # no Lloyd iteration: the seeds
    np.testing.assert_array_equal(seeds, reference(x, 8, np.random.default_rng(9)))
    assert len({tuple(c) for c in seeds}) == 8
