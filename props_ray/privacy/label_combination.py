"""Combining a pair's randomized-response label with an earlier-stage model's label.

Everything here works in the *RR orientation*: for each pair, "chosen" is the
response the privatized (RR) label prefers, and ``margin`` is the stage model's
DPO implicit reward margin of that response over the other one. A positive
margin means the model agrees with the RR label.

Inputs are privatized labels and margins of a model that never saw these pairs'
labels (it was trained on earlier, disjoint partitions), so every output is
post-processing of epsilon-label-DP data: the guarantee stays epsilon.

Outputs are the probability that the RR-chosen response is truly preferred
(``confidence``), in (0, 1), and the hard label it implies (``flipped`` where it
is below 1/2). ``mle`` decides by the sign of its log-likelihood ratio and its
confidence is that ratio's posterior under the rule's own model (independent RR
and model errors at rates gamma_eps and gamma_M); ``posterior`` calibrates the
margin itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from statistics import NormalDist

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import expit

from props_ray.privacy.randomized_response import flip_probability

GAMMA_M_MIN = 1e-3
GAMMA_M_MAX = 0.5 - 1e-3


@dataclass(frozen=True)
class Combination:
    """Result of combining labels for one partition."""

    confidence: np.ndarray  # P(RR-chosen is truly preferred), per pair
    rule: str
    disagreement: float  # fraction of pairs where the model disagrees with RR
    model_error: float | None = None  # gamma_M (mle)
    calibration_scale: float | None = None  # alpha (posterior)
    model_error_bound: float | None = None  # the upper confidence bound on gamma_M the mle rule used, if asked

    @property
    def flipped(self) -> np.ndarray:
        """Pairs whose combined (hard) label differs from the RR label."""
        return self.confidence < 0.5


def model_labels_disagree(margins: np.ndarray) -> np.ndarray:
    """True where the model prefers the RR-rejected response (margin < 0).

    A zero margin is an abstention and counts as agreement.
    """
    return np.asarray(margins, dtype=np.float64) < 0


def estimate_model_error(disagreement: float, gamma_rr: float,
                         lo: float = GAMMA_M_MIN, hi: float = GAMMA_M_MAX) -> float:
    """gamma_M from the disagreement rate d between model and RR labels.

    If the model errs independently of RR with rate gamma_M, then
    d = gamma_M (1 - gamma) + (1 - gamma_M) gamma, hence
    gamma_M = (d - gamma) / (1 - 2 gamma), clamped to [lo, hi].
    """
    if not 0.0 <= gamma_rr < 0.5:
        raise ValueError(f"RR flip rate must be in [0, 0.5), got {gamma_rr}")
    if not 0.0 <= disagreement <= 1.0:
        raise ValueError(f"disagreement must be in [0, 1], got {disagreement}")
    gamma_m = (disagreement - gamma_rr) / (1.0 - 2.0 * gamma_rr)
    return float(min(max(gamma_m, lo), hi))


def model_error_upper_bound(disagreement: float, n: int, gamma_rr: float, confidence: float) -> float:
    """A one-sided upper confidence bound on gamma_M at level ``confidence``.

    The disagreement rate d of n pairs has the Wilson upper bound d+; gamma_M is increasing in d, so
    (d+ - gamma) / (1 - 2 gamma) bounds it. The bound widens as 1 / (1 - 2 gamma): at small epsilon the
    privatized labels say little about how good the model is.
    """
    if not 0.5 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0.5, 1), got {confidence}")
    if n <= 0:
        return GAMMA_M_MAX
    z = NormalDist().inv_cdf(confidence)
    d = disagreement
    upper = (d + z * z / (2 * n) + z * np.sqrt(d * (1 - d) / n + z * z / (4 * n * n))) / (1 + z * z / n)
    return estimate_model_error(min(1.0, float(upper)), gamma_rr)


def combine_mle(margins: np.ndarray, epsilon: float, model_error_confidence: float | None = None) -> Combination:
    """The PROPS maximum-likelihood rule.

    Decide each pair by the sign of
        (-1)^l_RR log((1-gamma)/gamma) + (-1)^l_M log((1-gamma_M)/gamma_M),
    with l = 0 meaning "prefers the RR-chosen response". Ties keep the RR label. That sum is the
    log-odds that the RR-chosen response is truly preferred when the RR and model labels err
    independently at rates gamma and gamma_M, so ``confidence`` is its sigmoid: the hard loss uses
    only its sign, the ``soft`` loss the probability (label smoothing by the rule's own error model).

    ``model_error_confidence`` (e.g. 0.95) plugs in the upper confidence bound on gamma_M instead of
    its point estimate: the model overrides an RR label only where the privatized labels show, at
    that confidence, that it is more accurate than RR. Still computed from privatized labels and
    margins only.
    """
    margins = np.asarray(margins, dtype=np.float64)
    gamma = flip_probability(epsilon)
    disagree = model_labels_disagree(margins)
    d = float(disagree.mean()) if margins.size else 0.0
    gamma_m = estimate_model_error(d, gamma)
    bound = None
    if model_error_confidence is not None:
        bound = model_error_upper_bound(d, int(margins.size), gamma, model_error_confidence)
    used = gamma_m if bound is None else bound
    w_rr = np.log((1.0 - gamma) / gamma)
    w_m = np.log((1.0 - used) / used)
    score = w_rr + np.where(disagree, -w_m, w_m)  # the log-odds that the RR-chosen response is preferred
    confidence = expit(score)
    return Combination(confidence=confidence, rule="mle", disagreement=d, model_error=gamma_m,
                       model_error_bound=bound)


def _rr_log_likelihood(alpha: float, margins: np.ndarray, gamma: float) -> float:
    # P(RR label as observed | margin) = (1-gamma) sigma(alpha m) + gamma sigma(-alpha m)
    p = (1.0 - gamma) * expit(alpha * margins) + gamma * expit(-alpha * margins)
    return float(np.log(np.clip(p, 1e-300, None)).sum())


def calibrate_margin_scale(margins: np.ndarray, epsilon: float, max_scale: float = 100.0) -> float:
    """Fit alpha >= 0 in P(true = RR-chosen | m) = sigmoid(alpha m) by maximum likelihood
    of the observed *privatized* labels, whose flip rate gamma_eps is known.

    The model is symmetric under swapping the two responses, so no bias term.
    Uses only privatized labels, hence it is post-processing.
    """
    margins = np.asarray(margins, dtype=np.float64)
    gamma = flip_probability(epsilon)
    if margins.size == 0 or not np.any(margins):
        return 0.0
    scale = float(np.abs(margins).mean())
    res = minimize_scalar(lambda a: -_rr_log_likelihood(a / scale, margins, gamma),
                          bounds=(0.0, max_scale), method="bounded", options={"xatol": 1e-6})
    alpha = float(res.x) / scale
    # The bounded search never evaluates the end point 0 exactly: prefer it when it is better.
    if _rr_log_likelihood(0.0, margins, gamma) >= _rr_log_likelihood(alpha, margins, gamma):
        return 0.0
    return alpha


def posterior_confidence(margins: np.ndarray, epsilon: float, alpha: float) -> np.ndarray:
    """P(true = RR-chosen | RR label, margin) by Bayes' rule with prior sigmoid(alpha m)."""
    margins = np.asarray(margins, dtype=np.float64)
    gamma = flip_probability(epsilon)
    # log-odds = log((1-gamma)/gamma) + alpha m
    return expit(np.log((1.0 - gamma) / gamma) + alpha * margins)


def combine_posterior(margins: np.ndarray, epsilon: float) -> Combination:
    """Per-pair Bayes posterior with the model's margin calibrated on privatized labels."""
    margins = np.asarray(margins, dtype=np.float64)
    alpha = calibrate_margin_scale(margins, epsilon)
    conf = posterior_confidence(margins, epsilon, alpha)
    d = float(model_labels_disagree(margins).mean()) if margins.size else 0.0
    return Combination(confidence=conf, rule="posterior", disagreement=d, calibration_scale=alpha)


RULES = {"mle": combine_mle, "posterior": combine_posterior}


def combine_labels(margins: np.ndarray, epsilon: float, rule: str, **options) -> Combination:
    """Combine with ``rule``; ``options`` go to the rule (``model_error_confidence`` for mle)."""
    try:
        fn = RULES[rule]
    except KeyError:
        raise ValueError(f"unknown combination rule {rule!r}; expected one of {sorted(RULES)}") from None
    return fn(margins, epsilon, **options)


__all__ = [
    "Combination", "combine_labels", "combine_mle", "combine_posterior", "calibrate_margin_scale",
    "posterior_confidence", "estimate_model_error", "model_error_upper_bound", "model_labels_disagree",
]
