"""Per-token rewards with a KL penalty to the reference, and generalised advantage estimates, per row.

Tensors are [rows, tokens]; ``mask`` is 1 on the response tokens whose log-probabilities are taken
(the action tokens), 0 on the prompt and padding. Row r's outputs depend on row r's inputs only.
"""

from __future__ import annotations

import torch


def kl_penalized_rewards(logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, score: torch.Tensor,
                         beta: float) -> torch.Tensor:
    """r_t = -beta (log pi(a_t) - log pi_ref(a_t)) on every action token, plus the reward model's ``score``
    on the row's last action token. A fixed beta: no adaptive controller reads the batch's KL."""
    mask = mask.to(logp.dtype)
    rewards = -beta * (logp - ref_logp) * mask
    last = last_action_index(mask)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += score.to(rewards.dtype) * (mask.sum(1) > 0)
    return rewards


def last_action_index(mask: torch.Tensor) -> torch.Tensor:
    """The column of each row's last action token (0 for a row without one)."""
    cols = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    return torch.where(mask > 0, cols, torch.zeros_like(cols)).max(dim=1).values


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantages, returns) per action token by GAE(gamma, lambda), within each row; the value after the
    last action is 0 (the episode ends). Not whitened: whitening would mix the batch's rows."""
    mask = mask.to(rewards.dtype)
    n, t = rewards.shape
    adv = torch.zeros_like(rewards)
    running = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros(n, dtype=rewards.dtype, device=rewards.device)
    for i in reversed(range(t)):
        m = mask[:, i]
        delta = rewards[:, i] + gamma * next_value - values[:, i]
        running = torch.where(m > 0, delta + gamma * lam * running, running)
        adv[:, i] = running * m
        next_value = torch.where(m > 0, values[:, i], next_value)
    return adv, (adv + values) * mask


def ppo_loss(logp: torch.Tensor, old_logp: torch.Tensor, advantages: torch.Tensor, values: torch.Tensor,
             returns: torch.Tensor, mask: torch.Tensor, clip: float = 0.2, value_coef: float = 0.1) -> torch.Tensor:
    """Per-row loss: the clipped surrogate plus ``value_coef`` times the squared value error, each averaged
    over the row's action tokens. One value per row (per prompt): what per-prompt clipping clips."""
    mask = mask.to(logp.dtype)
    count = mask.sum(1).clamp(min=1.0)
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * advantages, torch.clamp(ratio, 1 - clip, 1 + clip) * advantages)
    policy = -(surrogate * mask).sum(1) / count
    value = ((values - returns) ** 2 * mask).sum(1) / count
    return policy + value_coef * value
