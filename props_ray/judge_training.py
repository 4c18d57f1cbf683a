"""``props-ray reward-model``: a judge for real data, trained on labelled pairs that are *not* the private
preference data (a public or held-out split), with the reward model of :mod:`props_ray.reward_model`.

The pairs are split once by a seeded hash of their id (:mod:`props_ray.data.split`): most train the Bradley--Terry model on Ray Train
(the same code path as DP-RLHF's reward model, without noise), the rest measure the judge's held-out
accuracy, the share of pairs whose chosen response it scores higher. The exported directory is what
``eval.judge`` loads. Training on the job's own preference data would put its raw labels into the
judge, so that is refused.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from props_ray.config import JobConfig
from props_ray.errors import UserError


def held_out_accuracy(judge_dir: str, pairs: pd.DataFrame, use_gpu: bool = False) -> float:
    """The share of ``pairs`` whose chosen response the judge scores above the rejected one."""
    from props_ray.judge import RewardModelJudge

    n = len(pairs)
    rows = pd.DataFrame({"prompt": [*pairs["prompt"], *pairs["prompt"]],
                         "response": [*pairs["chosen"], *pairs["rejected"]], "row": np.arange(2 * n)})
    scores = RewardModelJudge(judge_dir, use_gpu=use_gpu).score(rows)
    return float(np.mean(scores[:n] > scores[n:]))


def train_judge(cfg: JobConfig, source: str, out: str | Path, held_out: float = 0.1) -> dict:
    """Train the judge on ``source`` (a preference file or hub id, not the job's own data) with the job's
    model and training settings; export it to ``out`` with ``judge.json`` (its held-out accuracy)."""
    from props_ray.data.loaders import load_preferences
    from props_ray.data.split import refuse_private_source, split_pairs
    from props_ray.ray_runtime import ensure_ray
    from props_ray.reference import resolve_reference
    from props_ray.reward_model import export_reward_model
    from props_ray.train.trainer import fit_reward_model, run_name_for

    refuse_private_source(source, cfg.data.source, "reward-model", "a judge trained on it would carry its raw "
                          "labels. Give a public or held-out split")
    if not 0 < held_out < 1:
        raise UserError(f"reward-model: --held-out must be between 0 and 1, got {held_out}")
    loaded = load_preferences(source, "auto", on_bad_row=cfg.data.on_bad_row)
    train, test = split_pairs(loaded.pairs, held_out, cfg.seed, salt="judge")
    if len(train) < cfg.train.batch_size or len(test) == 0:
        raise UserError(f"reward-model: {source} has {len(loaded.pairs)} usable pairs: too few for a "
                        f"{held_out:.0%} held-out split and batches of {cfg.train.batch_size}")
    base = resolve_reference(cfg)
    t = time.time()
    ensure_ray(cfg.train.num_workers, cfg.train.cpus_per_worker)
    ck = fit_reward_model(cfg, train, base, name=run_name_for("judge", out))
    path = export_reward_model(base, cfg.model, ck.model_path, out)
    accuracy = held_out_accuracy(str(path), test, cfg.train.use_gpu)
    info = {"source": str(source), "base": base, "train_pairs": len(train), "held_out_pairs": len(test),
            "held_out_accuracy": accuracy, "skipped_rows": len(loaded.skipped), "seconds": round(time.time() - t, 1),
            "epochs": cfg.train.epochs, "privacy": "none: the judge is trained without noise on this split"}
    (Path(path) / "judge.json").write_text(json.dumps(info, indent=1))
    return info
