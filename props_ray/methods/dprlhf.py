"""DP-RLHF (arXiv 2310.16960): a (DP) reward model, then (DP-)PPO against it.

The job's disjoint stage partitions split the data: the first ``reward_model_stages`` partitions are
the reward model's preference pairs (D2), the others give PPO its prompts (D3). The reference is the
job's SFT model (D1 is the reference's own warm-up). Two privacy models:

- ``central``: the reward model and PPO both train with DP-SGD at epsilon, on raw labels, with the
  record as the unit (a pair for the reward model, a prompt's rollout for PPO); the two parts are
  disjoint, so the whole is (max epsilon, max delta)-DP by parallel composition.
- ``label``: the reward model trains on the ledger's RR labels (epsilon-label-DP, post-processing),
  PPO without noise: under label-DP the prompts are not private, and PPO never reads a label.
"""

from __future__ import annotations

import pandas as pd

from props_ray import metrics as M
from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.sections import DPRLHFSection


def dprlhf(trial: Trial) -> dict:
    m: DPRLHFSection = trial.method
    central = m.privacy_model == "central"
    partitions = trial.raw_partitions() if central else trial.randomized_response_partitions()
    stages = sorted(partitions)
    preference_pairs = pd.concat([partitions[k] for k in stages[:m.reward_model_stages]], ignore_index=True)
    prompts = pd.concat([partitions[k] for k in stages[m.reward_model_stages:]], ignore_index=True)
    reward_model = trial.train_reward_model(1, preference_pairs, trial.epsilon if central else None,
                                            m.reward_model_lr)
    policy = trial.train_ppo(2, list(prompts["prompt"]), reward_model, trial.epsilon if central else None,
                             {"lr": m.ppo_lr, "beta": m.beta, "max_new_tokens": trial.cfg.eval.max_new_tokens
                              or trial.cfg.task.response_length, "fixed_length": trial.cfg.is_embedded})
    win, seconds = trial.evaluate(policy)
    extra = {}
    if central:  # each stage's accountant; the disjoint parts compose in parallel: the larger epsilon
        eps = [reward_model["metrics"]["epsilon"], policy["metrics"]["epsilon"]]
        extra = {M.EPSILON_SPENT: max(eps), "reward_model_epsilon": eps[0], "ppo_epsilon": eps[1],
                 M.DELTA: max(reward_model["metrics"]["delta"], policy["metrics"]["delta"])}
    return trial.outcome({1: preference_pairs, 2: prompts}, win, seconds, extra=extra)


METHOD = Method("dprlhf", DPRLHFSection, dprlhf,
                protects="central: every record, its reward-model pair or its PPO prompt ((epsilon, delta)-DP); "
                         "label: each preference label (epsilon-label-DP, local)")
