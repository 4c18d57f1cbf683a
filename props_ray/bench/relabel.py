"""Relabel throughput: the Ray Data actor-pool scorer against a plain single-process scoring loop,
and the start-up of the CPU path (model-caching tasks, see :mod:`props_ray.batch_inference`).

Both run the same ``StageScorer`` on the same tokenized pairs, with the same stage model (the embedded
reference plus a LoRA adapter), batch size and one torch thread, computing the
DPO implicit reward margin that PROPS's relabel step uses. The Ray Data figure
is per actor at steady state: pairs after the actor's first batch divided by
the time from the end of that batch to the end of its last, so it includes
Ray Data's hand-over between batches but not the actor's start-up, which is
reported separately (from the ``map_batches`` call to the first batch). The plain loop runs
just before and just after the actor pool, and its figure is the mean of the two, so a machine
that gets slower or faster during the measurement moves both sides alike. That does not remove the
spread between runs: on the 2-core machine the loop read 3,236 to 4,281 pairs/s from one run to the
next, while in each run its two figures agreed within 4%.

The CPU path that jobs take by default (Ray Data tasks on pooled worker
processes) is timed the same way, twice, each with a new stage model, as in a
job's successive relabels: the first start-up may pay a fresh process's imports,
the second finds them done and loads only the new adapter.
"""

from __future__ import annotations

import tempfile
import time

import numpy as np
import pandas as pd
import torch

from props_ray.config import JobConfig


def _steady(starts: np.ndarray, ends: np.ndarray, sizes: np.ndarray) -> float:
    """Pairs/s over the batches after the first, from their timestamps."""
    order = np.argsort(starts)
    starts, ends, sizes = starts[order], ends[order], sizes[order]
    if len(starts) < 2:
        raise ValueError("relabel throughput needs at least 2 batches per actor")
    return float(sizes[1:].sum() / (ends[-1] - ends[0]))


def _plain_loop(scorer, data: pd.DataFrame, batch_size: int) -> tuple[float, list]:
    """The same ``StageScorer`` called directly on the same batches in this process, with one torch
    thread as in its actor: (steady pairs/s, the margins of each batch)."""
    from props_ray.dpo.tokenize import PAIR_TENSORS

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        starts, ends, sizes, margins = [], [], [], []
        for i in range(0, len(data), batch_size):
            chunk = data.iloc[i:i + batch_size]
            s = time.time()
            batch = {"id": chunk["id"].to_numpy(), **{k: np.stack(chunk[k].to_numpy()) for k in PAIR_TENSORS}}
            margins.append(scorer(batch)["margin"])
            starts.append(s), ends.append(time.time()), sizes.append(len(chunk))
    finally:
        torch.set_num_threads(threads)
    return _steady(np.array(starts), np.array(ends), np.array(sizes)), margins


def measure(cfg: JobConfig, base_path: str, pairs: pd.DataFrame, batch_size: int = 128) -> dict:
    from props_ray.data.tokenize_step import to_training_dataset
    from props_ray.modeling import build_policy, save_policy
    from props_ray.relabel import StageScorer, score_partition

    with tempfile.TemporaryDirectory() as tmp:
        adapters = []
        for i in range(3):  # three stage models: the actor pool's, then one per task-path relabel
            torch.manual_seed(cfg.seed + i)
            adapters.append(f"{tmp}/adapter-{i}")
            save_policy(build_policy(base_path, cfg.model), adapters[-1])
        adapter = adapters[0]
        ds = to_training_dataset(pairs, base_path, cfg.data.max_prompt_length, cfg.data.max_response_length,
                                 keep_id=True).materialize()  # tokenization is not part of either figure

        threads = torch.get_num_threads()
        try:
            scorer = StageScorer(base_path, adapter, cfg.model.model_dump(), cfg.train.beta)  # sets 1 thread
        finally:
            torch.set_num_threads(threads)
        data = ds.to_pandas()
        loop_before, _ = _plain_loop(scorer, data, batch_size)

        # -- Ray Data actor pool (one actor, as in the pipeline) -------------------------
        t0 = time.time()
        scored = score_partition(ds, base_path=base_path, adapter_path=adapter, model_cfg=cfg.model,
                                 beta=cfg.train.beta, num_actors=1, batch_size=batch_size, timing=True,
                                 compute="actors")
        wall = time.time() - t0
        batches = scored.groupby("batch_start").agg(end=("batch_end", "first"), n=("id", "size")).reset_index()
        ray_rate = _steady(batches["batch_start"].to_numpy(), batches["end"].to_numpy(), batches["n"].to_numpy())
        first_batch = float(batches["batch_start"].min())

        # -- the plain loop again, right after ------------------------------------------
        loop_after, margins = _plain_loop(scorer, data, batch_size)
        loop_rate = (loop_before + loop_after) / 2
        # -- the CPU path: model-caching tasks, two successive relabels with new stage models --------
        tasks = []
        for path in adapters[1:]:
            t1 = time.time()
            out = score_partition(ds, base_path=base_path, adapter_path=path, model_cfg=cfg.model,
                                  beta=cfg.train.beta, num_actors=1, batch_size=batch_size, timing=True,
                                  compute="tasks")
            tasks.append({"startup_s": float(out["batch_start"].min()) - t1, "wall_s": time.time() - t1})
        # The two paths must agree on the scores, or the comparison is meaningless.
        loop_margin = pd.Series(np.concatenate(margins), index=data["id"].to_numpy())
        diff = float(np.abs(scored.set_index("id")["margin"] - loop_margin.reindex(scored["id"]).to_numpy()).max())
    return {"pairs": len(pairs), "batch_size": batch_size, "ray_data_pairs_per_s": ray_rate,
            "plain_loop_pairs_per_s": loop_rate, "ratio": ray_rate / loop_rate,
            "plain_loop_before_pairs_per_s": loop_before, "plain_loop_after_pairs_per_s": loop_after,
            "actor_startup_s": first_batch - t0,
            "actor_init_s": float(scored["actor_init_seconds"].iloc[0]), "ray_data_wall_s": wall,
            "max_margin_difference": diff, "tasks_startup_first_s": tasks[0]["startup_s"],
            "tasks_startup_next_s": tasks[1]["startup_s"], "tasks_wall_next_s": tasks[1]["wall_s"]}
