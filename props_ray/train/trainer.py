"""Ray Train glue: run the training loop over some stages with a ``TorchTrainer``."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

from props_ray.config import JobConfig
from props_ray.train.loop import METRICS, train_loop_per_worker


@dataclass
class StageCheckpoint:
    stage: int
    path: str  # checkpoint directory: model/ (adapter or full model), train_state.pt, metrics.jsonl
    metrics: dict
    epochs: list[dict] = field(default_factory=list)  # the reported metrics of every epoch of the stage

    @property
    def model_path(self) -> str:
        return str(Path(self.path) / "model")

    @property
    def metrics_path(self) -> Path:
        return Path(self.path) / METRICS


def run_name_for(prefix: str, out: str | Path) -> str:
    """The Ray Train run name of a command that writes ``out``: a hash of its resolved path, so a rerun
    with the same directory resumes the same run however the path was spelled (relative or absolute)."""
    import hashlib

    return f"{prefix}-{hashlib.sha256(str(Path(out).resolve()).encode()).hexdigest()[:8]}"


def run_training(cfg: JobConfig, run_name: str, loop: str, loop_config: dict, datasets: dict) -> list[tuple[str, dict]]:
    """Run the training loop ``loop`` ('train': :func:`train_loop_per_worker`, 'ppo': PPO's) as the
    order ``run_name``: in the job's shared worker group when one is open
    (:mod:`props_ray.train.worker_group`), else in a Ray Train run of its own, named ``run_name``,
    which resumes from its latest checkpoint if the job's storage has one. ``datasets`` maps a name
    to a Ray Dataset, split equally over the workers. Returns the (path, metrics) of every reported
    checkpoint, in order."""
    from props_ray.ppo.loop import ppo_loop_per_worker
    from props_ray.train import worker_group

    loop_fn = {"train": train_loop_per_worker, "ppo": ppo_loop_per_worker}[loop]
    loop_config = {**loop_config, "order": run_name}
    group = worker_group.active()
    if group is not None and group.serves(cfg):
        return group.run(loop_fn, loop_config, datasets)

    from ray.train import ScalingConfig
    from ray.train.torch import TorchTrainer

    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    trainer = worker_group.trainer_class(TorchTrainer)(
        loop_fn, train_loop_config={**loop_config,
                                    worker_group.SHARDS: worker_group.split_equally(datasets, cfg.train.num_workers)},
        scaling_config=ScalingConfig(num_workers=cfg.train.num_workers, use_gpu=cfg.train.use_gpu,
                                     resources_per_worker=resources),
        run_config=worker_group.run_config(cfg, run_name),
    )
    return [(ckpt.path, dict(metrics)) for ckpt, metrics in trainer.fit().best_checkpoints]


def fit_stages(cfg: JobConfig, *, run_name: str, trial: str, method: str, stages: list[int], datasets: dict,
               engine: str | None = None, objective: str = "dpo",
               base_path: str, init_adapter: str | None, loss: str, flip_rate: float | None,
               num_pairs: int, extra: dict | None = None) -> list[StageCheckpoint]:
    """Train ``stages`` in order as one training (:func:`run_training`); returns one checkpoint per stage.

    ``engine`` defaults to the method's (its config section's); ``objective`` is 'dpo' or 'bradley_terry'
    (:mod:`props_ray.train.objectives`). ``datasets`` maps stage -> Ray Dataset of tokenized pairs; workers get
    their shard of 'stage_K'. A training of the same name in the job's storage resumes from its latest
    checkpoint.
    """
    if engine is None:
        from props_ray.sections import section_of

        engine = section_of(method).engine
    loop_config = {"job": cfg.model_dump(mode="json"), "method": method, "engine": engine, "objective": objective,
                   "stages": stages, "loss": loss,
                   "flip_rate": flip_rate, "base_path": base_path, "init_adapter": init_adapter,
                   "num_pairs": num_pairs, "trial": trial, "job_dir": str(cfg.job_dir.resolve()),
                   "fail_at": os.environ.get("PROPS_RAY_FAIL_AT"), **(extra or {})}
    reported = run_training(cfg, run_name, "train", loop_config, {f"stage_{k}": datasets[k] for k in stages})
    out: dict[int, StageCheckpoint] = {}
    epochs: dict[int, list[dict]] = {}
    for path, metrics in reported:
        epochs.setdefault(int(metrics["stage"]), []).append(dict(metrics))
        if metrics.get("stage_done"):
            out[int(metrics["stage"])] = StageCheckpoint(int(metrics["stage"]), path, dict(metrics))
    for k, ck in out.items():
        ck.epochs = sorted(epochs[k], key=lambda m: m["epoch"])
    missing = [k for k in stages if k not in out]
    if missing:
        raise RuntimeError(f"training run {run_name} finished without a checkpoint for stage(s) {missing}")
    return [out[k] for k in stages]


def fit_reward_model(cfg, pairs, base_path: str, *, name: str, epsilon: float | None = None,
                     total_pairs: int | None = None):
    """Train the reward model (:mod:`props_ray.reward_model`) on ``pairs`` ({id, prompt, chosen, rejected})
    with Ray Train, as one stage.

    With ``epsilon``: DP-SGD through the project's engine, the pair as the privacy unit, noise calibrated
    to (epsilon, delta) with ``cfg.privacy.dpsgd``'s settings (delta from ``total_pairs``, the dataset's
    size, default ``len(pairs)``); the checkpoint carries the accountant. Returns the stage's :class:`StageCheckpoint` (the adapter and head are its ``model_path``).
    """
    from props_ray.data.tokenize_step import to_training_dataset

    ds = to_training_dataset(pairs, cfg.model.tokenizer or base_path, cfg.data.max_prompt_length,
                             cfg.data.max_response_length)
    return fit_stages(cfg, run_name=name, trial=name, method="reward_model",
                      engine="dpsgd" if epsilon is not None else "standard", objective="bradley_terry", stages=[1],
                      datasets={1: ds}, base_path=base_path, init_adapter=None, loss="sigmoid", flip_rate=None,
                      num_pairs=len(pairs), extra={"epsilon": epsilon, "total_pairs": total_pairs or len(pairs)})[0]


def fit_generator(cfg, prompts: list[str], base_path: str, *, name: str, epsilon: float | None = None,
                  compose_with: list | None = None, total_pairs: int | None = None) -> StageCheckpoint:
    """Fine-tune the synthetic-instruction generator (:mod:`props_ray.synthetic.generator`) on ``prompts``
    with Ray Train, as one stage: the reference plus a LoRA adapter, the next-token loss.

    With ``epsilon``: DP-SGD through the project's engine with the example (one prompt) as the unit, its
    noise calibrated on the stage's actual size so that it composed with the ``compose_with`` mechanisms
    (the histogram release) stays within ``epsilon``; delta from ``total_pairs``. The checkpoint carries
    the accountant.
    """
    from props_ray.modeling import load_tokenizer
    from props_ray.synthetic.generator import generator_rows
    from props_ray.train.worker_group import rows_dataset

    tok = load_tokenizer(cfg.model.tokenizer or base_path)
    ds = rows_dataset(generator_rows(tok, prompts, cfg.data.max_prompt_length), cfg.train.num_workers)
    return fit_stages(cfg, run_name=name, trial=name, method="generator",
                      engine="dpsgd" if epsilon is not None else "standard", objective="language_model",
                      stages=[1], datasets={1: ds}, base_path=base_path, init_adapter=None, loss="sigmoid",
                      flip_rate=None, num_pairs=len(prompts),
                      extra={"epsilon": epsilon, "compose_with": compose_with,
                             "total_pairs": total_pairs or len(prompts)})[0]


#: PPO's settings (DP-RLHF's, arXiv 2310.16960, where it names them): a fixed KL coefficient, GAE,
#: the clipped surrogate, and the value loss weight; one PPO epoch per sampled batch.
PPO_DEFAULTS = {"lr": 1e-3, "beta": 0.05, "gamma": 1.0, "lam": 0.95, "clip": 0.2, "value_coef": 0.1,
                "temperature": 1.0, "max_new_tokens": 6, "fixed_length": True}


def fit_ppo(cfg: JobConfig, prompts: list[str], base_path: str, reward_model: str, *, name: str,
            epsilon: float | None = None, ppo: dict | None = None, total_pairs: int | None = None) -> StageCheckpoint:
    """PPO from the reference (``base_path``) on ``prompts`` against ``reward_model`` (an adapter directory
    of :func:`fit_reward_model`), on Ray Train workers; DP-PPO (per-prompt clipping, Poisson-sampled
    prompts, noise once per step, the accountant in every checkpoint) with ``epsilon``."""
    import numpy as np

    from props_ray.dpo.tokenize import encode_prompts
    from props_ray.modeling import load_tokenizer
    from props_ray.train.worker_group import rows_dataset

    tok = load_tokenizer(cfg.model.tokenizer or base_path)
    ids = encode_prompts(tok, prompts, cfg.data.max_prompt_length)
    width = max(len(x) for x in ids)
    rows = [{"prompt_ids": np.array(x + [tok.pad_token_id] * (width - len(x)), dtype=np.int64),
             "prompt_length": len(x)} for x in ids]
    loop_config = {"job": cfg.model_dump(mode="json"), "engine": "dpsgd" if epsilon is not None else "standard",
                   "ppo": {**PPO_DEFAULTS, **(ppo or {})}, "base_path": base_path, "reward_model": reward_model,
                   "num_pairs": len(prompts), "total_pairs": total_pairs or len(prompts), "epsilon": epsilon,
                   "trial": name,
                   "job_dir": str(cfg.job_dir.resolve()), "fail_at": os.environ.get("PROPS_RAY_FAIL_AT")}
    reported = run_training(cfg, name, "ppo", loop_config, {"prompts": rows_dataset(rows, cfg.train.num_workers)})
    path, metrics = next((p, m) for p, m in reversed(reported) if m.get("stage_done"))
    return StageCheckpoint(1, path, dict(metrics))
