"""DP-SGD accounting (props_ray.privacy.accounting) against Opacus's own accountants. No Ray."""

from __future__ import annotations

import math

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from props_ray.privacy.accounting import (PrivacyConfigError, StagedAccountant, calibrate_noise_multiplier,
                                          epsilon_after, plan_steps, resolve_delta, sample_rate, steps_in_epoch)

OPACUS = {"prv": PRVAccountant, "rdp": RDPAccountant}


def opacus_epsilon(name: str, steps: int, q: float, sigma: float, delta: float) -> float:
    acc = OPACUS[name]()
    for _ in range(steps):
        acc.step(noise_multiplier=sigma, sample_rate=q)
    return acc.get_epsilon(delta)


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize("steps,q,sigma", [(20, 0.05, 1.1), (63, 32 / 1000, 2.3), (7, 0.5, 0.8)])
def test_epsilon_after_equals_opacus_accountant(name, steps, q, sigma):
    delta = 1e-4
    ours = epsilon_after(steps, q, sigma, delta, name)
    theirs = opacus_epsilon(name, steps, q, sigma, delta)
    assert ours == pytest.approx(theirs, rel=1e-9)
    # and it is a real function of the inputs (guards a constant/zero answer)
    assert epsilon_after(steps, q, 2 * sigma, delta, name) < ours
    assert epsilon_after(2 * steps, q, sigma, delta, name) > ours


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize("target", [0.5, 2.0, 8.0])
def test_calibrated_sigma_meets_target_within_one_percent(name, target):
    delta, q, steps = 1 / 3000, 32 / 1000, 62
    sigma = calibrate_noise_multiplier(target, delta, q, steps, name)
    eps = opacus_epsilon(name, steps, q, sigma, delta)
    assert eps <= target
    assert eps >= 0.99 * target, (sigma, eps)


def test_zero_steps_and_zero_noise():
    assert epsilon_after(0, 0.1, 1.0, 1e-5) == 0.0
    assert math.isinf(epsilon_after(10, 0.1, 0.0, 1e-5))


def test_resolve_delta_default_and_rejection():
    for n in (2, 10, 600, 3000, 160_000):  # the default is strictly below 1/N: N^-1.1
        assert resolve_delta(None, n) == pytest.approx(n ** -1.1) and resolve_delta(None, n) < 1 / n
        with pytest.raises(PrivacyConfigError, match=r"privacy\.dpsgd\.delta"):
            resolve_delta(1 / n, n)  # the value the default used to be is refused
    assert resolve_delta(1e-5, 600) == 1e-5
    for bad in (1 / 600, 0.01):
        with pytest.raises(PrivacyConfigError, match=r"privacy\.dpsgd\.delta"):
            resolve_delta(bad, 600)


def test_plan_and_sample_rate():
    assert sample_rate(32, 1000) == pytest.approx(0.032)
    assert sample_rate(64, 10) == 1.0
    assert plan_steps(1000, 32, 2) == round(62.5) == 62
    assert plan_steps(200, 32, 2) == 12 and plan_steps(4, 32, 3) == 1
    assert [steps_in_epoch(13, 3, e) for e in range(3)] == [5, 4, 4]
    assert [steps_in_epoch(1, 3, e) for e in range(3)] == [1, 0, 0]


def test_staged_accountant_is_max_over_disjoint_stages_and_resumes():
    delta = 1 / 900
    acc = StagedAccountant(delta, "prv")
    # stage 1 and 2 calibrated to the same target for their own (q, T); stage 3 smaller -> fewer steps
    plans = {k: acc.plan(k, n, expected_batch_size=16, epochs=2, target_epsilon=1.0)
             for k, n in ((1, 300), (2, 300), (3, 120))}
    for k, p in plans.items():
        for _ in range(p.planned_steps):
            acc.step(k)
        assert p.steps == p.planned_steps
        # per stage: exactly what Opacus reports for that stage's mechanism, within the target
        e = acc.stage_epsilon(k)
        assert e == pytest.approx(opacus_epsilon("prv", p.planned_steps, p.sample_rate, p.noise_multiplier, delta))
        assert 0.99 <= e <= 1.0
    assert acc.epsilon() == max(acc.stage_epsilon(k) for k in plans)  # parallel composition, not a sum
    assert acc.epsilon() <= 1.0

    # a restarted worker restores the accountants and keeps counting; epsilon is not reset
    state = acc.state_dict()
    again = StagedAccountant(delta, "prv")
    again.load_state_dict(state)
    assert again.epsilon() == acc.epsilon()
    assert again.plan(2, 300, 16, 2, 1.0).steps == plans[2].planned_steps  # existing plan, history kept
    with pytest.raises(RuntimeError, match="does not match"):
        again.plan(2, 301, 16, 2, 1.0)


