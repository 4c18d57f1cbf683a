"""Randomized response (RR) on binary preference labels.

A preference label ``y`` in {0, 1} says which of two responses was preferred.
RR with parameter epsilon keeps the label with probability
``1 - gamma`` and flips it with probability

    gamma_eps = 1 / (1 + e^eps),

so for any two inputs the output distributions differ by at most a factor
``(1 - gamma) / gamma = e^eps``: each label is epsilon-label-DP (local DP).

Several epsilons from one draw
------------------------------
Flipping an epsilon_max RR label once more with probability

    gamma' = (gamma_eps - gamma_max) / (1 - 2 gamma_max)

gives a label that is flipped against the raw one with probability exactly
gamma_eps (two independent flips: gamma_max (1 - gamma') + (1 - gamma_max) gamma'),
and it is a function of the epsilon_max label alone: post-processing. So a job
that asks for several epsilons draws once, at the largest, and spends only
epsilon_max per label (:func:`derived_flip_probability`), instead of the sum.

These are pure functions; persistence of the draw lives in
:mod:`props_ray.data.ledger`.
"""

from __future__ import annotations

import math

import numpy as np

from props_ray.privacy.randomness import csprng_uniform


def flip_probability(epsilon: float) -> float:
    """gamma_eps = 1 / (1 + e^eps), the RR flip probability for a binary label."""
    if not (isinstance(epsilon, (int, float)) and epsilon > 0) or math.isnan(epsilon):
        raise ValueError(f"epsilon must be a positive number, got {epsilon!r}")
    if math.isinf(epsilon):
        return 0.0
    # 1/(1+e^eps) written to stay finite for large eps
    return math.exp(-epsilon) / (1.0 + math.exp(-epsilon))


def randomized_response_flips(n: int, epsilon: float, rng: np.random.Generator | None = None,
                              secure: bool = False) -> np.ndarray:
    """Draw ``n`` independent RR flip indicators (True = flip the label).

    ``secure=True`` draws from the operating system's CSPRNG (``secrets``),
    which nobody can replay from a seed; otherwise ``rng`` (a seeded numpy
    generator) is used, which makes experiments reproducible.
    """
    gamma = flip_probability(epsilon)
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if secure:
        u = csprng_uniform(n)  # 53 random bits per draw from the OS CSPRNG
    else:
        if rng is None:
            raise ValueError("a seeded numpy Generator is required unless secure=True")
        u = rng.random(n)
    return u < gamma


def randomized_response(labels: np.ndarray, epsilon: float, rng: np.random.Generator | None = None,
                        secure: bool = False) -> np.ndarray:
    """Apply RR to binary labels in {0, 1}; returns the privatized labels."""
    labels = np.asarray(labels)
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise ValueError("labels must be 0 or 1")
    flips = randomized_response_flips(labels.shape[0], epsilon, rng=rng, secure=secure)
    return np.where(flips, 1 - labels, labels).astype(np.int8)


def derived_flip_probability(epsilon: float, epsilon_max: float) -> float:
    """gamma' that turns an epsilon_max RR label into an epsilon RR label (epsilon <= epsilon_max)."""
    if epsilon > epsilon_max:
        raise ValueError(f"cannot derive epsilon {epsilon:g} from a draw at the smaller epsilon {epsilon_max:g}")
    g, g_max = flip_probability(epsilon), flip_probability(epsilon_max)
    return (g - g_max) / (1.0 - 2.0 * g_max)
