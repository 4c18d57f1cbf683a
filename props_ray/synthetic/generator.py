"""The synthetic-instruction generator's examples and samples.

The generator is the reference with a LoRA adapter, fine-tuned as a language model on the private
prompts: each example is ``[eos] prompt [eos]``, the first eos standing in for a start token, and
the loss covers the prompt and its final eos. Sampling starts from eos alone (unconditional) and stops
at the next eos, through Ray Data batch inference (:func:`props_ray.generation.generate` with empty
prompts).
"""

from __future__ import annotations

import numpy as np

GENERATOR_COLUMNS = ("input_ids", "attention_mask", "loss_mask")


def generator_rows(tokenizer, prompts: list[str], max_prompt_length: int) -> list[dict]:
    """One training row per prompt, right-padded to ``max_prompt_length + 2`` tokens."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    width = max_prompt_length + 2
    rows = []
    for ids in tokenizer(list(prompts), add_special_tokens=False)["input_ids"]:
        seq = [eos, *ids[:max_prompt_length], eos]
        n = len(seq)
        rows.append({"input_ids": np.array(seq + [pad] * (width - n), dtype=np.int64),
                     "attention_mask": np.array([1] * n + [0] * (width - n), dtype=np.int64),
                     "loss_mask": np.array([0] + [1] * (n - 1) + [0] * (width - n), dtype=np.int64)})
    return rows


def sample_instructions(n: int, *, base_path: str, adapter_path: str, cfg, seed: int) -> list[str]:
    """``n`` unconditional samples of the generator (top-p is not used: plain ancestral sampling at
    temperature 1), in row order; an empty sample is kept as ''."""
    from props_ray.generation import generate

    out = generate([""] * n, base_path=base_path, adapter_path=adapter_path, model_cfg=cfg.model,
                   samples_per_prompt=1, max_new_tokens=cfg.data.max_prompt_length + 1, temperature=1.0,
                   seed=seed, max_prompt_length=cfg.data.max_prompt_length, fixed_length=False,
                   use_gpu=cfg.train.use_gpu, batch_size=256)
    return [str(r) for r in out["response"]]