def test_fixed_noise_multiplier_overrides_calibration():
    acc = StagedAccountant(1e-4, "rdp")
    plan = acc.plan(1, 500, 50, 1, target_epsilon=1.0, noise_multiplier=0.7)
    assert plan.noise_multiplier == 0.7
    for _ in range(plan.planned_steps):
        acc.step(1)
    assert acc.epsilon() == pytest.approx(opacus_epsilon("rdp", plan.planned_steps, 0.1, 0.7, 1e-4))
    assert acc.epsilon() > 1.0  # the fixed sigma is used, not the target


@pytest.mark.parametrize("name", ["prv", "rdp"])
def test_memoized_rdp_leaves_opacus_epsilon_unchanged(name, monkeypatch):
    from opacus.accountants.analysis import rdp

    cases = [(20, 0.05, 1.1), (63, 32 / 1000, 2.3), (7, 0.5, 0.8), (40, 32 / 1000, 2.3)]
    ours = [epsilon_after(steps, q, sigma, 1e-4, name) for steps, q, sigma in cases]
    memo = rdp._compute_rdp
    assert memo.cache_info().currsize > 0, "make_accountant memoizes Opacus's per-step RDP"
    monkeypatch.setattr(rdp, "_compute_rdp", memo.__wrapped__)  # Opacus as shipped
    theirs = [opacus_epsilon(name, steps, q, sigma, 1e-4) for steps, q, sigma in cases]
    assert ours == theirs  # bit for bit
    assert len(set(ours)) == len(ours)  # a memo keyed on too little would repeat a value


def _search(eps_of, target, start):
    from props_ray.privacy.accounting import CALIBRATION_REL_TOL, _search_noise_multiplier

    calls = []

    def counted(sigma):
        calls.append(sigma)
        return eps_of(sigma)

    sigma = _search_noise_multiplier(counted, target, CALIBRATION_REL_TOL, start)
    return sigma, calls


@pytest.mark.parametrize("curve", ["inverse", "steep", "floor", "kink", "infinite_below"])
@pytest.mark.parametrize("start", [1e-3, 0.3, 4.0, 500.0])
def test_noise_search_lands_in_the_window_of_any_decreasing_curve(curve, start):
    from props_ray.privacy.accounting import CALIBRATION_REL_TOL

    eps_of = {"inverse": lambda s: 2.0 / s,
              "steep": lambda s: 50.0 / s ** 4,
              "floor": lambda s: 0.45 + 1.0 / s ** 2,  # another mechanism's epsilon under the stage's
              "kink": lambda s: 3.0 / s if s < 2 else 1.5 * math.exp(-(s - 2)),
              "infinite_below": lambda s: math.inf if s < 0.7 else 1.0 / (s - 0.6)}[curve]
    target = 0.5
    sigma, calls = _search(eps_of, target, start)
    assert sigma == calls[-1]  # the answer is the last sigma evaluated, never an extrapolation
    assert target * (1 - CALIBRATION_REL_TOL) <= eps_of(sigma) <= target
    assert len(calls) <= 40


def test_noise_search_refuses_an_unreachable_target():
    from props_ray.privacy.accounting import _search_noise_multiplier, _Unreachable

    with pytest.raises(_Unreachable):
        _search_noise_multiplier(lambda s: 0.6 + 1.0 / s, 0.5, 0.005, 1.0)
    with pytest.raises(PrivacyConfigError, match="cannot reach epsilon"):
        calibrate_noise_multiplier(0.1, 1e-5, 0.032, 62, "rdp")


@pytest.mark.parametrize("name", ["prv", "rdp"])
@pytest.mark.parametrize("target,q,steps", [(0.5, 32 / 1000, 62), (2.0, 16 / 300, 19), (1.0, 1.0, 5)])
def test_calibration_agrees_with_opacus_get_noise_multiplier_in_fewer_evaluations(name, target, q, steps, monkeypatch):
    from opacus.accountants.utils import get_noise_multiplier

    delta = 1.5e-4
    evaluations = {"n": 0}
    original = OPACUS[name].get_epsilon

    def counted(self, *args, **kwargs):
        evaluations["n"] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(OPACUS[name], "get_epsilon", counted)
    ours = calibrate_noise_multiplier(target, delta, q, steps, name)
    ours_n, evaluations["n"] = evaluations["n"], 0
    theirs = get_noise_multiplier(target_epsilon=target, target_delta=delta, sample_rate=q, steps=steps,
                                  accountant=name, epsilon_tolerance=0.005 * target)
    theirs_n = evaluations["n"]
    assert ours == pytest.approx(theirs, rel=0.01)  # both within 0.5% of epsilon of the smallest sigma
    assert 0.995 * target <= epsilon_after(steps, q, ours, delta, name) <= target
    assert ours_n <= theirs_n / 2, (ours_n, theirs_n)
