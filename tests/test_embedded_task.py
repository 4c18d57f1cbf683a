"""The embedded task's presets: the oracle stays exact on the hard preset, and the config fills it in."""

import itertools

import numpy as np
import pytest

from props_ray.config import ConfigError, JobConfig, TaskConfig, load_job
from props_ray.embedded.task import PRESETS, EmbeddedTask


def test_best_reward_is_the_brute_force_maximum():
    # a task small enough to score every response: 5 words, 4 slots, with interacting pairs
    task = EmbeddedTask(topics=3, content_words=5, response_length=4, interaction_weight=1.0)
    prompts = task.sample_prompts(3 * 40, np.random.default_rng(0))
    for topic in range(task.topics):
        prompt = next(p for p in prompts if task.topic_of(p) == topic)
        every = [" ".join(w) for w in itertools.product(task.content_names, repeat=task.response_length)]
        brute = max(task.rewards([prompt] * len(every), every))
        assert task.best_reward(topic) == pytest.approx(brute, abs=1e-12)


def test_word_order_matters_only_with_interaction():
    rng = np.random.default_rng(1)
    for lam, order_matters in ((0.0, False), (1.0, True)):
        task = EmbeddedTask(interaction_weight=lam, response_length=8)
        prompts, responses = task.sample_prompts(200, rng), task.sample_responses(200, rng)
        shuffled = [" ".join(rng.permutation(r.split())) for r in responses]
        moved = np.abs(task.rewards(prompts, responses) - task.rewards(prompts, shuffled)).max()
        assert (moved > 1e-9) == order_matters


def test_a_non_content_word_breaks_a_pair_and_scores_zero():
    task = EmbeddedTask(interaction_weight=1.0, response_length=3)
    prompt = task.sample_prompts(1, np.random.default_rng(2))[0]
    t = task.topic_of(prompt)
    a, b, c = task.content_names[:3]
    W, B, s = task.word_scores[t], task.pair_scores, np.sqrt(2.0)
    assert task.reward(prompt, f"{a} {b} {c}") == pytest.approx(((W[0] + W[1] + W[2]) / 3 + (B[0, 1] + B[1, 2]) / 2) / s)
    assert task.reward(prompt, f"{a} today {c}") == pytest.approx(((W[0] + W[2]) / 3) / s)


def test_hard_preset_is_larger_and_the_standard_vocabulary_is_unchanged():
    std, hard = EmbeddedTask(), EmbeddedTask.preset("hard")
    assert (hard.topics, hard.content_words, hard.response_length) == (24, 64, 10)
    assert hard.vocabulary[: 3 + 8] == std.vocabulary[: 3 + 8]  # specials and the first topics keep their ids
    assert len(hard.vocabulary) == len(std.vocabulary) + 16 + 32
    assert hard.fingerprint() != std.fingerprint()
    prompts = hard.sample_prompts(5000, np.random.default_rng(3), mix="skewed")
    assert {hard.topic_of(p) for p in prompts} == set(range(24))
    assert hard.topic_mixture(prompts).shape == (24,)
    assert all(hard.parse_topic(p) == hard.topic_of(p) for p in prompts[:100])


def test_config_preset_fills_what_is_not_given(tmp_path):
    assert TaskConfig(preset="hard").response_length == PRESETS["hard"]["response_length"]
    assert TaskConfig(preset="hard", response_length=8).response_length == 8
    assert TaskConfig().interaction_weight == 0.0
    cfg = JobConfig.model_validate({"name": "x", "methods": [{"method": "rr"}], "task": {"preset": "hard"}})
    assert cfg.data.max_response_length == 11  # room for 10 words and eos
    job = tmp_path / "job.yaml"
    job.write_text("name: x\nmethods: [{method: rr}]\n")
    assert load_job(job, ["task.preset=hard"]).data.max_response_length == 11
    with pytest.raises(ConfigError, match="data.max_response_length 8"):
        load_job(job, ["task.preset=hard", "data.max_response_length=8"])
    with pytest.raises(ConfigError, match="task.preset"):
        load_job(job, ["task.preset=harder"])


def test_the_reference_is_the_same_whatever_the_threads_of_the_process_that_builds_it(tmp_path):
    """The embedded reference's SFT runs on a fixed number of intra-op threads, so a machine with more
    or fewer cores builds the weights the README's figures were measured with. Unpinned, 1 and 2
    threads give different weights (a sum split over threads rounds differently)."""
    import hashlib

    import torch

    from props_ray import reference

    cfg = JobConfig.model_validate({"name": "threads", "output_dir": str(tmp_path),
                                    "model": {"sft": {"steps": 12, "examples": 256}}, "methods": [{"method": "rr"}]})
    before = torch.get_num_threads()
    built = {}
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            path = tmp_path / f"ref-{threads}"
            reference.build_embedded_reference(cfg, path)
            assert torch.get_num_threads() == threads  # the process's own setting comes back
            built[threads] = hashlib.sha256((path / "model.safetensors").read_bytes()).hexdigest()
    finally:
        torch.set_num_threads(before)
    assert built[1] == built[2] == built[3]
