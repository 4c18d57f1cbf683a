"""Ray Data batch inference with a model: an actor pool on GPUs, model-caching tasks on CPUs.

The model-holding callable classes (``StageScorer`` for the relabel,
``ResponseGenerator`` for evaluation, ``RewardModelScorer`` for a reward-model
judge) run over a Dataset with :func:`map_with_model`, in one of two ways:

- ``actors`` (the default with GPUs): ``ActorPoolStrategy(size=workers)``, a GPU
  each; every actor loads the model once and scores every batch it is given.
  Tasks would not do on GPUs: Ray ends a GPU task's worker process after each
  task (``max_calls=1``), so every batch would start a process and load the model.
- ``tasks`` (the default on CPUs): Ray Data tasks, at most ``workers`` at a time,
  on Ray's pooled worker processes, which outlive the task. The model is cached in
  the process (the latest one only, so memory stays bounded) and the libraries stay
  imported, so a job's later relabels and evaluations skip what an actor pays on
  every start: a new process that imports torch, transformers and peft and loads
  the model, about 6 s on a 2-core machine against well under 1 s warm
  (``props-ray bench --only relabel`` prints both).

Both give the same outputs: the scorer is deterministic and the generator seeds
every row by its index, not by its batch.
"""

from __future__ import annotations

import json

COMPUTE = ("auto", "actors", "tasks")

# (class, constructor kwargs as JSON) -> instance: the model this worker process holds.
_cached: dict[tuple[str, str], object] = {}


def cached_instance(cls, kwargs: dict):
    """The process's instance of ``cls(**kwargs)``, built on first use; a different model replaces it."""
    key = (f"{cls.__module__}.{cls.__qualname__}", json.dumps(kwargs, sort_keys=True, default=str))
    if key not in _cached:
        _cached.clear()  # one model per process: drop the previous one before loading the next
        _cached[key] = cls(**kwargs)
    return _cached[key]


def _call_cached(batch: dict, cls, kwargs: dict) -> dict:
    return cached_instance(cls, kwargs)(batch)


def resolve_compute(compute: str, use_gpu: bool) -> str:
    if compute not in COMPUTE:
        raise ValueError(f"compute must be one of {COMPUTE}, got {compute!r}")
    if compute == "auto":
        return "actors" if use_gpu else "tasks"
    return compute


def map_with_model(ds, cls, kwargs: dict, *, batch_size: int, workers: int = 1, use_gpu: bool = False,
                   compute: str = "auto"):
    """``ds.map_batches`` with a model-holding callable class ``cls(**kwargs)`` (numpy batches)."""
    import ray.data

    common = {"batch_size": batch_size, "batch_format": "numpy", "num_cpus": 1, "num_gpus": 1 if use_gpu else 0}
    if resolve_compute(compute, use_gpu) == "actors":
        return ds.map_batches(cls, compute=ray.data.ActorPoolStrategy(size=workers), fn_constructor_kwargs=kwargs,
                              **common)
    return ds.map_batches(_call_cached, compute=ray.data.TaskPoolStrategy(size=workers),
                          fn_kwargs={"cls": cls, "kwargs": kwargs}, **common)
