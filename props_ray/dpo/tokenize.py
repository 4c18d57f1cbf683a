"""Tokenizing preference pairs into fixed-length training arrays.

Each pair becomes two sequences, ``prompt + chosen + eos`` and
``prompt + rejected + eos``, right-padded to ``max_prompt_length +
max_response_length``. The prompt is truncated from the left (the end of a
dialogue matters most), a response from the right. ``*_loss_mask`` marks the
response tokens whose log-probabilities DPO sums.

Tokenization runs once per partition in a Ray Data ``map_batches`` step, off
the training hot path.
"""

from __future__ import annotations

import numpy as np

PAIR_TENSORS = ("chosen_input_ids", "chosen_attention_mask", "chosen_loss_mask",
                "rejected_input_ids", "rejected_attention_mask", "rejected_loss_mask")
#: What a training batch carries: the pair's tensors and its label confidence.
TRAIN_COLUMNS = (*PAIR_TENSORS, "confidence")


def join_response(prompt: str, response: str) -> str:
    """The response text as it continues the prompt (one separating space if neither has one)."""
    if not prompt or prompt[-1:].isspace() or response[:1].isspace():
        return response
    return " " + response


def encode_prompts(tokenizer, prompts, max_prompt_length: int) -> list[list[int]]:
    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    return [p[-max_prompt_length:] if max_prompt_length else [] for p in ids]


def tokenize_pairs(tokenizer, prompts, chosen, rejected, max_prompt_length: int,
                   max_response_length: int) -> dict[str, np.ndarray]:
    """Arrays of shape [n, max_prompt_length + max_response_length] for both responses."""
    length = max_prompt_length + max_response_length
    prompt_ids = encode_prompts(tokenizer, prompts, max_prompt_length)
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    out: dict[str, np.ndarray] = {}
    for side, responses in (("chosen", chosen), ("rejected", rejected)):
        texts = [join_response(p, r) for p, r in zip(prompts, responses)]
        resp_ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
        n = len(texts)
        input_ids = np.full((n, length), pad, dtype=np.int64)
        attention = np.zeros((n, length), dtype=np.int64)
        loss_mask = np.zeros((n, length), dtype=np.int64)
        for i, (p, r) in enumerate(zip(prompt_ids, resp_ids)):
            r = (list(r) + [eos])[:max_response_length]
            seq = list(p) + r
            input_ids[i, : len(seq)] = seq
            attention[i, : len(seq)] = 1
            loss_mask[i, len(p): len(seq)] = 1
        out[f"{side}_input_ids"] = input_ids
        out[f"{side}_attention_mask"] = attention
        out[f"{side}_loss_mask"] = loss_mask
    return out
