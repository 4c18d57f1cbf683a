"""An empirical privacy audit with canaries: pure functions, no Ray, no model.

The auditor inserts m canary pairs whose label (which response is preferred) is a fair coin it keeps
secret, the job trains as usual, and the auditor guesses each canary's label from the released
model. With k of m guesses right, a one-sided Clopper--Pearson bound gives the attack's accuracy
``p_low`` at confidence 1 - alpha, and

- for epsilon-(label-)DP, any guess of a fair-coin label is right with probability at most
  e^eps / (1 + e^eps), so eps >= log(p_low / (1 - p_low));
- for (eps, delta)-DP, p <= e^eps (1 - p) + delta (the hypothesis-testing bound on one canary),
  so eps >= log((p_low - delta) / (1 - p_low)).

All m canaries are audited in one training run; Steinke, Nasr and Jagielski (Privacy auditing with one
(1) training run, NeurIPS 2023) show that under eps-DP the number of right guesses is then
stochastically dominated by Binomial(m, e^eps / (1 + e^eps)), so the binomial bound stays valid (for
(eps, delta) their bound adds a term in delta, which the form above approximates for small delta).
The bound is a *lower* bound on the epsilon the trained model exhibits: a bound above the claimed
epsilon is a bug in the mechanism, not noise to explain away (at the 1 - alpha level).
"""

from __future__ import annotations

import math

#: One-sided confidence of the accuracy bound.
ALPHA = 0.05


def clopper_pearson_lower(correct: int, total: int, alpha: float = ALPHA) -> float:
    """The one-sided (1 - alpha) Clopper--Pearson lower bound on a binomial proportion."""
    from scipy.stats import beta

    if not 0 <= correct <= total or total <= 0:
        raise ValueError(f"need 0 <= correct <= total and total > 0, got {correct} of {total}")
    return 0.0 if correct == 0 else float(beta.ppf(alpha, correct, total - correct + 1))


def epsilon_lower_bound(correct: int, total: int, delta: float = 0.0, alpha: float = ALPHA) -> float:
    """The epsilon the audit proves at confidence 1 - alpha (0 when the attack does no better than a coin:
    epsilon is never negative)."""
    p = clopper_pearson_lower(correct, total, alpha)
    if p <= 0.5 + delta / 2 or p - delta <= 0:
        return 0.0
    return max(0.0, math.log((p - delta) / (1.0 - p)))
