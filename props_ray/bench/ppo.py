"""PPO rollout throughput: on-policy rollouts sampled in the training worker against the same rollouts
through Ray Data batch inference.

PPO must roll out with the current policy, which changes after every step. In the worker the policy is
already in memory: a step's rollouts are one batched, KV-cached sampling call
(:func:`props_ray.ppo.rollout.sample_responses`). Through Ray Data, each step has to hand the new policy
to the inference side (save the LoRA adapter; each task loads the reference plus that adapter) and
run ``map_batches`` over the step's prompts (:func:`props_ray.generation.generate`, the path evaluation
takes). Both sample the same number of tokens per prompt, with one torch thread per process, on the
same prompts; each figure is sequences per second over ``steps`` steps after one warm-up step, with the
adapter saved anew before every Ray Data step (the policy moved).
"""

from __future__ import annotations

import tempfile
import time

import torch

from props_ray.config import JobConfig


def measure(cfg: JobConfig, base_path: str, prompts: list[str], batch: int = 32, steps: int = 4,
            max_new_tokens: int = 6) -> dict:
    from props_ray.dpo.tokenize import encode_prompts
    from props_ray.generation import generate
    from props_ray.modeling import build_policy, load_tokenizer, save_policy
    from props_ray.ppo.rollout import sample_responses

    tok = load_tokenizer(cfg.model.tokenizer or base_path)
    batches = [prompts[i * batch:(i + 1) * batch] for i in range(steps + 1)]
    if len(batches[-1]) < batch:
        raise ValueError(f"the PPO bench needs {batch * (steps + 1)} prompts, got {len(prompts)}")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(cfg.seed)
    try:
        policy = build_policy(base_path, cfg.model)
        gen = torch.Generator().manual_seed(cfg.seed)
        worker = []
        for b in batches:
            t = time.perf_counter()
            sample_responses(policy, encode_prompts(tok, b, cfg.data.max_prompt_length),
                             max_new_tokens=max_new_tokens, temperature=1.0, eos_id=tok.eos_token_id,
                             pad_id=tok.pad_token_id, fixed_length=True, generator=gen)
            worker.append(time.perf_counter() - t)
    finally:
        torch.set_num_threads(threads)

    ray_data = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, b in enumerate(batches):
            t = time.perf_counter()
            save_policy(policy, f"{tmp}/step-{i}")  # the policy of this step, handed to Ray Data
            generate(b, base_path=base_path, adapter_path=f"{tmp}/step-{i}", model_cfg=cfg.model,
                     samples_per_prompt=1, max_new_tokens=max_new_tokens, temperature=1.0, seed=cfg.seed + i,
                     max_prompt_length=cfg.data.max_prompt_length, fixed_length=True, batch_size=batch)
            ray_data.append(time.perf_counter() - t)
    w, r = sum(worker[1:]), sum(ray_data[1:])
    return {"batch": batch, "steps": steps, "max_new_tokens": max_new_tokens,
            "worker_sequences_per_s": batch * steps / w, "ray_data_sequences_per_s": batch * steps / r,
            "ratio": r / w, "worker_step_s": w / steps, "ray_data_step_s": r / steps,
            "ray_data_first_step_s": ray_data[0]}
