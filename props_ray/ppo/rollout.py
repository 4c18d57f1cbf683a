"""On-policy rollouts in the training worker: sample responses from the current policy, right-padded.

Prompts of equal length are sampled in one batched forward with a KV cache (no left padding, so
positions are those of training). Each returned row is [prompt][response][padding]; the action mask
marks the response tokens (what PPO's log-probabilities, KL and advantages run over).
"""

from __future__ import annotations

import torch


@torch.no_grad()
def sample_responses(lm, prompts: list[list[int]], *, max_new_tokens: int, temperature: float, eos_id: int | None,
                     pad_id: int, fixed_length: bool, generator: torch.Generator | None = None,
                     device="cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, action_mask), each [rows, max prompt length + max_new_tokens]."""
    n = len(prompts)
    width = max(len(p) for p in prompts) + max_new_tokens
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    att = torch.zeros((n, width), dtype=torch.long)
    act = torch.zeros((n, width), dtype=torch.long)
    groups: dict[int, list[int]] = {}
    for i, p in enumerate(prompts):
        groups.setdefault(len(p), []).append(i)
    was_training = lm.training
    lm.eval()
    try:
        for length, rows in groups.items():
            x = torch.tensor([prompts[i] for i in rows], device=device)
            out = _sample(lm, x, max_new_tokens, temperature, eos_id, fixed_length, generator)
            for j, i in enumerate(rows):
                seq = prompts[i] + out[j]
                ids[i, :len(seq)] = torch.tensor(seq)
                att[i, :len(seq)] = 1
                act[i, length:len(seq)] = 1
    finally:
        lm.train(was_training)
    return ids.to(device), att.to(device), act.to(device)


def _sample(lm, x, max_new_tokens, temperature, eos_id, fixed_length, generator) -> list[list[int]]:
    outs: list[list[int]] = [[] for _ in range(x.shape[0])]
    done = torch.zeros(x.shape[0], dtype=torch.bool)
    past, inp = None, x
    for _ in range(max_new_tokens):
        res = lm(input_ids=inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[:, -1].float() / temperature
        if fixed_length and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        nxt = torch.multinomial(torch.softmax(logits, -1).cpu(), 1, generator=generator).squeeze(1)
        for i, t in enumerate(nxt.tolist()):
            if not done[i]:
                outs[i].append(t)  # an eos is an action too: it ends the response
                done[i] = t == eos_id
        if bool(done.all()):
            break
        inp = nxt[:, None].to(x.device)
    return outs
