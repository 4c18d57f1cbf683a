"""The empirical privacy audit: the Clopper-Pearson epsilon bound (statistically valid, and it catches a
mechanism that leaks more than it claims), and end to end, canaries trained on with real Ray and MLflow:
randomized response's bound stays within its claim, non-private training's does not, and randomized
response with its flips switched off is caught."""

import json
import math

import numpy as np
import pytest
from scipy import stats

from props_ray.config import ConfigError, validate_job
from props_ray.privacy.audit import abstaining_epsilon_lower_bound, clopper_pearson_lower, epsilon_lower_bound


def test_clopper_pearson_is_scipy_exact_interval():
    for k, n in [(0, 10), (7, 10), (120, 200), (200, 200)]:
        want = stats.binomtest(k, n).proportion_ci(confidence_level=0.90, method="exact").low
        assert clopper_pearson_lower(k, n) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("epsilon", [0.1, 1.0, 3.0])
def test_the_bound_is_valid_for_an_epsilon_mechanism(epsilon):
    # the best guess of a fair-coin label through epsilon-RR is right with probability e^eps / (1 + e^eps)
    rng = np.random.default_rng(0)
    p = math.exp(epsilon) / (1 + math.exp(epsilon))
    bounds = [epsilon_lower_bound(int(k), 500) for k in rng.binomial(500, p, size=400)]
    assert np.mean([b > epsilon for b in bounds]) <= 0.05 + 0.03  # at most alpha, up to sampling error
    if epsilon >= 1:  # and not vacuous where 500 guesses can tell: it gets near the true epsilon
        assert np.mean(bounds) > 0.5 * epsilon


def test_a_leakier_mechanism_than_claimed_is_caught():
    rng = np.random.default_rng(1)
    claimed = 0.5  # but the labels leak at accuracy 0.8 (epsilon 1.39)
    caught = [epsilon_lower_bound(int(k), 500) > claimed for k in rng.binomial(500, 0.8, size=200)]
    assert np.mean(caught) > 0.99
    assert epsilon_lower_bound(250, 500) == 0.0 and epsilon_lower_bound(500, 500, delta=1e-5) > 4


def _leaky(rng, m, epsilon, leaky_share):
    """A mechanism that is epsilon-RR on a share of the canaries and a fair coin on the rest, and an
    attacker who knows which: its confidence is high exactly on the leaky ones (plus noise)."""
    leaky = rng.random(m) < leaky_share
    p = math.exp(epsilon) / (1 + math.exp(epsilon)) if math.isfinite(epsilon) else 1.0
    right = np.where(leaky, rng.random(m) < p, rng.random(m) < 0.5)
    return leaky + 0.1 * rng.random(m), right


@pytest.mark.parametrize("epsilon", [0.5, 2.0])
def test_abstaining_keeps_the_level_when_the_attacker_knows_where_to_look(epsilon):
    # every canary is at most epsilon-DP, so the best-budget bound may exceed epsilon at most alpha of the
    # time, even with four budgets looked at and the confident guesses all on the leakiest canaries
    rng = np.random.default_rng(2)
    over = [abstaining_epsilon_lower_bound(*_leaky(rng, 400, epsilon, 0.3), seed=i)["epsilon"] > epsilon
            for i in range(300)]
    assert np.mean(over) <= 0.05 + 0.03


def test_abstaining_keeps_the_level_with_no_leak_at_all():
    # pure coins with noise for confidence: taking the best of the declared budgets needs the alpha split;
    # without it, the four looks together exceed alpha
    rng = np.random.default_rng(3)
    split, unsplit = [], []
    for i in range(600):
        conf, right = rng.random(200), rng.random(200) < 0.5
        split.append(abstaining_epsilon_lower_bound(conf, right, seed=i)["epsilon"] > 0)
        unsplit.append(max(epsilon_lower_bound(int(right[np.argsort(-conf)[:r]].sum()), r) for r in (200, 100, 50, 25)) > 0)
    assert np.mean(split) <= 0.05 + 0.02
    assert np.mean(unsplit) > np.mean(split)
    # and with each of 4 stages' partitions a guess set too: 20 looks share alpha
    stage = np.repeat([1, 2, 3, 4], 50)
    grouped = [abstaining_epsilon_lower_bound(rng.random(200), rng.random(200) < 0.5, groups=stage, seed=i)["epsilon"] > 0
               for i in range(600)]
    assert np.mean(grouped) <= 0.05 + 0.02


