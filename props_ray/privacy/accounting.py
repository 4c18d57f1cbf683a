"""Privacy accounting for DP-SGD (method ``dpsgd``): pure functions, no Ray, no model.

The mechanism is the Poisson-subsampled Gaussian mechanism of DP-SGD: at each
step every preference pair of a stage partition is included independently with
probability ``q``, each included pair's gradient is clipped to norm ``C`` and
Gaussian noise ``N(0, sigma^2 C^2)`` is added once to the sum. Accounting uses
Opacus's accountants (PRV by default, RDP selectable), under the add/remove-one
neighbouring relation on pairs.

Stages and parallel composition
-------------------------------
The K stage partitions are *disjoint* and are trained one after another. A pair
of partition k only ever enters stage k's mechanism; the stages before k do not
depend on it and the stages after k see it only through stage k's output
(post-processing; their own data is the same for both neighbouring datasets).
So by (adaptive) parallel composition the whole run is
``(max_k eps_k, max_k delta_k)``-DP, where ``eps_k`` is what stage k's
accountant alone reports. :class:`StagedAccountant` therefore keeps one
accountant per stage, calibrates each stage's noise multiplier to the full
target epsilon for that stage's own ``(q_k, T_k)``, and reports
``epsilon = max over stages``. Nothing is composed across stages.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from props_ray.errors import UserError

ACCOUNTANTS = ("prv", "rdp")
# Calibrated sigma gives an epsilon in [target * (1 - CALIBRATION_REL_TOL), target].
CALIBRATION_REL_TOL = 0.005


class PrivacyConfigError(UserError, ValueError):
    """A DP-SGD setting that cannot give the requested guarantee; the message names the field."""


def _check_accountant(name: str) -> str:
    if name not in ACCOUNTANTS:
        raise PrivacyConfigError(f"privacy.dpsgd.accountant must be one of {ACCOUNTANTS}, got {name!r}")
    return name


def _memoize_subsampled_gaussian_rdp() -> None:
    """Memoize Opacus's RDP of one subsampled-Gaussian step, a pure function of (q, sigma, order).

    Every PRV epsilon sizes its domain with two RDP evaluations at the same (q, sigma), and epsilon
    at the logged steps of a stage repeats them; the series behind them were 72% of a PRV epsilon's
    time. The memo returns the very value Opacus computes (``tests/test_accounting.py`` checks
    epsilon with and without it for equality). Leaves Opacus as it is if the function is not there.
    """
    import functools

    from opacus.accountants.analysis import rdp

    original = getattr(rdp, "_compute_rdp", None)
    if original is None or hasattr(original, "cache_info"):
        return
    rdp._compute_rdp = functools.lru_cache(maxsize=1 << 16)(original)


def make_accountant(name: str, history: list[tuple[float, float, int]] | None = None):
    """An Opacus accountant (``PRVAccountant`` / ``RDPAccountant``) with the given history."""
    from opacus.accountants import PRVAccountant, RDPAccountant

    _memoize_subsampled_gaussian_rdp()
    acc = {"prv": PRVAccountant, "rdp": RDPAccountant}[_check_accountant(name)]()
    acc.history = [(float(s), float(q), int(n)) for s, q, n in (history or [])]
    return acc


#: The default delta is N ** -DEFAULT_DELTA_EXPONENT: strictly below 1/N for every N > 1, and
#: o(1/N), the rule of "How to DP-fy ML" (Ponomareva et al., 2023, section 5.2).
DEFAULT_DELTA_EXPONENT = 1.1


def default_delta(total_pairs: int) -> float:
    """N^-1.1: strictly below 1/N for N > 1 (3,000 pairs: 1.5e-4 against 1/N = 3.3e-4)."""
    return float(total_pairs) ** -DEFAULT_DELTA_EXPONENT


def resolve_delta(delta: float | None, total_pairs: int) -> float:
    """``delta`` for a dataset of ``total_pairs`` pairs: N^-1.1 by default.

    Any delta, given or default, must be below 1/N (a delta of 1/N or more allows a
    mechanism that publishes one whole pair outright).
    """
    if total_pairs <= 1:
        raise PrivacyConfigError(f"DP-SGD needs at least two training pairs, got {total_pairs}")
    bound = 1.0 / total_pairs
    if delta is None:
        return default_delta(total_pairs)
    if not 0.0 < delta < bound:
        raise PrivacyConfigError(
            f"privacy.dpsgd.delta = {delta:g} must be in (0, 1/N) = (0, {bound:.3g}) for N = {total_pairs} "
            f"pairs; a delta of 1/N or more lets the mechanism reveal a whole pair. Leave privacy.dpsgd.delta "
            f"unset for the default N^-1.1 = {default_delta(total_pairs):.3g} or set it smaller.")
    return float(delta)


def sample_rate(expected_batch_size: int, num_pairs: int) -> float:
    """Poisson inclusion probability q = B / N (capped at 1)."""
    if num_pairs <= 0:
        raise PrivacyConfigError("a DP-SGD stage partition has no pairs")
    return min(1.0, expected_batch_size / num_pairs)


def plan_steps(num_pairs: int, expected_batch_size: int, epochs: int) -> int:
    """Planned logical steps of a stage: ``round(epochs * N / B)``, at least 1."""
    return max(1, int(round(epochs * num_pairs / expected_batch_size)))


def steps_in_epoch(planned_steps: int, epochs: int, epoch: int) -> int:
    """The planned steps spread over the epochs as evenly as possible (earlier epochs take the remainder)."""
    base, extra = divmod(planned_steps, epochs)
    return base + (1 if epoch < extra else 0)


def epsilon_after(steps: int, sample_rate: float, noise_multiplier: float, delta: float,
                  accountant: str = "prv") -> float:
    """Epsilon of ``steps`` Poisson-subsampled Gaussian steps (rate q, multiplier sigma) at ``delta``."""
    if steps <= 0 or sample_rate <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    return float(make_accountant(accountant, [(noise_multiplier, sample_rate, steps)]).get_epsilon(delta=delta))


#: Opacus's own bound on a calibrated noise multiplier (``opacus.accountants.utils.MAX_SIGMA``).
MAX_NOISE_MULTIPLIER = 1e6


class _Unreachable(Exception):
    pass


def _search_noise_multiplier(epsilon_of, target_epsilon: float, rel_tolerance: float, start: float) -> float:
    """A sigma with ``target * (1 - rel_tolerance) <= epsilon_of(sigma) <= target``; ``epsilon_of`` decreases.

    Regula falsi (the Illinois variant) on log epsilon against log sigma, where the curve is close to a
    line (epsilon ~ 1/sigma over most of the range), aimed at the middle of the accepted window. It needs
    3-7 accountant evaluations where bisection on sigma (Opacus's ``get_noise_multiplier``) needs 8-17,
    and a PRV evaluation costs 40-400 ms on a CPU. The answer is always a sigma that was evaluated and
    whose epsilon is within the target by the accountant's own account: in the window, or, should the
    accountant not be monotone, the last one below it.
    """
    accept_low = target_epsilon * (1 - rel_tolerance)
    aim = math.log(target_epsilon * (1 - rel_tolerance / 2))
    lo = hi = None  # [log sigma, log epsilon - aim]: lo spends more than the target, hi less than the window
    previous, replaced = None, None
    u = math.log(min(max(start, 1e-3), MAX_NOISE_MULTIPLIER))
    for _ in range(200):
        sigma = math.exp(u)
        if sigma > MAX_NOISE_MULTIPLIER:
            raise _Unreachable
        eps = epsilon_of(sigma)
        if accept_low <= eps <= target_epsilon:
            return sigma
        f = math.inf if eps == math.inf else (math.log(eps) - aim if eps > 0 else -math.inf)
        point = [u, f]
        side = "lo" if eps > target_epsilon else "hi"
        if side == "lo":
            lo = point
        else:
            hi = point
        if lo is not None and hi is not None:
            if replaced == side:  # the other end has been kept twice running: halve it (Illinois)
                other = hi if side == "lo" else lo
                other[1] /= 2
            replaced = side
            if hi[0] - lo[0] < 1e-12:  # a non-monotone accountant: keep the side that meets the target
                return math.exp(hi[0])
            if math.isinf(lo[1]) or math.isinf(hi[1]):
                u = (lo[0] + hi[0]) / 2
            else:
                u = lo[0] - lo[1] * (hi[0] - lo[0]) / (hi[1] - lo[1])
        elif math.isinf(f):
            u += math.log(2.0) if f > 0 else -math.log(2.0)
        else:  # one side only: step along the secant slope of the last two points (or -1), at most x8
            slope = -1.0
            if previous is not None and not math.isinf(previous[1]) and previous[0] != u:
                slope = min(max((f - previous[1]) / (u - previous[0]), -10.0), -0.05)
            u += min(max(-f / slope, -math.log(8.0)), math.log(8.0))
        previous = point
    raise RuntimeError("noise calibration did not converge")  # pragma: no cover - a broken accountant


def _start(target_epsilon: float, delta: float, sample_rate: float, steps: int) -> float:
    """A first guess: the moments-accountant estimate sigma ~ q * sqrt(2 T ln(1/delta)) / epsilon."""
    return sample_rate * math.sqrt(2 * steps * max(math.log(1 / delta), 1.0)) / target_epsilon


def calibrate_noise_multiplier(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                               accountant: str = "prv", rel_tolerance: float = CALIBRATION_REL_TOL) -> float:
    """A sigma whose epsilon after ``steps`` is in ``[target * (1 - rel_tolerance), target]``: within
    ``rel_tolerance`` of the smallest sigma that meets the target (the contract of Opacus's
    ``get_noise_multiplier``, found with fewer accountant evaluations)."""
    if not target_epsilon > 0:
        raise PrivacyConfigError(f"target epsilon must be > 0, got {target_epsilon}")
    if steps <= 0:
        raise PrivacyConfigError(f"planned DP-SGD steps must be > 0, got {steps}")
    _check_accountant(accountant)
    try:
        return _search_noise_multiplier(lambda s: epsilon_after(steps, sample_rate, s, delta, accountant),
                                        target_epsilon, rel_tolerance,
                                        _start(target_epsilon, delta, sample_rate, steps))
    except _Unreachable:
        raise PrivacyConfigError(
            f"cannot reach epsilon {target_epsilon:g} at delta {delta:.3g} with sampling rate {sample_rate:.4g} "
            f"over {steps} steps: it needs a noise multiplier above {MAX_NOISE_MULTIPLIER:g}") from None


def composed_epsilon(history: list[tuple[float, float, int]], delta: float, accountant: str = "prv") -> float:
    """Epsilon at ``delta`` of the sequential composition of mechanisms given as Opacus history entries
    (noise multiplier, sampling rate, steps): subsampled-Gaussian DP-SGD steps and, at rate 1 and one
    step, plain Gaussian releases."""
    import numpy as np

    if any(s <= 0 for s, _, _ in history):
        return math.inf
    with np.errstate(divide="ignore"):  # PRV's log(1 - q) at q = 1 (a plain Gaussian release) is handled
        return float(make_accountant(accountant, history).get_epsilon(delta=delta))


def calibrate_composed(target_epsilon: float, delta: float, sample_rate: float, steps: int,
                       fixed: list[tuple[float, float, int]], accountant: str = "prv",
                       rel_tolerance: float = CALIBRATION_REL_TOL) -> float:
    """A DP-SGD noise multiplier within ``rel_tolerance`` of the smallest whose ``steps`` at
    ``sample_rate``, composed with the ``fixed`` mechanisms, stay within ``target_epsilon``."""
    floor = composed_epsilon(fixed, delta, accountant) if fixed else 0.0
    if floor >= target_epsilon * (1 - rel_tolerance):
        raise PrivacyConfigError(f"the other mechanisms alone spend epsilon {floor:.3g} of the {target_epsilon:g} "
                                 "asked for: add noise to them or ask for a larger epsilon")
    try:
        return _search_noise_multiplier(
            lambda s: composed_epsilon([*fixed, (s, sample_rate, steps)], delta, accountant),
            target_epsilon, rel_tolerance, _start(target_epsilon - floor, delta, sample_rate, steps))
    except _Unreachable:
        raise PrivacyConfigError(f"cannot reach epsilon {target_epsilon:g} at delta {delta:.3g}") from None


@dataclass
class StagePlan:
    """What stage k's mechanism is: N_k pairs, q_k, T_k planned steps, sigma_k."""

    stage: int
    num_pairs: int
    sample_rate: float
    epochs: int
    planned_steps: int
    noise_multiplier: float
    history: list = field(default_factory=list)  # Opacus accountant history [(sigma, q, steps)]

    @property
    def steps(self) -> int:
        return sum(int(n) for _, _, n in self.history)

    def steps_in_epoch(self, epoch: int) -> int:
        return steps_in_epoch(self.planned_steps, self.epochs, epoch)


class StagedAccountant:
    """One accountant per disjoint stage partition; epsilon = max over stages (parallel composition).

    See the module docstring for why the maximum, not a sum, is the guarantee.
    """

    def __init__(self, delta: float, accountant: str = "prv"):
        self.delta = float(delta)
        self.accountant = _check_accountant(accountant)
        self.stages: dict[int, StagePlan] = {}
        self._eps_cache: dict[tuple, float] = {}

    def plan(self, stage: int, num_pairs: int, expected_batch_size: int, epochs: int,
             target_epsilon: float | None, noise_multiplier: float | None = None,
             compose_with: list[tuple[float, float, int]] | None = None) -> StagePlan:
        """Plan stage ``stage`` (or return its plan if it exists, e.g. after a restart).

        A fixed ``noise_multiplier`` overrides calibration to ``target_epsilon``. ``compose_with``: other
        mechanisms (Opacus history entries) that compose sequentially with this stage; the stage is
        calibrated so that it and they together stay within ``target_epsilon``.
        """
        q = sample_rate(expected_batch_size, num_pairs)
        planned = plan_steps(num_pairs, expected_batch_size, epochs)
        old = self.stages.get(stage)
        if old is not None:
            if (old.num_pairs, old.planned_steps) != (num_pairs, planned) or not math.isclose(old.sample_rate, q):
                raise RuntimeError(
                    f"stage {stage}: the restored DP-SGD plan (N={old.num_pairs}, q={old.sample_rate:.4g}, "
                    f"T={old.planned_steps}) does not match this run (N={num_pairs}, q={q:.4g}, T={planned})")
            return old
        if noise_multiplier is None:
            if target_epsilon is None:
                raise PrivacyConfigError("DP-SGD needs a target epsilon or privacy.dpsgd.noise_multiplier")
            sigma = (calibrate_composed(target_epsilon, self.delta, q, planned, compose_with, self.accountant)
                     if compose_with else
                     calibrate_noise_multiplier(target_epsilon, self.delta, q, planned, self.accountant))
        else:
            sigma = float(noise_multiplier)
        plan = StagePlan(stage, int(num_pairs), q, int(epochs), planned, sigma)
        self.stages[stage] = plan
        return plan

    def step(self, stage: int) -> None:
        """Record one logical DP-SGD step of ``stage`` (same compression as Opacus's ``.step``)."""
        p = self.stages[stage]
        if p.history and p.history[-1][0] == p.noise_multiplier and p.history[-1][1] == p.sample_rate:
            s, q, n = p.history[-1]
            p.history[-1] = (s, q, n + 1)
        else:
            p.history.append((p.noise_multiplier, p.sample_rate, 1))

    def stage_epsilon(self, stage: int) -> float:
        p = self.stages[stage]
        if not p.history:
            return 0.0
        key = (self.accountant, self.delta, tuple(tuple(h) for h in p.history))
        if key not in self._eps_cache:
            if any(s <= 0 for s, _, _ in p.history):
                self._eps_cache[key] = math.inf
            else:
                self._eps_cache[key] = float(make_accountant(self.accountant, p.history).get_epsilon(delta=self.delta))
        return self._eps_cache[key]

    def epsilon(self) -> float:
        """Epsilon spent so far: the maximum over the disjoint stages."""
        return max((self.stage_epsilon(k) for k in self.stages), default=0.0)

    def state_dict(self) -> dict:
        return {"delta": self.delta, "accountant": self.accountant,
                "stages": {str(k): {**asdict(p), "history": [list(h) for h in p.history]}
                           for k, p in self.stages.items()}}

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        if state["accountant"] != self.accountant or not math.isclose(state["delta"], self.delta):
            raise RuntimeError(f"checkpointed DP-SGD accounting ({state['accountant']}, delta={state['delta']:.3g}) "
                               f"does not match this run ({self.accountant}, delta={self.delta:.3g})")
        self.stages = {}
        for k, p in state["stages"].items():
            p = dict(p)
            p["history"] = [tuple(h) for h in p["history"]]
            self.stages[int(k)] = StagePlan(**p)
