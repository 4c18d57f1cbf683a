"""PPO on real Ray Train workers against a reward model trained on the embedded task's labels:
non-private PPO raises the oracle reward of the policy's generations over the reference's; DP-PPO
spends what Opacus's accountant says for its logged (sigma, q, T, delta), also across a worker failure."""

import os

import numpy as np
import pytest


@pytest.fixture(scope="module")
def setup(ray_local, tmp_path_factory):
    from props_ray.config import validate_job
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.reference import resolve_reference
    from props_ray.train.trainer import fit_reward_model

    out = tmp_path_factory.mktemp("ppo")
    cfg = validate_job({"name": "ppo", "output_dir": str(out), "methods": [{"method": "dpsgd"}],
                        "train": {"num_workers": 2, "batch_size": 32, "epochs": 3, "lr": 0.005, "log_every": 4,
                                  "max_failures": 1},
                        "privacy": {"dpsgd": {"max_grad_norm": 1.0}}})
    base = resolve_reference(cfg)
    task = EmbeddedTask()
    rm_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 4})})
    reward_model = fit_reward_model(rm_cfg, task.preference_pairs(1500, seed=11), base, name="rm").model_path
    return cfg, base, task, reward_model


def _mean_oracle_reward(cfg, base, task, adapter):
    from props_ray.generation import generate

    prompts = task.sample_prompts(200, np.random.default_rng(77))
    gens = generate(prompts, base_path=base, adapter_path=adapter, model_cfg=cfg.model, samples_per_prompt=1,
                    max_new_tokens=task.response_length, temperature=1.0, seed=1, max_prompt_length=8,
                    fixed_length=True)
    return float(task.rewards(gens["prompt"], gens["response"]).mean())


def test_nonprivate_ppo_raises_the_oracle_reward(setup):
    from props_ray.train.trainer import fit_ppo

    cfg, base, task, reward_model = setup
    prompts = task.sample_prompts(512, np.random.default_rng(3))
    final = fit_ppo(cfg, prompts, base, reward_model, name="ppo-plain", ppo={"lr": 0.003})
    before, after = (_mean_oracle_reward(cfg, base, task, a) for a in (None, final.model_path))
    print(f"PPO: mean oracle reward of 200 held-out generations {before:.3f} (reference) -> {after:.3f}")
    assert after - before > 0.3  # the reward's scale: about +-1 for a response of mostly good or bad words


def test_dp_ppo_spends_what_opacus_accounts_across_a_worker_failure(setup, monkeypatch):
    from props_ray.privacy.accounting import epsilon_after
    from props_ray.train.trainer import fit_ppo

    cfg, base, task, reward_model = setup
    prompts = task.sample_prompts(256, np.random.default_rng(4))
    monkeypatch.setenv("PROPS_RAY_FAIL_AT", "1:10")  # in the second epoch (8 steps an epoch), once
    final = fit_ppo(cfg, prompts, base, reward_model, name="ppo-dp", epsilon=2.0, ppo={"lr": 0.003})
    assert list(cfg.job_dir.resolve().glob(".fault-injected-stage1-step10")), "the worker failure did not happen"
    m = final.metrics
    assert m["steps"] == m["planned_steps"] == 24 and m["replicas_in_sync"] == 1
    assert m["delta"] == pytest.approx(256 ** -1.1)
    assert m["epsilon"] == pytest.approx(epsilon_after(m["steps"], m["sample_rate"], m["noise_multiplier"],
                                                       m["delta"], "prv"))
    assert 0.99 * 2.0 <= m["epsilon"] <= 2.0
    assert "reward" not in m  # DP-PPO's batch statistics are not noised, so never reported
    assert os.path.exists(os.path.join(final.path, "value_head.pt"))
