"""Win rate of the aligned policy against the reference, and the mean judged reward, with 95% CIs.

Each held-out comparison scores 1 for a win, 1/2 for a tie and 0 for a loss; the win rate is the mean
score. Comparisons of the same prompt are not independent (each prompt is sampled
``eval.samples_per_prompt`` times), so with ``groups`` (each comparison's prompt) the interval is a
percentile bootstrap over *prompts* (:func:`clustered_mean_ci`); without, the normal approximation
on the per-comparison scores (clipped to [0, 1]).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

Z95 = 1.959963984540054


@dataclass(frozen=True)
class WinRate:
    win_rate: float
    ci_low: float
    ci_high: float
    wins: int
    ties: int
    losses: int

    @property
    def n(self) -> int:
        return self.wins + self.ties + self.losses

    def as_dict(self) -> dict:
        return asdict(self)


#: Bootstrap resamples for the prompt-clustered intervals (seeded: the same scores give the same CI).
BOOTSTRAP_RESAMPLES = 2000


def clustered_mean_ci(values, groups, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0,
                      confidence: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): the mean of ``values`` and a percentile bootstrap interval that resamples whole
    groups (prompts) with replacement, so correlated values of one prompt move together."""
    v = np.asarray(values, dtype=np.float64)
    g = np.asarray(groups)
    if v.shape != g.shape or v.size == 0:
        raise ValueError(f"need equal-length, non-empty values and groups, got {v.shape} and {g.shape}")
    _, index = np.unique(g, return_inverse=True)
    sums, counts = np.bincount(index, weights=v), np.bincount(index).astype(np.float64)
    draw = np.random.default_rng(seed).integers(0, len(sums), size=(resamples, len(sums)))
    means = sums[draw].sum(1) / counts[draw].sum(1)
    tail = (1 - confidence) / 2 * 100
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(v.mean()), float(low), float(high)


def win_rate(policy_scores, reference_scores, tie_tolerance: float = 1e-9, groups=None) -> WinRate:
    """Win rate of ``policy_scores`` over ``reference_scores`` (comparison by comparison); ``groups``: each
    comparison's prompt, for the prompt-clustered CI."""
    p = np.asarray(policy_scores, dtype=np.float64)
    r = np.asarray(reference_scores, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"need two equal-length, non-empty score vectors, got {p.shape} and {r.shape}")
    diff = p - r
    wins, losses = int((diff > tie_tolerance).sum()), int((diff < -tie_tolerance).sum())
    ties = p.size - wins - losses
    s = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    if groups is not None:
        mean, low, high = clustered_mean_ci(s, groups)
        return WinRate(mean, low, high, wins, ties, losses)
    mean = float(s.mean())
    half = Z95 * float(s.std(ddof=1)) / np.sqrt(s.size) if s.size > 1 else 0.5
    return WinRate(mean, max(0.0, mean - half), min(1.0, mean + half), wins, ties, losses)


def reward_summary(policy_scores, reference_scores, groups) -> dict[str, float]:
    """The mean judged reward of the policy's generations with its prompt-clustered 95% CI, and the
    reference's mean (what the normalised gain is measured from)."""
    mean, low, high = clustered_mean_ci(policy_scores, groups)
    return {"reward_mean": mean, "reward_ci_low": low, "reward_ci_high": high,
            "reference_reward_mean": float(np.mean(reference_scores))}


def normalised_gain(reward: float, reference: float, nonprivate: float) -> float:
    """(R - R_ref) / (R_nonprivate - R_ref): 0 at the reference, 1 at the non-private ceiling; NaN when
    the ceiling did not move from the reference."""
    span = nonprivate - reference
    return float((reward - reference) / span) if abs(span) > 1e-12 else float("nan")


def label_accuracy(final_pairs, true_pairs) -> float:
    """Fraction of final training labels equal to the true labels, matched by pair id.

    Both frames hold {id, chosen}; a label is correct when the final ``chosen``
    response is the truly preferred one.
    """
    truth = dict(zip(true_pairs["id"], true_pairs["chosen"]))
    ok = [truth[i] == c for i, c in zip(final_pairs["id"], final_pairs["chosen"])]
    if not ok:
        raise ValueError("no pairs to compare")
    return float(np.mean(ok))
