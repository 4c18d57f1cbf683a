"""Judges: the oracle reward, and a Hugging Face reward model scored through Ray Data."""

import numpy as np
import pandas as pd
import torch

from props_ray.embedded.task import EmbeddedTask
from props_ray.judge import OracleJudge, RewardModelJudge, RewardModelScorer
from props_ray.win_rate import label_accuracy, win_rate


def test_oracle_judge_is_the_task_reward():
    task = EmbeddedTask()
    gens = pd.DataFrame({"prompt": ["a garden answer:"] * 2, "response": ["red blue", "gold gold"], "row": [0, 1]})
    np.testing.assert_allclose(OracleJudge(task).score(gens),
                               [task.reward("garden", "red blue"), task.reward("garden", "gold gold")])


def test_reward_model_judge_through_ray_data(ray_local, tmp_path):
    from transformers import GPTNeoXConfig, GPTNeoXForSequenceClassification

    from props_ray.embedded.model import build_tokenizer

    tok = build_tokenizer(EmbeddedTask())
    torch.manual_seed(0)
    cfg = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                        intermediate_size=64, num_labels=1, pad_token_id=0)
    GPTNeoXForSequenceClassification(cfg).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    gens = pd.DataFrame({"prompt": ["a garden answer:", "the ocean answer:", "me city answer:"],
                         "response": ["red blue", "gold", "salt sun rain"], "row": [2, 0, 1]})
    scores = RewardModelJudge(str(tmp_path)).score(gens)
    direct = RewardModelScorer(str(tmp_path))({k: gens[k].to_numpy() for k in gens.columns})
    np.testing.assert_allclose(scores, direct["score"], rtol=1e-5)  # aligned by row, not by Ray's order
    assert np.unique(scores).size == 3


def test_win_rate_counts_ties_as_half_and_has_a_ci():
    w = win_rate([1, 2, 3, 0], [0, 2, 4, 0])
    assert (w.wins, w.ties, w.losses) == (1, 2, 1)
    assert w.win_rate == 0.5 and w.ci_low < 0.5 < w.ci_high
    many = win_rate(np.ones(400), np.zeros(400))
    assert many.win_rate == 1.0 and many.ci_low == 1.0


def test_label_accuracy_matches_by_id():
    truth = pd.DataFrame({"id": ["a", "b", "c", "d"], "chosen": ["x", "y", "z", "w"]})
    final = pd.DataFrame({"id": ["d", "c", "b", "a"], "chosen": ["w", "q", "y", "x"]})
    assert label_accuracy(final, truth) == 0.75
