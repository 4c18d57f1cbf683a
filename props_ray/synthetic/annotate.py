"""Annotating synthetic prompts: two responses from the reference per prompt (Ray Data batch inference),
labelled by the annotator: on the embedded task its simulated human labeller, on real data the job's
judge (the response it scores higher is chosen). The labels are of synthetic prompts, written by
annotators rather than by the users whose prompts are private."""

from __future__ import annotations

import numpy as np
import pandas as pd


def annotate(prompts: list[str], *, cfg, base_path: str, judge, seed: int) -> pd.DataFrame:
    """{id, prompt, chosen, rejected}, one pair per prompt whose two responses differ."""
    from props_ray.generation import batch_rows, generate

    gens = generate(prompts, base_path=base_path, adapter_path=None, model_cfg=cfg.model, samples_per_prompt=2,
                    max_new_tokens=cfg.eval.max_new_tokens or cfg.task.response_length, temperature=1.0,
                    seed=seed, max_prompt_length=cfg.data.max_prompt_length, fixed_length=cfg.is_embedded,
                    use_gpu=cfg.train.use_gpu, batch_size=batch_rows(cfg))
    a, b = gens["response"].to_numpy()[0::2], gens["response"].to_numpy()[1::2]
    if cfg.is_embedded:
        from props_ray.reference import embedded_task

        a_wins = embedded_task(cfg).simulate_preferences(prompts, a, b, np.random.default_rng([seed, 0xA770]))
    else:
        scores = np.asarray(judge.score(gens))
        a_wins = scores[0::2] > scores[1::2]
    pairs = pd.DataFrame({"id": [f"synthetic-{i:06d}" for i in range(len(prompts))], "prompt": prompts,
                          "chosen": np.where(a_wins, a, b), "rejected": np.where(a_wins, b, a)})
    return pairs[pairs["chosen"] != pairs["rejected"]].reset_index(drop=True)
