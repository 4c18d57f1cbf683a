"""Seeded, disjoint partitioning of preference pairs into K stages.

PROPS's guarantee rests on disjointness: every pair belongs to exactly one
stage partition, so its label passes randomized response once and is only
ever post-processed afterwards.
"""

from __future__ import annotations

import numpy as np
import pandas as pd


def partition_sizes(n: int, proportions: list[float] | None, k: int) -> list[int]:
    """Sizes summing to n, as close as possible to the proportions (largest remainder)."""
    if k <= 0:
        raise ValueError(f"stages must be > 0, got {k}")
    props = np.ones(k) if proportions is None else np.asarray(proportions, dtype=np.float64)
    if props.shape != (k,) or (props <= 0).any():
        raise ValueError(f"stage_proportions must be {k} positive numbers, got {proportions}")
    exact = n * props / props.sum()
    sizes = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - sizes), kind="stable")[: n - sizes.sum()]:
        sizes[i] += 1
    if (sizes == 0).any():
        raise ValueError(f"{n} pairs are too few for {k} stages with proportions {props.tolist()}: "
                         f"a partition would be empty")
    return sizes.tolist()


def split_partitions(pairs: pd.DataFrame, k: int, seed: int,
                     proportions: list[float] | None = None) -> list[pd.DataFrame]:
    """K disjoint partitions covering ``pairs``; the same ids and seed give the same split,
    whatever the input row order."""
    ordered = pairs.sort_values("id", kind="stable").reset_index(drop=True)
    perm = np.random.default_rng([seed, 0x9A27]).permutation(len(ordered))
    bounds = np.cumsum([0, *partition_sizes(len(ordered), proportions, k)])
    return [ordered.iloc[perm[a:b]].reset_index(drop=True) for a, b in zip(bounds[:-1], bounds[1:])]


def hold_out(pairs: pd.DataFrame, n_eval: int, seed: int) -> tuple[pd.DataFrame, list[str]]:
    """Set aside pairs whose prompts become held-out evaluation prompts.

    Every pair sharing a held-out prompt is removed from training, so the
    evaluation prompts are never trained on.
    """
    prompts = np.array(sorted(pairs["prompt"].unique()))
    if n_eval >= len(prompts):
        raise ValueError(f"data.eval_prompts={n_eval} leaves no training prompts "
                         f"(the data has {len(prompts)} distinct prompts)")
    chosen = set(np.random.default_rng([seed, 0xE7A1]).choice(prompts, size=n_eval, replace=False).tolist())
    keep = ~pairs["prompt"].isin(chosen)
    return pairs[keep].reset_index(drop=True), sorted(chosen)
