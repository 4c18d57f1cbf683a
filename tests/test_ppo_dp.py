"""DP-PPO's per-prompt clipping: the clipped sum of per-prompt gradients of the PPO loss (policy and
value, LoRA and the value head) equals a torch.func reference; clipping per token does not."""

import copy

import torch
from torch.func import functional_call, grad

from props_ray.dpsgd.engine import DPSGDEngine
from props_ray.ppo.advantages import gae, kl_penalized_rewards, ppo_loss
from props_ray.ppo.model import PolicyWithValue, token_logprobs

from conftest import tiny_lora_lm


def _model():
    return tiny_lora_lm(lambda lm: PolicyWithValue(lm, 32))


def _rollouts(rows=6, tokens=10):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 30, (rows, tokens), generator=g)
    mask = torch.zeros(rows, tokens, dtype=torch.float64)
    for r in range(rows):
        mask[r, 3:int(torch.randint(5, tokens + 1, (1,), generator=g))] = 1
    return ids, mask


def _loss_rows(model, ids, mask, old_logp, ref_logp, score):
    logits, values = model(ids)
    logp = token_logprobs(logits, ids)
    rewards = kl_penalized_rewards(old_logp, ref_logp, mask, score, beta=0.1)
    adv, ret = gae(rewards, values.detach() * 0 + 0.1, mask)
    return ppo_loss(logp, old_logp, adv, values, ret, mask)


def test_per_prompt_clipped_ppo_gradient_matches_torch_func():
    model = _model()
    ids, mask = _rollouts()
    with torch.no_grad():
        old = token_logprobs(model(ids)[0], ids)
    ref = old - 0.05
    score = torch.linspace(-1, 1, 6, dtype=torch.float64)
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}

    def one_prompt(p, i):
        call = lambda x: functional_call(model, p, (x,))  # noqa: E731
        return _loss_rows(call, ids[i:i + 1], mask[i:i + 1], old[i:i + 1], ref[i:i + 1], score[i:i + 1]).sum()

    want = [grad(one_prompt)(params, i) for i in range(6)]
    names = list(params)
    flat = torch.stack([torch.cat([g[n].reshape(-1) for n in names]) for g in want])
    norms = flat.norm(dim=1)
    c = 0.5 * float(norms.median())

    token_model = copy.deepcopy(model)
    engine = DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=c, expected_batch_size=6, epochs=1,
                         noise_multiplier=0.0, unit="row")
    trainable = [p for p in model.parameters() if p.requires_grad]
    wrapped, optimizer = engine.wrap(model, torch.optim.SGD(trainable, lr=0.0))
    optimizer.zero_grad()
    engine.backward(_loss_rows(wrapped, ids, mask, old, ref, score))
    by_name = {id(p): n for n, p in model.named_parameters()}
    got = {by_name[id(p)]: p.summed_grad for p in optimizer.params}
    factors = torch.clamp(c / norms, max=1.0)
    expect = (factors[:, None] * flat).sum(0)
    assert float((torch.cat([got[n].reshape(-1) for n in names]) - expect).norm() / expect.norm()) < 1e-6
    assert (norms > c).sum() >= 2 and any("value_head" in n for n in got)

    # control: a sample per token (each token's loss term clipped alone) is not per-prompt clipping
    tokens = []
    for i in range(6):
        for t in torch.nonzero(mask[i]).flatten().tolist():
            m = torch.zeros_like(mask[i:i + 1])
            m[0, t] = 1

            def one_token(p, i=i, m=m):
                call = lambda x: functional_call(token_model, p, (x,))  # noqa: E731
                return _loss_rows(call, ids[i:i + 1], mask[i:i + 1] * 0 + m, old[i:i + 1], ref[i:i + 1],
                                  score[i:i + 1]).sum()
            tokens.append(torch.cat([grad(one_token)(params)[n].reshape(-1) for n in names]))
    per_token = torch.stack(tokens)
    clipped = (torch.clamp(c / per_token.norm(dim=1), max=1.0)[:, None] * per_token).sum(0)
    assert float((clipped - expect).norm() / expect.norm()) > 1e-2
