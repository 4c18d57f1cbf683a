"""Win rate of the aligned policy against the reference, with a 95% confidence interval.

Each held-out comparison scores 1 for a win, 1/2 for a tie and 0 for a loss;
the win rate is the mean score and the interval is the normal approximation
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


def win_rate(policy_scores, reference_scores, tie_tolerance: float = 1e-9) -> WinRate:
    p = np.asarray(policy_scores, dtype=np.float64)
    r = np.asarray(reference_scores, dtype=np.float64)
    if p.shape != r.shape or p.ndim != 1 or p.size == 0:
        raise ValueError(f"need two equal-length, non-empty score vectors, got {p.shape} and {r.shape}")
    diff = p - r
    wins, losses = int((diff > tie_tolerance).sum()), int((diff < -tie_tolerance).sum())
    ties = p.size - wins - losses
    s = np.where(diff > tie_tolerance, 1.0, np.where(diff < -tie_tolerance, 0.0, 0.5))
    mean = float(s.mean())
    half = Z95 * float(s.std(ddof=1)) / np.sqrt(s.size) if s.size > 1 else 0.5
    return WinRate(mean, max(0.0, mean - half), min(1.0, mean + half), wins, ties, losses)


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
