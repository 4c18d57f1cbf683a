"""Ray Data step that turns pair records into the training loop's tensors."""

from __future__ import annotations

from functools import lru_cache

import numpy as np

from props_ray.dpo.tokenize import tokenize_pairs


@lru_cache(maxsize=4)
def _tokenizer(path: str):
    from props_ray.modeling import load_tokenizer

    return load_tokenizer(path)


def tokenize_batch(batch: dict, tokenizer_path: str, max_prompt_length: int, max_response_length: int,
                   keep_id: bool) -> dict:
    """map_batches function: {id, prompt, chosen, rejected[, confidence]} -> tensors.

    The tokenizer is cached per worker process, so it loads once, not once per batch.
    """
    tok = _tokenizer(tokenizer_path)
    out = tokenize_pairs(tok, list(batch["prompt"]), list(batch["chosen"]), list(batch["rejected"]),
                         max_prompt_length, max_response_length)
    n = len(batch["prompt"])
    conf = batch.get("confidence")
    out["confidence"] = (np.ones(n, dtype=np.float32) if conf is None else np.asarray(conf, dtype=np.float32))
    if keep_id:
        out["id"] = np.asarray(batch["id"])
    return out


def to_training_dataset(pairs, tokenizer_path: str, max_prompt_length: int, max_response_length: int,
                        keep_id: bool = False):
    """A Ray Dataset of tokenized pairs from a pandas DataFrame."""
    import ray.data

    ds = ray.data.from_pandas(pairs.reset_index(drop=True))
    return ds.map_batches(tokenize_batch, batch_size=256, batch_format="numpy",
                          fn_kwargs={"tokenizer_path": tokenizer_path, "max_prompt_length": max_prompt_length,
                                     "max_response_length": max_response_length, "keep_id": keep_id})
