"""Sequence log-probabilities of responses under a causal language model.

Two layouts for a batch of B pairs:

- rows (:func:`sequence_logprobs`): one forward of 2B rows, the chosen sequences first.
- shared prompt (:func:`shared_prompt_logprobs`): one row per pair, ``prompt + chosen + rejected``,
  under an attention mask that keeps the two responses apart and restarts the rejected response's
  positions where the chosen one's began. The prompt runs once instead of twice: a quarter fewer
  tokens when prompt and response are equally long. The sums are the same as the rows layout's.

Both give DP-SGD per-pair gradient samples (:mod:`props_ray.dpsgd.grad_sample`): a model that keeps
``rows_per_pair`` is told which layout its forward runs.

In both, the forward stops at the batch's last real token and the LM head runs only where a response
token is predicted (``logits_to_keep``).
"""

from __future__ import annotations

import contextlib

import torch


def response_window(attention_mask: torch.Tensor, loss_mask: torch.Tensor) -> tuple[int, int]:
    """The columns a batch's forward needs: ``end`` past its last real token (right padding beyond it
    changes nothing before it in a causal model), and ``start``, its first response token. Only the
    logits that predict columns ``start .. end - 1`` are summed, so only those are projected."""
    used = attention_mask.any(0).nonzero()
    end = int(used.max()) + 1 if used.numel() else attention_mask.shape[1]
    response = loss_mask[:, :end].any(0).nonzero()
    start = max(int(response.min()) if response.numel() else end, 1)  # column 0 has no prefix
    return start, end


def _summed(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32
    logp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    return (logp * mask.to(logp.dtype)).sum(-1)


def sequence_logprobs(model, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                      loss_mask: torch.Tensor) -> torch.Tensor:
    """Sum over response tokens of log p(token | prefix); one value per row.

    The LM head and the log-softmax run only from the position before the first response token on:
    on 2 x 128-token pairs with 64-token prompts, half the positions, and the head is a third of the
    forward's FLOPs at the Pythia-160M size."""
    start, end = response_window(attention_mask, loss_mask)
    logits = model(input_ids=input_ids[:, :end], attention_mask=attention_mask[:, :end],
                   logits_to_keep=end - start + 1, use_cache=False).logits[:, :-1]
    return _summed(logits, input_ids[:, start:end], loss_mask[:, start:end])


def _unwrapped(model):
    return getattr(model, "module", model)  # DDP's (and Opacus's) wrapped module


@contextlib.contextmanager
def _one_row_per_pair(model):
    """Tells a per-pair gradient sampler (DP-SGD's), if the model is one, that this forward has one row
    per pair."""
    sampler = next((m for m in (model, _unwrapped(model)) if hasattr(m, "rows_per_pair")), None)
    if sampler is None:
        yield
        return
    before, sampler.rows_per_pair = sampler.rows_per_pair, 1
    try:
        yield
    finally:
        sampler.rows_per_pair = before


def _attention_implementation(model) -> str | None:
    return getattr(getattr(_unwrapped(model), "config", None), "_attn_implementation", None)


def shared_prefix(batch: dict[str, torch.Tensor]) -> tuple[int, int] | None:
    """The batch's :func:`response_window` ``(start, end)`` when the chosen and rejected rows of every
    pair agree on their first ``start`` columns (same tokens, all real), else None: the shared-prompt
    layout cannot be used."""
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    start, end = response_window(att, torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]]))
    ids_c, ids_r = batch["chosen_input_ids"][:, :start], batch["rejected_input_ids"][:, :start]
    if not torch.equal(ids_c, ids_r) or not bool(att[:, :start].all()):
        return None
    return start, end


def shared_prompt_logprobs(model, batch: dict[str, torch.Tensor], window: tuple[int, int]
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) log-probs from one row per pair: the shared columns ``0 .. c - 1``, then the
    chosen row's columns ``c .. end - 1``, then the rejected row's (``window`` = (c, end), from
    :func:`shared_prefix`). A response's tokens see the prefix and their own response only, at the
    positions they have in their own row."""
    c, end = window
    att_c, att_r = batch["chosen_attention_mask"], batch["rejected_attention_mask"]
    w = end - c
    ids_c, ids_r = batch["chosen_input_ids"], batch["rejected_input_ids"]
    ids = torch.cat([ids_c[:, :end], ids_r[:, c:end]], 1)
    keys = torch.cat([att_c[:, :end], att_r[:, c:end]], 1).bool()
    length = c + 2 * w
    col = torch.arange(length, device=ids.device)
    part = (col >= c).long() + (col >= c + w).long()  # 0 the prompt, 1 chosen, 2 rejected
    positions = torch.where(part == 2, col - w, col)
    visible = (col[None, :] <= col[:, None]) & ((part[None, :] == 0) | (part[None, :] == part[:, None]))
    # Every query sees the prefix (real tokens, c >= 1), so no row of the mask is empty.
    mask = (visible[None] & keys[:, None, :])[:, None]
    if _attention_implementation(model) == "eager":  # an additive mask; SDPA takes the boolean one
        dtype = next(p for p in model.parameters()).dtype
        mask = torch.zeros(mask.shape, dtype=dtype, device=ids.device).masked_fill(~mask, torch.finfo(dtype).min)
    with _one_row_per_pair(model):
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions[None].expand(ids.shape[0], -1),
                       logits_to_keep=length - c + 1, use_cache=False).logits  # positions c-1 .. length-1
    # The last prompt position predicts both responses' first token.
    chosen = _summed(logits[:, :w], ids_c[:, c:end], batch["chosen_loss_mask"][:, c:end])
    rejected = _summed(torch.cat([logits[:, :1], logits[:, w + 1:2 * w]], 1), ids_r[:, c:end],
                       batch["rejected_loss_mask"][:, c:end])
    return chosen, rejected


def pair_logprobs(model, batch: dict[str, torch.Tensor],
                  share_prompt: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-probs of the chosen and rejected responses of a batch of pairs, in one forward pass.

    ``share_prompt``: one row per pair when the pairs' rows share their prompt and the model's
    attention takes a custom mask (SDPA or eager); otherwise, and by default, 2B rows (rows 0..B-1
    the chosen sequences)."""
    if share_prompt:
        window = shared_prefix(batch) if _attention_implementation(model) in ("sdpa", "eager") else None
        if window:
            return shared_prompt_logprobs(model, batch, window)
    n = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logps = sequence_logprobs(model, ids, att, mask)
    return logps[:n], logps[n:]
