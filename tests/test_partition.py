import pandas as pd
import pytest

from props_ray.data.partition import hold_out, partition_sizes, split_partitions


def _pairs(n):
    return pd.DataFrame({"id": [f"x{i:04d}" for i in range(n)], "prompt": [f"p{i % 37}" for i in range(n)],
                         "chosen": ["a"] * n, "rejected": ["b"] * n})


def test_partitions_are_disjoint_covering_and_reproducible():
    pairs = _pairs(1001)
    parts = split_partitions(pairs, 3, seed=7)
    ids = [set(p["id"]) for p in parts]
    assert sum(len(s) for s in ids) == 1001
    assert set().union(*ids) == set(pairs["id"])
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    again = split_partitions(pairs.sample(frac=1, random_state=3), 3, seed=7)  # row order does not matter
    assert [list(p["id"]) for p in again] == [list(p["id"]) for p in parts]
    other = split_partitions(pairs, 3, seed=8)
    assert [set(p["id"]) for p in other] != ids


def test_partition_proportions():
    assert partition_sizes(100, [0.5, 0.25, 0.25], 3) == [50, 25, 25]
    assert sum(partition_sizes(101, [1, 1, 1], 3)) == 101
    with pytest.raises(ValueError, match="empty"):
        partition_sizes(2, None, 3)
    with pytest.raises(ValueError, match="proportions"):
        partition_sizes(10, [1, -1], 2)


def test_hold_out_removes_every_pair_of_a_held_out_prompt():
    pairs = _pairs(370)
    train, prompts = hold_out(pairs, 5, seed=0)
    assert len(prompts) == 5
    assert not set(train["prompt"]) & set(prompts)
    assert len(train) == 370 - 5 * 10
    with pytest.raises(ValueError, match="eval_prompts"):
        hold_out(pairs, 37, seed=0)
