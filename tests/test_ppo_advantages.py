"""PPO's per-token rewards, advantages and losses (props_ray.ppo.advantages): by hand, and row by row."""

import torch

from props_ray.ppo.advantages import gae, kl_penalized_rewards, last_action_index, ppo_loss


def _rollouts(rows=5, tokens=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.zeros(rows, tokens)
    for r in range(rows):
        start = int(torch.randint(1, 3, (1,), generator=g))
        end = int(torch.randint(start + 1, tokens + 1, (1,), generator=g))
        mask[r, start:end] = 1
    logp = -torch.rand(rows, tokens, generator=g, dtype=torch.float64)
    ref = -torch.rand(rows, tokens, generator=g, dtype=torch.float64)
    values = torch.randn(rows, tokens, generator=g, dtype=torch.float64)
    score = torch.randn(rows, generator=g, dtype=torch.float64)
    return logp, ref, values, score, mask.double()


def test_kl_term_is_zero_for_an_unchanged_policy():
    logp, _, _, score, mask = _rollouts()
    rewards = kl_penalized_rewards(logp, logp.clone(), mask, score, beta=0.3)
    last = last_action_index(mask)
    expected = torch.zeros_like(rewards)
    expected[torch.arange(5), last] = score
    assert torch.equal(rewards, expected)
    moved = kl_penalized_rewards(logp + 0.1 * mask, logp, mask, score, beta=0.3)
    assert torch.allclose((moved - expected)[mask > 0], torch.full_like(moved[mask > 0], -0.03))


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0, 0.0, 2.0]], dtype=torch.float64)
    values = torch.tensor([[9.0, 0.5, 0.25, 1.0]], dtype=torch.float64)
    mask = torch.tensor([[0, 1, 1, 1]], dtype=torch.float64)
    adv, ret = gae(rewards, values, mask, gamma=1.0, lam=1.0)  # lambda 1: returns are the reward-to-go
    assert torch.allclose(ret, torch.tensor([[0.0, 3.0, 2.0, 2.0]], dtype=torch.float64))
    assert torch.allclose(adv, torch.tensor([[0.0, 2.5, 1.75, 1.0]], dtype=torch.float64))
    adv0, _ = gae(rewards, values, mask, gamma=1.0, lam=0.0)  # lambda 0: one-step TD errors
    assert torch.allclose(adv0, torch.tensor([[0.0, 1.0 + 0.25 - 0.5, 0.0 + 1.0 - 0.25, 2.0 - 1.0]],
                                             dtype=torch.float64))


def test_perturbing_one_prompts_rollout_changes_no_other_row():
    logp, ref, values, score, mask = _rollouts(rows=6, seed=1)

    def everything(logp, ref, values, score):
        rewards = kl_penalized_rewards(logp, ref, mask, score, beta=0.1)
        adv, ret = gae(rewards, values, mask)
        loss = ppo_loss(logp + 0.05, logp, adv, values * 0.9, ret, mask)
        return adv, ret, loss

    before = everything(logp, ref, values, score)
    j = 3
    bumped = [x.clone() for x in (logp, ref, values, score)]
    for x in bumped:
        x[j] += 0.7
    after = everything(*bumped)
    others = [r for r in range(6) if r != j]
    for b, a in zip(before, after):
        assert torch.equal(b[others], a[others])
        assert not torch.equal(b[j], a[j])


def test_ppo_loss_clips_the_ratio():
    mask = torch.ones(1, 1, dtype=torch.float64)
    adv = torch.ones(1, 1, dtype=torch.float64)
    zero = torch.zeros(1, 1, dtype=torch.float64)
    # ratio e^0.5 > 1.2 with a positive advantage: the surrogate is capped at 1.2
    assert torch.allclose(ppo_loss(zero + 0.5, zero, adv, zero, zero, mask), torch.tensor([-1.2], dtype=torch.float64))
    # the value term: value_coef * (v - R)^2
    assert torch.allclose(ppo_loss(zero, zero, zero, zero + 2.0, zero, mask, value_coef=0.5),
                          torch.tensor([2.0], dtype=torch.float64))
