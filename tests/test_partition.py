"""Stage partitions and held-out prompts: disjoint, covering, per record."""

import pandas as pd
import pytest

from props_ray.data.partition import hold_out, split_partitions, stage_of
from props_ray.data.records import DataError

KEY = "ab" * 32


def _pairs(n, start=0):
    return pd.DataFrame({"id": [f"x{i:05d}" for i in range(start, start + n)],
                         "prompt": [f"p{i % 37}" for i in range(start, start + n)],
                         "chosen": ["a"] * n, "rejected": ["b"] * n})


def _stages(parts):
    return {i: k for k, p in enumerate(parts, start=1) for i in p["id"]}


def test_partitions_are_disjoint_covering_and_reproducible():
    pairs = _pairs(1001)
    parts = split_partitions(pairs, 3, KEY, seed=7)
    ids = [set(p["id"]) for p in parts]
    assert sum(len(s) for s in ids) == 1001
    assert set().union(*ids) == set(pairs["id"])
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    assert all(250 < len(s) < 420 for s in ids)  # binomial around 1001/3
    again = split_partitions(pairs.sample(frac=1, random_state=3), 3, KEY, seed=7)  # row order does not matter
    assert [list(p["id"]) for p in again] == [list(p["id"]) for p in parts]
    assert [set(p["id"]) for p in split_partitions(pairs, 3, KEY, seed=8)] != ids  # the seed re-partitions
    assert [set(p["id"]) for p in split_partitions(pairs, 3, "cd" * 32, seed=7)] != ids  # so does the key


def test_removing_or_adding_one_pair_moves_no_other_pair():
    """Add/remove adjacency: a neighbouring dataset changes one stage only (what parallel composition needs)."""
    pairs = _pairs(3000)
    before = _stages(split_partitions(pairs, 3, KEY, seed=0))
    for drop in (0, 1234, 2999):
        after = _stages(split_partitions(pairs.drop(index=drop), 3, KEY, seed=0))
        assert after == {i: k for i, k in before.items() if i != pairs["id"][drop]}
    added = _stages(split_partitions(pd.concat([pairs, _pairs(1, start=9000)]), 3, KEY, seed=0))
    assert {i: k for i, k in added.items() if i != "x09000"} == before


def test_stage_proportions_and_errors():
    ids = [f"id{i}" for i in range(40_000)]
    stage = stage_of(ids, 3, KEY, 0, [0.5, 0.25, 0.25])
    share = pd.Series(stage).value_counts(normalize=True).sort_index()
    assert share.tolist() == pytest.approx([0.5, 0.25, 0.25], abs=0.01)
    with pytest.raises(ValueError, match="proportions"):
        stage_of(ids, 2, KEY, 0, [1, -1])
    with pytest.raises(DataError, match="stages = 5 is more than the 3 training pairs"):
        split_partitions(_pairs(3), 5, KEY, seed=0)
    with pytest.raises(DataError, match="would be empty"):
        split_partitions(_pairs(3), 3, KEY, seed=0, proportions=[1, 1, 1e-9])


def test_hold_out_removes_every_pair_of_a_held_out_prompt():
    pairs = _pairs(370)
    train, prompts = hold_out(pairs, 5, KEY, seed=0)
    assert len(prompts) == 5
    assert not set(train["prompt"]) & set(prompts)
    assert len(train) == 370 - 5 * 10
    with pytest.raises(DataError, match="eval_prompts"):
        hold_out(pairs, 37, KEY, seed=0)


def test_hold_out_is_per_record():
    """Removing one pair changes the held-out status of at most one other prompt."""
    pairs = pd.DataFrame({"id": [f"x{i}" for i in range(2000)], "prompt": [f"prompt {i}" for i in range(2000)],
                          "chosen": ["a"] * 2000, "rejected": ["b"] * 2000})
    _, before = hold_out(pairs, 100, KEY, seed=0)
    for drop in range(0, 2000, 97):
        _, after = hold_out(pairs.drop(index=drop), 100, KEY, seed=0)
        assert len((set(before) ^ set(after)) - {f"prompt {drop}"}) <= 1
