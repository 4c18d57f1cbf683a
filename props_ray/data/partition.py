"""Disjoint, per-record partitioning of preference pairs into K stages, and held-out prompts.

PROPS's guarantee rests on disjointness: every pair belongs to exactly one
stage partition, so its label passes randomized response once and is only
ever post-processed afterwards. DP-SGD's "epsilon = max over stages" rests on
more: under add/remove-one adjacency, a neighbouring dataset must change *one*
stage only. So a pair's stage is a function of its own id alone: a keyed hash
(HMAC-SHA256 with the ledger's partition key, and the job's seed) mapped to a
stage by the proportions. Adding or removing one pair moves no other pair.
Partition sizes are then binomial around the proportions, not exact.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from props_ray.data.records import DataError
from props_ray.privacy.randomness import keyed_uniform


def stage_of(ids, k: int, key: str, seed: int, proportions: list[float] | None = None) -> np.ndarray:
    """The stage (1..k) of each id: a keyed hash of the id alone, cut by the proportions."""
    if k <= 0:
        raise ValueError(f"stages must be > 0, got {k}")
    props = np.ones(k) if proportions is None else np.asarray(proportions, dtype=np.float64)
    if props.shape != (k,) or (props <= 0).any():
        raise ValueError(f"stage_proportions must be {k} positive numbers, got {proportions}")
    edges = np.cumsum(props) / props.sum()
    edges[-1] = 1.0
    u = keyed_uniform(key, ids, "stage", int(seed))
    return np.searchsorted(edges, u, side="right") + 1


def split_partitions(pairs: pd.DataFrame, k: int, key: str, seed: int,
                     proportions: list[float] | None = None) -> list[pd.DataFrame]:
    """K disjoint partitions covering ``pairs`` (each sorted by id); a pair's stage depends on its id,
    the key and the seed only. An empty partition is a :class:`DataError`, raised before anything is spent."""
    if k > len(pairs):
        raise DataError(f"stages = {k} is more than the {len(pairs)} training pairs: every stage needs pairs")
    ordered = pairs.sort_values("id", kind="stable").reset_index(drop=True)
    stage = stage_of(ordered["id"], k, key, seed, proportions)
    parts = [ordered[stage == s].reset_index(drop=True) for s in range(1, k + 1)]
    empty = [s for s, p in enumerate(parts, start=1) if p.empty]
    if empty:
        raise DataError(f"{len(pairs)} training pairs are too few for stages = {k} (proportions "
                        f"{proportions or 'equal'}): stage partition(s) {empty} would be empty")
    return parts


def hold_out(pairs: pd.DataFrame, n_eval: int, key: str, seed: int,
             exclude: set[str] | None = None) -> tuple[pd.DataFrame, list[str]]:
    """Set aside ``n_eval`` prompts as held-out evaluation prompts; every pair sharing one of them is
    removed from training, so the evaluation prompts are never trained on.

    ``exclude``: prompts never held out. The held-out prompts are the ``n_eval`` distinct prompts with the smallest keyed hash (the same key
    and seed as the stages): adding or removing one pair changes the status of at most one other prompt.
    """
    prompts = pd.unique(pairs["prompt"])
    if exclude:  # prompts that must stay in training (audit canaries)
        prompts = prompts[~pd.Series(prompts).isin(exclude).to_numpy()]
    if n_eval >= len(prompts):
        raise DataError(f"data.eval_prompts = {n_eval} leaves no training prompts "
                        f"(the data has {len(prompts)} distinct prompts)")
    rank = np.argsort(keyed_uniform(key, prompts, "eval-prompt", int(seed)), kind="stable")
    chosen = set(prompts[rank[:n_eval]].tolist())
    keep = ~pairs["prompt"].isin(chosen)
    return pairs[keep].reset_index(drop=True), sorted(chosen)
