"""Randomized response: flip rates by a statistical test, and draws persisted once."""

import math

import numpy as np
import pandas as pd
import pytest
from scipy.stats import binomtest

from props_ray.data.privatize import PrivatizedLabelsError, privatize_partition, privatized_path
from props_ray.privacy.randomized_response import (flip_probability, randomized_response,
                                                   randomized_response_flips)


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_flip_rate_binomial(eps):
    n = 40_000
    flips = randomized_response_flips(n, eps, rng=np.random.default_rng(int(eps * 100)))
    gamma = 1 / (1 + math.exp(eps))
    assert binomtest(int(flips.sum()), n, gamma).pvalue > 1e-3
    # and it is not some other rate: a 10% relative error in gamma is rejected
    assert binomtest(int(flips.sum()), n, gamma * 1.1).pvalue < 1e-3


@pytest.mark.parametrize("eps", [0.1, 1.0, 3.0])
def test_secure_flip_rate_binomial(eps):
    n = 20_000
    flips = randomized_response_flips(n, eps, secure=True)
    assert binomtest(int(flips.sum()), n, flip_probability(eps)).pvalue > 1e-3


def test_flip_probability_values_and_errors():
    assert flip_probability(math.log(3)) == pytest.approx(0.25)
    assert flip_probability(0.5) == pytest.approx(0.3775406687981454)
    assert flip_probability(800.0) == pytest.approx(0.0, abs=1e-300)
    for bad in (0, -1, float("nan")):
        with pytest.raises(ValueError, match="epsilon"):
            flip_probability(bad)
    with pytest.raises(ValueError, match="seeded"):
        randomized_response_flips(3, 1.0)


def test_randomized_response_flips_labels():
    labels = np.zeros(10_000, dtype=np.int8)
    out = randomized_response(labels, 1.0, rng=np.random.default_rng(0))
    assert set(np.unique(out)) == {0, 1}
    assert binomtest(int(out.sum()), out.size, flip_probability(1.0)).pvalue > 1e-3
    with pytest.raises(ValueError):
        randomized_response(np.array([0, 2]), 1.0, rng=np.random.default_rng(0))


def _partition(n=500):
    return pd.DataFrame({"id": [f"p{i}" for i in range(n)], "prompt": ["q"] * n,
                         "chosen": [f"good {i}" for i in range(n)], "rejected": [f"bad {i}" for i in range(n)]})


@pytest.mark.parametrize("secure", [False, True])
def test_privatized_labels_are_persisted_and_never_redrawn(tmp_path, secure):
    part = _partition()
    first = privatize_partition(part, job_dir=tmp_path, seed=0, epsilon=0.5, stage=1, stages=3, secure=secure)
    assert not first.reused
    raw_bytes = first.path.read_bytes()
    # privatized orientation: some pairs swapped, never both responses the same
    flipped = (first.pairs["chosen"].str.startswith("bad")).mean()
    assert 0.3 < flipped < 0.45
    again = privatize_partition(part, job_dir=tmp_path, seed=0, epsilon=0.5, stage=1, stages=3, secure=secure)
    assert again.reused
    assert first.path.read_bytes() == raw_bytes  # byte-identical file, not rewritten
    pd.testing.assert_frame_equal(first.pairs.reset_index(drop=True), again.pairs.reset_index(drop=True))


def test_persisted_labels_for_other_pairs_are_refused(tmp_path):
    privatize_partition(_partition(), job_dir=tmp_path, seed=0, epsilon=0.5, stage=1, stages=3, secure=False)
    with pytest.raises(PrivatizedLabelsError, match="refusing to redraw"):
        privatize_partition(_partition(400), job_dir=tmp_path, seed=0, epsilon=0.5, stage=1, stages=3, secure=False)


def test_privatized_file_holds_no_raw_orientation(tmp_path):
    """The file's columns are the privatized pair only: no label or raw-order column."""
    import pyarrow.parquet as pq

    res = privatize_partition(_partition(), job_dir=tmp_path, seed=0, epsilon=0.5, stage=1, stages=3, secure=False)
    assert res.path == privatized_path(tmp_path, 0, 0.5, 1, 3)
    assert pq.read_schema(res.path).names == ["id", "prompt", "chosen", "rejected"]
