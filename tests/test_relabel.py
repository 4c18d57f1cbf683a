"""Relabel through Ray Data batch inference equals direct scoring of the same pairs."""

import numpy as np
import pandas as pd
import pytest

from props_ray.config import ModelConfig
from props_ray.data.tokenize_step import to_training_dataset, tokenize_batch
from props_ray.relabel import StageScorer, apply_combination, score_partition


@pytest.fixture(scope="module")
def stage_model(stage_adapter):
    base, adapter, task = stage_adapter
    return base, adapter, task.preference_pairs(300, 5)


@pytest.mark.parametrize("compute", ["actors", "tasks"])
def test_ray_data_relabel_equals_direct_scoring(ray_local, stage_model, compute):
    base, adapter, pairs = stage_model
    ds = to_training_dataset(pairs, base, 8, 8, keep_id=True)
    via_ray = score_partition(ds, base_path=base, adapter_path=adapter, model_cfg=ModelConfig(), beta=0.1,
                              batch_size=64, compute=compute)
    direct_in = tokenize_batch({k: pairs[k].to_numpy() for k in pairs.columns}, base, 8, 8, keep_id=True)
    direct = StageScorer(base, adapter, ModelConfig().model_dump(), beta=0.1)(direct_in)
    got = via_ray.set_index("id").loc[direct["id"], "margin"].to_numpy()
    assert len(via_ray) == len(pairs)
    assert np.abs(direct["margin"]).max() > 1e-3  # the adapter matters
    np.testing.assert_allclose(got, direct["margin"], rtol=1e-5, atol=1e-6)


def test_apply_combination_orients_chosen_by_the_combined_label():
    priv = pd.DataFrame({"id": ["a", "b", "c"], "prompt": ["p"] * 3, "chosen": ["x1", "y1", "z1"],
                         "rejected": ["x2", "y2", "z2"]})
    margins = pd.DataFrame({"id": ["c", "a", "b"], "margin": [-5.0, 3.0, 2.0]})
    out, comb = apply_combination(priv, margins, epsilon=0.1, rule="mle")  # gamma_eps ~ 0.475: model trusted
    assert comb.disagreement == pytest.approx(1 / 3)
    assert out.set_index("id").loc["c", "chosen"] == "z2"
    assert out.set_index("id").loc["a", "chosen"] == "x1"
    assert (out["confidence"] > 0.99).all()  # gamma_M clamped to 0.001: the model's label is near-certain
    soft, _ = apply_combination(priv, margins, epsilon=0.1, rule="posterior")
    assert soft["confidence"].between(0.5, 1.0).all()
    assert soft.set_index("id").loc["c", "chosen"] == "z2"
    with pytest.raises(RuntimeError, match="no margin"):
        apply_combination(priv, margins.iloc[:2], epsilon=0.1, rule="mle")


def test_mle_confidence_is_the_posterior_of_the_oriented_label():
    # gamma_eps = 0.25; 3 of 10 disagree -> gamma_M = 0.1: the model wins where it disagrees
    ids = [f"p{i}" for i in range(10)]
    priv = pd.DataFrame({"id": ids, "prompt": ["p"] * 10, "chosen": [f"{i}a" for i in ids],
                         "rejected": [f"{i}b" for i in ids]})
    margins = pd.DataFrame({"id": ids, "margin": [1.0] * 7 + [-1.0] * 3})
    out, _ = apply_combination(priv, margins, epsilon=np.log(3), rule="mle")
    out = out.set_index("id").loc[ids]
    assert out["chosen"].tolist() == [f"{i}a" for i in ids[:7]] + [f"{i}b" for i in ids[7:]]
    # log-odds of the combined label: log 3 + log 9 where both agree, log 9 - log 3 where the model wins
    np.testing.assert_allclose(out["confidence"], [27 / 28] * 7 + [3 / 4] * 3, rtol=1e-6)
