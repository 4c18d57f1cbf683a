"""Generating responses to held-out prompts, by Ray Data batch inference.

``ResponseGenerator`` is a callable class for ``Dataset.map_batches``: each
actor loads the model once (the reference, or the reference plus a stage
adapter) and samples ``max_new_tokens`` tokens per prompt. Sampling is seeded
per row, so a generation does not depend on how Ray Data batches the rows.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from props_ray.config import ModelConfig


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
        responses = []
        for prompt, row in zip(batch["prompt"], batch["row"]):
            ids = self.tok(str(prompt), add_special_tokens=False)["input_ids"][-self.max_prompt_length:]
            x = torch.tensor([ids], device=self.device)
            g = torch.Generator(device=self.device).manual_seed(self.seed * 1_000_003 + int(row))
            out = self._sample(x, g)
            responses.append(self.tok.decode(out, skip_special_tokens=True).strip())
        return {"prompt": batch["prompt"], "row": batch["row"], "response": np.array(responses, dtype=object)}

    def _sample(self, x: torch.Tensor, g: torch.Generator) -> list[int]:
        """Ancestral sampling with a KV cache; the eos token is masked out when fixed_length."""
        eos = self.tok.eos_token_id
        out: list[int] = []
        past = None
        inp = x
        for _ in range(self.max_new_tokens):
            res = self.model(input_ids=inp, past_key_values=past, use_cache=True)
            past = res.past_key_values
            logits = res.logits[0, -1].float() / self.temperature
            if self.fixed_length and eos is not None:
                logits[eos] = float("-inf")
            nxt = int(torch.multinomial(torch.softmax(logits, -1), 1, generator=g))
            if nxt == eos:
                break
            out.append(nxt)
            inp = torch.tensor([[nxt]], device=self.device)
        return out


def generate(prompts: list[str], *, base_path: str, adapter_path: str | None, model_cfg: ModelConfig,
             samples_per_prompt: int, max_new_tokens: int, temperature: float, seed: int,
             max_prompt_length: int, fixed_length: bool, num_actors: int = 1, use_gpu: bool = False,
             batch_size: int = 64) -> pd.DataFrame:
    """{prompt, row, response}: ``samples_per_prompt`` generations per prompt, rows in prompt order."""
    import ray.data

    rows = [{"prompt": p, "row": i * samples_per_prompt + s}
            for i, p in enumerate(prompts) for s in range(samples_per_prompt)]
    ds = ray.data.from_items(rows)
    out = ds.map_batches(
        ResponseGenerator, batch_size=batch_size, batch_format="numpy",
        compute=ray.data.ActorPoolStrategy(size=num_actors), num_cpus=1, num_gpus=1 if use_gpu else 0,
        fn_constructor_kwargs={"base_path": base_path, "adapter_path": adapter_path,
                               "model_cfg": model_cfg.model_dump(), "max_new_tokens": max_new_tokens,
                               "temperature": temperature, "seed": seed, "max_prompt_length": max_prompt_length,
                               "fixed_length": fixed_length, "use_gpu": use_gpu}).to_pandas()
    return out.sort_values("row").reset_index(drop=True)
