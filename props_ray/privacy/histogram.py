"""The DP histogram filter of DP synthetic instructions (arXiv 2402.13659): pure functions, no Ray, no model.

The private instructions vote for their nearest centre of a clustering fitted on *synthetic* prompts
only (post-processing of the DP generator's output), and the vector of counts is released with the
Gaussian mechanism. Adjacency is add/remove one private instruction: it changes exactly one count by
one, so the counts' L2 sensitivity is 1 (:data:`SENSITIVITY`), and noise N(0, sigma^2) per count is
the Gaussian mechanism with noise multiplier sigma / 1. (Under replace-one adjacency two counts
change and the sensitivity is sqrt 2.) The release is one Gaussian mechanism, entered in the
accountant as one step at sampling rate 1 beside the generator's DP-SGD steps
(:func:`histogram_mechanism`, :func:`props_ray.privacy.accounting.composed_epsilon`). Negative noisy
counts are clipped to 0 and the synthetic prompts are resampled to the noisy shares
(:func:`resample_to_histogram`): post-processing.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

#: L2 sensitivity of the count vector under add/remove-one adjacency on private instructions.
SENSITIVITY = 1.0


def histogram_mechanism(sigma: float) -> tuple[float, float, int]:
    """The release as an accountant history entry: (noise multiplier sigma / sensitivity, rate 1, 1 step)."""
    if not sigma > 0:
        raise ValueError(f"the histogram's noise sigma must be > 0 (no noise has no DP guarantee), got {sigma}")
    return (sigma / SENSITIVITY, 1.0, 1)


def histogram_alone_epsilon(name: str, sigma: float | None, epsilon: float, delta: float,
                            accountant: str = "prv") -> float:
    """The epsilon the histogram release spends alone at ``delta`` (0 without a histogram). Raises a
    :class:`~props_ray.errors.UserError` naming the method's ``histogram_noise`` when that leaves the
    generator no room within ``epsilon``: the data step calls it for every trial of the job, before
    anything is spent, and the method again before its own trial."""
    from props_ray.errors import UserError
    from props_ray.privacy.accounting import CALIBRATION_REL_TOL, composed_epsilon

    if not sigma:
        return 0.0
    alone = composed_epsilon([histogram_mechanism(sigma)], delta, accountant)
    if alone >= epsilon * (1 - CALIBRATION_REL_TOL):
        raise UserError(f"methods: {name}'s histogram_noise ({sigma:g}) alone spends epsilon {alone:.3g} of "
                        f"{epsilon:g} at delta {delta:.3g}: raise histogram_noise")
    return alone


def vote_counts(nearest: np.ndarray, clusters: int) -> np.ndarray:
    """How many private instructions have each centre as their nearest (``nearest``: one index each)."""
    nearest = np.asarray(nearest, dtype=np.int64)
    if nearest.size and (nearest.min() < 0 or nearest.max() >= clusters):
        raise ValueError(f"a nearest-centre index is outside 0..{clusters - 1}")
    return np.bincount(nearest, minlength=clusters).astype(np.float64)


def gaussian_histogram(counts: np.ndarray, sigma: float, normal: Callable[[int], np.ndarray]) -> np.ndarray:
    """``counts`` plus N(0, sigma^2) noise on each, negatives clipped to 0. ``normal(n)`` gives n standard
    normal draws (the OS CSPRNG for private runs, a seeded generator for simulations)."""
    histogram_mechanism(sigma)  # checks sigma
    counts = np.asarray(counts, dtype=np.float64)
    return np.maximum(counts + sigma * np.asarray(normal(counts.size), dtype=np.float64), 0.0)


def target_counts(shares: np.ndarray, n: int) -> np.ndarray:
    """``n`` split in proportion to ``shares`` (largest remainders): integers summing to ``n``."""
    shares = np.asarray(shares, dtype=np.float64)
    if shares.sum() <= 0:
        raise ValueError("every noisy count is 0: nothing to resample to (more noise than votes)")
    exact = n * shares / shares.sum()
    out = np.floor(exact).astype(np.int64)
    rest = n - int(out.sum())
    if rest:
        out[np.argsort(-(exact - out), kind="stable")[:rest]] += 1
    return out


def resample_to_histogram(cluster_of: np.ndarray, noisy_counts: np.ndarray, n: int,
                          rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` synthetic prompts whose cluster counts follow the noisy histogram: each cluster
    gets its share of ``n`` (clusters with no synthetic member drop out and the rest renormalise), drawn
    from its members without replacement while they last, with replacement beyond."""
    cluster_of = np.asarray(cluster_of, dtype=np.int64)
    noisy = np.asarray(noisy_counts, dtype=np.float64).copy()
    members = [np.flatnonzero(cluster_of == c) for c in range(noisy.size)]
    for c, m in enumerate(members):
        if m.size == 0:
            noisy[c] = 0.0
    picks = []
    for c, k in enumerate(target_counts(noisy, n)):
        if k == 0:
            continue
        m = members[c]
        take = rng.permutation(m)[:min(k, m.size)]
        if k > m.size:
            take = np.concatenate([take, rng.choice(m, size=k - m.size, replace=True)])
        picks.append(take)
    return rng.permutation(np.concatenate(picks))


def total_variation(p: np.ndarray, q: np.ndarray) -> float:
    """Total variation distance between two distributions over the same support (each normalised)."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return 0.5 * float(np.abs(p / p.sum() - q / q.sum()).sum())
