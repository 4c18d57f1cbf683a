"""Generating responses to held-out prompts, by Ray Data batch inference.

``ResponseGenerator`` is a callable class for ``Dataset.map_batches`` (run by
:func:`props_ray.batch_inference.map_with_model`): each actor, or each pooled
worker process on CPUs, loads the model once (the reference, or the reference plus a stage
adapter) and samples ``max_new_tokens`` tokens per prompt. Sampling is seeded
per row (:class:`props_ray.sampling.RowDraw`), so a generation does not depend on how Ray Data
batches the rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from props_ray.config import ModelConfig
from props_ray.sampling import RowDraw, sample_tokens


class ResponseGenerator:
    def __init__(self, base_path: str, adapter_path: str | None, model_cfg: dict, max_new_tokens: int,
                 temperature: float, seed: int, max_prompt_length: int, fixed_length: bool,
                 use_gpu: bool = False):
        from props_ray.modeling import build_policy, load_base_model, load_tokenizer

        torch.set_num_threads(1)
        cfg = ModelConfig.model_validate(model_cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        if adapter_path:
            self.model = build_policy(base_path, cfg, adapter_path=adapter_path, device=self.device, trainable=False)
        else:
            self.model = load_base_model(base_path, cfg, self.device)
        self.model.eval()
        self.tok = load_tokenizer(base_path)
        self.max_new_tokens = max_new_tokens
        self.temperature = temperature
        self.seed = seed
        self.max_prompt_length = max_prompt_length
        self.fixed_length = fixed_length

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        prompts = [str(p) for p in batch["prompt"]]
        rows = [int(r) for r in batch["row"]]
        # An empty prompt starts from eos alone: unconditional sampling (the synthetic-instruction generator).
        ids = [x[-self.max_prompt_length:] or [self.tok.eos_token_id]
               for x in self.tok(prompts, add_special_tokens=False)["input_ids"]]
        responses: list[str] = [""] * len(prompts)
        by_length: dict[int, list[int]] = {}
        for i, x in enumerate(ids):
            by_length.setdefault(len(x), []).append(i)
        for group in by_length.values():  # equal-length prompts: one batched forward, no padding
            x = torch.tensor([ids[i] for i in group], device=self.device)
            texts = self.tok.batch_decode(self._sample(x, [rows[i] for i in group]), skip_special_tokens=True)
            for i, text in zip(group, texts):
                responses[i] = text.strip()
        return {"prompt": batch["prompt"], "row": batch["row"], "response": np.array(responses, dtype=object)}

    def _sample(self, x: torch.Tensor, rows: list[int]) -> list[list[int]]:
        """Each row's draws come from its own stream (its index in the whole generation), so a row's
        sample does not depend on its batch; the eos that ends a response is not part of its text."""
        eos = self.tok.eos_token_id
        outs = sample_tokens(self.model, x, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                             eos_id=eos, fixed_length=self.fixed_length, draw=RowDraw(self.seed, rows))
        return [o[:-1] if o and o[-1] == eos else o for o in outs]


def batch_rows(cfg) -> int:
    """Rows per Ray Data batch for a job's evaluation and annotation (``eval.batch_size``): by default 256
    with the embedded model, whose batches cost mostly their fixed per-batch work, and 64 with a real
    model, whose KV cache grows with the batch."""
    return cfg.eval.batch_size or (256 if cfg.model.name == "embedded" else 64)


def generate(prompts: list[str], *, base_path: str, adapter_path: str | None, model_cfg: ModelConfig,
             samples_per_prompt: int, max_new_tokens: int, temperature: float, seed: int,
             max_prompt_length: int, fixed_length: bool, num_actors: int = 1, use_gpu: bool = False,
             batch_size: int = 64, compute: str = "auto") -> pd.DataFrame:
    """{prompt, row, response}: ``samples_per_prompt`` generations per prompt, rows in prompt order."""
    from props_ray.batch_inference import map_with_model
    from props_ray.train.worker_group import rows_dataset

    rows = [{"prompt": p, "row": i * samples_per_prompt + s}
            for i, p in enumerate(prompts) for s in range(samples_per_prompt)]
    kwargs = {"base_path": base_path, "adapter_path": adapter_path, "model_cfg": model_cfg.model_dump(),
              "max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed,
              "max_prompt_length": max_prompt_length, "fixed_length": fixed_length, "use_gpu": use_gpu}
    out = map_with_model(rows_dataset(rows, num_actors), ResponseGenerator, kwargs, batch_size=batch_size,
                         workers=num_actors, use_gpu=use_gpu, compute=compute).to_pandas()
    return out.sort_values("row").reset_index(drop=True)
