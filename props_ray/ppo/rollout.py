"""On-policy rollouts in the training worker: sample responses from the current policy, right-padded.

Prompts of equal length are sampled in one batched forward with a KV cache (no left padding, so
positions are those of training). Each returned row is [prompt][response][padding]; the action mask
marks the response tokens (what PPO's log-probabilities, KL and advantages run over).
"""

from __future__ import annotations

import torch

from props_ray.sampling import sample_tokens


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
            out = sample_tokens(lm, x, max_new_tokens=max_new_tokens, temperature=temperature, eos_id=eos_id,
                                fixed_length=fixed_length,  # an eos is an action too: it ends the response
                                draw=lambda p: torch.multinomial(p.cpu(), 1, generator=generator).squeeze(1).tolist())
            for j, i in enumerate(rows):
                seq = prompts[i] + out[j]
                ids[i, :len(seq)] = torch.tensor(seq)
                att[i, :len(seq)] = 1
                act[i, length:len(seq)] = 1
    finally:
        lm.train(was_training)
    return ids.to(device), att.to(device), act.to(device)
