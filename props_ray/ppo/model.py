"""The DP-PPO model: one causal LM body (with LoRA) shared by the policy head and a scalar value head.

As in DP-RLHF (arXiv 2310.16960), policy and value are one model updated by one (DP) optimizer on
the policy loss plus the value loss, so one prompt's rollout contributes one gradient sample that
covers both (per-prompt clipping, :class:`~props_ray.dpsgd.grad_sample.RowGradSampleModule`).
"""

from __future__ import annotations

import torch


class PolicyWithValue(torch.nn.Module):
    """``forward(input_ids, attention_mask)`` -> (logits [rows, tokens, vocab], values [rows, tokens])."""

    def __init__(self, policy: torch.nn.Module, hidden_size: int):
        super().__init__()
        self.policy = policy
        self.value_head = torch.nn.Linear(hidden_size, 1)
        torch.nn.init.zeros_(self.value_head.weight)
        torch.nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None):
        out = self.policy(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
        values = self.value_head(out.hidden_states[-1]).squeeze(-1)
        return out.logits, values


def token_logprobs(logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """log pi(token t | tokens < t) at every position t >= 1 (position 0 gets 0): [rows, tokens]."""
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return torch.nn.functional.pad(logp, (1, 0))
