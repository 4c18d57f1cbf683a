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
Their analysis also lets the auditor abstain: it guesses only the r canaries the model is most
confident about, and the r guesses' right count is still dominated by Binomial(r, e^eps / (1 + e^eps))
as long as r is fixed before looking, and so is any subset chosen without the secrets (the canaries
of one stage's partition: a staged method's final model remembers its last partition best).
:func:`abstaining_epsilon_lower_bound` declares its guess sets in advance and splits alpha among them
(Bonferroni), so taking the best of them keeps the 1 - alpha level.
The bound is a *lower* bound on the epsilon the trained model exhibits: a bound above the claimed
epsilon is a bug in the mechanism, not noise to explain away (at the 1 - alpha level).
"""

from __future__ import annotations

import math

import numpy as np

#: One-sided confidence of the accuracy bound.
ALPHA = 0.05

#: The guess budgets declared before any score is seen: all m canaries, then the m/2, m/4 and m/8 the
#: model is most confident about.
GUESS_FRACTIONS = (1.0, 0.5, 0.25, 0.125)


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


def abstaining_epsilon_lower_bound(confidence, correct, delta: float = 0.0, alpha: float = ALPHA,
                                   fractions=GUESS_FRACTIONS, groups=None, seed: int = 0) -> dict:
    """The audit with abstention: for each declared budget r = ceil(f m), guess only the r canaries with the
    highest ``confidence`` (e.g. the absolute reward margin; ties broken by a seeded coin) and bound epsilon
    from how many of those are ``correct``. With ``groups`` (a label per canary that does not depend on the
    secret labels, such as the stage partition it was trained in), the budgets are declared within every
    group as well as over all canaries. Each of these guess sets is bounded at level alpha / (their number),
    so the largest bound holds at 1 - alpha overall.

    Returns {epsilon, guesses, correct, group}: the best bound, the budget and group that gave it (group
    None: all canaries; all m guesses when nothing proves anything).
    """
    confidence = np.asarray(confidence, dtype=float)
    correct = np.asarray(correct, dtype=bool)
    m = len(correct)
    if m == 0 or confidence.shape != correct.shape or not np.isfinite(confidence).all():
        raise ValueError(f"need as many finite confidences as guesses, got {confidence.shape} and {correct.shape}")
    if not fractions or any(not 0 < f <= 1 for f in fractions):
        raise ValueError(f"guess fractions must lie in (0, 1], got {fractions}")
    sets: list[tuple[object, np.ndarray]] = [(None, np.arange(m))]
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != correct.shape:
            raise ValueError(f"need a group per guess, got {groups.shape} for {correct.shape}")
        labels = sorted(set(groups.tolist()))
        if len(labels) > 1:
            sets += [(g, np.flatnonzero(groups == g)) for g in labels]
    level = alpha / (len(sets) * len(fractions))
    tie = np.random.default_rng([seed, 0xAB57]).random(m)
    best = {"epsilon": 0.0, "guesses": m, "correct": int(correct.sum()), "group": None}
    for group, members in sets:
        order = members[np.lexsort((tie[members], -confidence[members]))]  # most confident first
        for f in fractions:
            r = max(1, math.ceil(f * len(members)))
            k = int(correct[order[:r]].sum())
            eps = epsilon_lower_bound(k, r, delta, level)
            if eps > best["epsilon"]:
                best = {"epsilon": eps, "guesses": r, "correct": k, "group": group}
    return best
