"""Generator samples/s for DP synthetic instructions: unconditional sampling of prompts from the
reference plus a LoRA adapter through Ray Data batch inference (:func:`props_ray.synthetic.generator.sample_instructions`,
the path the method takes). Two calls on the same adapter: the first pays the pooled workers' start-up
and model load, the second is the steady rate (samples over its wall time)."""

from __future__ import annotations

import tempfile
import time

import torch

from props_ray.config import JobConfig


def measure(cfg: JobConfig, base_path: str, samples: int) -> dict:
    from props_ray.modeling import build_policy, save_policy
    from props_ray.synthetic.generator import sample_instructions

    with tempfile.TemporaryDirectory() as tmp:
        torch.manual_seed(cfg.seed)
        save_policy(build_policy(base_path, cfg.model), f"{tmp}/generator")
        walls = []
        for i in range(2):
            t = time.perf_counter()
            out = sample_instructions(samples, base_path=base_path, adapter_path=f"{tmp}/generator", cfg=cfg,
                                      seed=cfg.seed + i)
            walls.append(time.perf_counter() - t)
    return {"samples": samples, "first_call_s": walls[0], "steady_s": walls[1],
            "samples_per_s": samples / walls[1], "nonempty": sum(bool(s) for s in out)}
