"""Ancestral sampling with a KV cache: the one token loop behind evaluation's generations
(:mod:`props_ray.generation`) and PPO's on-policy rollouts (:mod:`props_ray.ppo.rollout`).

The caller chooses how each step's tokens are drawn from the step's probabilities (``draw``): one
seeded generator per row for generations that must not depend on their batch, one generator for a
rollout batch.
"""

from __future__ import annotations

from typing import Callable

import torch


@torch.no_grad()
def sample_tokens(lm, x: torch.Tensor, *, max_new_tokens: int, temperature: float, eos_id: int | None,
                  fixed_length: bool, draw: Callable[[torch.Tensor], list[int]]) -> list[list[int]]:
    """Up to ``max_new_tokens`` tokens for each row of the equal-length prompts ``x``; a row ends with its
    eos token, which is kept (the caller decides whether it is an action or dropped). With
    ``fixed_length`` the eos is masked out, so every row gets exactly ``max_new_tokens``."""
    outs: list[list[int]] = [[] for _ in range(x.shape[0])]
    done = [False] * x.shape[0]
    past, inp = None, x
    for _ in range(max_new_tokens):
        res = lm(input_ids=inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[:, -1].float() / temperature
        if fixed_length and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        nxt = draw(torch.softmax(logits, -1))
        for i, t in enumerate(nxt):
            if not done[i]:
                outs[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
        inp = torch.tensor([[t] for t in nxt], device=x.device)
    return outs