def test_abstaining_catches_a_leak_that_all_guesses_dilute():
    # a quarter of the canaries leak their label outright, the rest are coins: guessing all 200 shows
    # about 62% accuracy, too little against a claim of 1; guessing the confident quarter proves more
    rng = np.random.default_rng(4)
    caught, diluted = [], []
    for i in range(100):
        conf, right = _leaky(rng, 200, math.inf, 0.25)
        caught.append(abstaining_epsilon_lower_bound(conf, right, seed=i)["epsilon"] > 1.0)
        diluted.append(epsilon_lower_bound(int(right.sum()), 200) > 1.0)
    assert np.mean(caught) > 0.95 and np.mean(diluted) < 0.05
    best = abstaining_epsilon_lower_bound(np.r_[np.ones(50), np.zeros(150)], np.r_[np.ones(50), np.zeros(150)] > 0)
    assert best["guesses"] == 50 and best["correct"] == 50
    assert best["epsilon"] == pytest.approx(epsilon_lower_bound(50, 50, alpha=0.05 / 4))
    with pytest.raises(ValueError, match="finite confidences"):
        abstaining_epsilon_lower_bound([np.nan, 1.0], [True, False])


def test_a_stage_partition_is_a_declared_guess_set():
    # the final model of a staged method remembers its last partition and forgets the first: its
    # canaries are where the attack looks, and looking there must still keep the level
    rng = np.random.default_rng(5)
    stage = np.repeat([1, 2, 3], 100)
    over, caught = [], []
    for i in range(300):  # every canary at most 1-DP, the attacker's confidence highest on the leakiest
        conf, right = _leaky(rng, 300, 1.0, 0.4)
        over.append(abstaining_epsilon_lower_bound(conf, right, groups=stage, seed=i)["epsilon"] > 1.0)
    assert np.mean(over) <= 0.05 + 0.03
    for i in range(50):  # stage 3's labels leak outright (noise-free confidence), stages 1 and 2 are coins
        right = np.r_[rng.random(200) < 0.5, np.ones(100, bool)]
        conf = rng.random(300)
        best = abstaining_epsilon_lower_bound(conf, right, groups=stage, seed=i)
        caught.append(best["epsilon"] > 2.0 and best["group"] == 3)
    assert np.mean(caught) > 0.95
    with pytest.raises(ValueError, match="a group per guess"):
        abstaining_epsilon_lower_bound([1.0, 2.0], [True, False], groups=[1])


def test_audit_needs_the_embedded_task():
    with pytest.raises(ConfigError, match="audit.canaries needs data.source 'embedded'"):
        validate_job({"name": "j", "data": {"source": "x.jsonl"}, "eval": {"judge": "rm"},
                      "audit": {"canaries": 10}, "methods": [{"method": "rr"}]})


def _audit_job(tiny_job_raw, out, name, methods):
    raw = json.loads(json.dumps(tiny_job_raw))
    # canaries are most of the data and are seen many times: the strongest setting for the attack
    raw.update({"name": name, "output_dir": str(out / name), "stages": 1, "methods": methods,
                "data": {"num_pairs": 40, "eval_prompts": 8}, "audit": {"canaries": 200},
                "privacy": {"epsilons": [0.1]}, "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"}})
    raw["train"] = {**raw["train"], "epochs": 20, "lr": 0.02}
    return validate_job(raw)


@pytest.fixture(scope="module")
def audited(ray_local, tiny_job_raw, tmp_path_factory):
    import props_ray.data.ledger as ledger
    from props_ray.driver import Job

    out = tmp_path_factory.mktemp("audit")
    honest = _audit_job(tiny_job_raw, out, "audit", [{"method": "nonprivate"}, {"method": "rr"}])
    honest_results = {r.trial: r for r in Job(honest).run()}
    broken = _audit_job(tiny_job_raw, out, "audit-broken", [{"method": "rr", "name": "rr-unflipped"}])
    with pytest.MonkeyPatch.context() as mp:  # a broken mechanism: randomized response that flips nothing
        mp.setattr(ledger, "randomized_response_flips", lambda n, *a, **k: np.zeros(n, dtype=bool))
        broken_results = {r.trial: r for r in Job(broken).run()}
    return honest_results, broken_results


def test_audit_bounds_are_logged_and_the_broken_mechanism_is_caught(audited):
    honest, broken = audited
    bound = {name: r.extra["audit_epsilon_lower_bound"] for name, r in {**honest, **broken}.items()}
    acc = {name: r.extra["audit_accuracy"] for name, r in {**honest, **broken}.items()}
    print(f"\naudit (200 canaries, claimed epsilon 0.1): accuracy {acc}, epsilon lower bounds {bound}")
    assert all(r.extra["audit_canaries"] == 200 for r in {**honest, **broken}.values())
    assert bound["rr-eps0.1"] <= 0.1  # the honest mechanism keeps its claim
    assert bound["nonprivate"] > 0.1  # non-private training leaks more than the private claim
    assert bound["rr-unflipped-eps0.1"] > 0.1  # RR without flips claims 0.1 and is caught
