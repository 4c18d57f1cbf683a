"""Batch inference: actors and model-caching tasks give the same outputs; the cache holds one model."""

import pytest

from props_ray import batch_inference
from props_ray.batch_inference import cached_instance, resolve_compute
from props_ray.config import ModelConfig
from props_ray.generation import generate


class _Model:
    built = 0

    def __init__(self, name: str):
        _Model.built += 1
        self.name = name


def test_the_process_cache_builds_once_and_keeps_only_the_latest_model():
    batch_inference._cached.clear()
    _Model.built = 0
    a = cached_instance(_Model, {"name": "a"})
    assert cached_instance(_Model, {"name": "a"}) is a and _Model.built == 1
    b = cached_instance(_Model, {"name": "b"})
    assert b.name == "b" and _Model.built == 2
    assert len(batch_inference._cached) == 1  # "a" was dropped before "b" loaded
    assert cached_instance(_Model, {"name": "a"}) is not a and _Model.built == 3


def test_compute_defaults_to_actors_on_gpu_and_tasks_on_cpu():
    assert resolve_compute("auto", use_gpu=True) == "actors"
    assert resolve_compute("auto", use_gpu=False) == "tasks"
    assert resolve_compute("actors", use_gpu=False) == "actors"
    with pytest.raises(ValueError, match="compute"):
        resolve_compute("threads", use_gpu=False)


@pytest.fixture(scope="module")
def generator_model(stage_adapter):
    base, adapter, task = stage_adapter
    return base, adapter, task.eval_prompts(40, 1)


def test_generations_are_the_same_with_actors_and_tasks_and_any_batching(ray_local, generator_model):
    base, adapter, prompts = generator_model
    runs = {}
    for compute, batch_size in [("actors", 16), ("tasks", 16), ("tasks", 7)]:
        runs[(compute, batch_size)] = generate(
            prompts, base_path=base, adapter_path=adapter, model_cfg=ModelConfig(), samples_per_prompt=2,
            max_new_tokens=6, temperature=1.0, seed=3, max_prompt_length=8, fixed_length=True,
            batch_size=batch_size, compute=compute)
    first = runs[("actors", 16)]
    assert len(first) == 80 and first["response"].str.len().gt(0).all()
    assert first["response"].nunique() > 10  # sampled, not one constant answer
    for key, out in runs.items():
        assert out["row"].tolist() == list(range(80)), key
        assert out["response"].tolist() == first["response"].tolist(), key


def test_generation_batches_default_by_model_and_follow_eval_batch_size():
    from props_ray.config import ConfigError, validate_job
    from props_ray.generation import batch_rows

    job = {"name": "j", "methods": [{"method": "rr"}]}
    assert batch_rows(validate_job(job)) == 256  # the embedded model: per-batch costs dominate
    assert batch_rows(validate_job({**job, "model": {"name": "EleutherAI/pythia-160m"}})) == 64
    assert batch_rows(validate_job({**job, "eval": {"batch_size": 12}})) == 12
    with pytest.raises(ConfigError, match=r"eval\.batch_size"):
        validate_job({**job, "eval": {"batch_size": 0}})
