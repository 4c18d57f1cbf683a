"""Sequence log-probabilities of responses under a causal language model."""

from __future__ import annotations

import torch


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log p(token | prefix); one value per row."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = input_ids[:, 1:]
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * loss_mask[:, 1:].to(logp.dtype)).sum(-1)


def pair_logprobs(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the chosen and rejected responses of a batch of pairs, in one forward pass
    (rows 0..B-1 are the chosen sequences, rows B..2B-1 the rejected ones)."""
    n = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logps = sequence_logprobs(model, ids, att, mask)
    return logps[:n], logps[n:]
