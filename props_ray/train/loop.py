"""The DPO training loop that runs on every Ray Train worker.

Read it top to bottom: set up the worker, build the model and its objective
(the policy and DPO against its reference, or the reward model and the
Bradley--Terry loss: :mod:`props_ray.train.objectives`), let the engine wrap
them (data-parallel, or DP-SGD), resume from a
checkpoint if Ray Train hands one back, then for each stage partition train
``epochs`` passes over this worker's shard and report one checkpoint per
stage. Metrics are kept in the checkpoint (``metrics.jsonl``) so the driver
logs them to MLflow; workers never talk to the tracking server.

The worker sees only tokenized pairs and their label confidence: the
privatized (or, for PROPS, post-processed) labels are already encoded in
which response is "chosen".
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import torch

from props_ray import progress
from props_ray.config import JobConfig
from props_ray.modeling import AUTOCAST_DTYPES, save_policy
from props_ray.train.objectives import build as build_objective
from props_ray.train.worker_group import checkpoint_to_resume, dataset_shard, note_reported

TRAIN_STATE = "train_state.pt"
METRICS = "metrics.jsonl"


def make_engine(cfg: JobConfig, engine: str, world_size: int, loop_config: dict):
    """'dpsgd' (Opacus, the objective's unit: a pair, or an example) or 'standard' (data-parallel: one
    all-reduce a step on CPUs, DDP on GPUs)."""
    if engine == "dpsgd":
        from props_ray.dpsgd.engine import DPSGDEngine
        from props_ray.train.objectives import UNITS

        unit, columns = UNITS[loop_config.get("objective", "dpo")]
        return DPSGDEngine.from_config(cfg, world_size, loop_config, unit=unit, columns=columns)
    from props_ray.train.engine import StandardEngine

    return StandardEngine(cfg.train.batch_size, world_size, cfg.train.max_grad_norm, cfg.seed)


def maybe_inject_fault(spec: str | None, stage: int, step: int, rank: int, world: int, marker_dir: Path) -> None:
    """Fault injection for tests and drills: ``spec`` = 'STAGE:STEP' (from the driver's
    PROPS_RAY_FAIL_AT) makes the last rank raise once at that point of the job; a marker file in
    the job directory makes it fire only once, so the retried worker group gets through."""
    if not spec:
        return
    s, t = (int(x) for x in spec.split(":"))
    marker = marker_dir / f".fault-injected-stage{s}-step{t}"
    if (s, t) == (stage, step) and rank == world - 1 and not marker.exists():
        marker.write_text("")
        raise RuntimeError(f"injected fault at stage {stage}, step {step} on rank {rank}")


def train_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    # -- set-up ---------------------------------------------------------------
    cfg = JobConfig.model_validate(loop_config["job"])
    stages: list[int] = loop_config["stages"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    autocast_dtype = AUTOCAST_DTYPES.get(cfg.model.dtype)
    use_autocast = autocast_dtype is not None and device.type == "cuda"

    # -- model, objective (DPO with its reference, or Bradley-Terry), optimizer ---
    resume = checkpoint_to_resume(loop_config)
    state: dict = {}
    adapter = loop_config.get("init_adapter")
    objective_name = loop_config.get("objective", "dpo")
    if resume is not None:
        with resume.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=False)
            adapter = str(Path(d) / "model")
            policy, objective = build_objective(objective_name, cfg, loop_config["base_path"], adapter, device,
                                                loop_config)
    else:
        policy, objective = build_objective(objective_name, cfg, loop_config["base_path"], adapter, device,
                                            loop_config)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    engine = make_engine(cfg, loop_config["engine"], world, loop_config)
    model, optimizer = engine.wrap(policy, optimizer, loop_config["num_pairs"])
    if state:
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state.get("engine", {}))
    done_stages: list[int] = state.get("done_stages", [])
    start_epoch: int = state.get("next_epoch", 0)
    history: list[dict] = state.get("history", [])
    step = state.get("step", 0)

    job_dir = Path(loop_config["job_dir"])
    seen = 0  # rows (pairs or prompts) this run has trained on, all ranks, for the console's rate and ETA
    total = (loop_config.get("num_pairs") or 0) * cfg.train.epochs
    # -- stages ---------------------------------------------------------------
    for stage in stages:
        if stage in done_stages:
            continue
        shard = dataset_shard(loop_config, f"stage_{stage}")
        if hasattr(engine, "start_stage"):  # DP-SGD: per-stage shard, sampling rate, step plan, accountant
            engine.start_stage(stage, shard, device)
        for epoch in range(start_epoch, cfg.train.epochs):
            t0 = time.time()
            for physical_batches in engine.logical_batches(shard, epoch, device):
                stats = torch.zeros(4, device=device)  # loss sum, correct, margin sum, pairs
                for batch in physical_batches:
                    # DPO's reference and policy in the same precision: an unchanged policy has margin 0.
                    with torch.autocast(device.type, dtype=autocast_dtype, enabled=use_autocast):
                        per_unit, margin = objective(model, batch)
                    engine.backward(per_unit)
                    seen += per_unit.shape[0] * world  # equal shards: every rank trains about as many
                    with torch.no_grad():
                        if margin is None:  # the language model: its loss only
                            margin = torch.zeros_like(per_unit)
                        stats += torch.stack([per_unit.sum(), (margin > 0).float().sum(),
                                              margin.sum(),
                                              torch.tensor(float(margin.numel()), device=device)])
                engine.step(model, optimizer)
                step += 1
                maybe_inject_fault(loop_config.get("fail_at"), stage, step, rank, world, job_dir)
                if step % cfg.train.log_every == 0:
                    if world > 1:
                        torch.distributed.all_reduce(stats)
                    n = max(stats[3].item(), 1.0)
                    row = {"stage": stage, "epoch": epoch, "step": step, **engine.metrics()}
                    if engine.logs_batch_statistics:
                        row["loss"] = stats[0].item() / n
                        if objective.has_margin:
                            row.update({"reward_accuracy": stats[1].item() / n, "margin": stats[2].item() / n})
                    history.append(row)
                    if rank == 0:
                        progress.step(loop_config["trial"], stage=stage, epoch=epoch, epochs=cfg.train.epochs,
                                      step=step, pairs=seen, total_pairs=total, loss=row.get("loss"),
                                      epsilon=row.get("epsilon"))
            # An epoch-end checkpoint lets a failed worker resume mid-stage.
            last_epoch = epoch == cfg.train.epochs - 1
            if last_epoch:
                done_stages.append(stage)
            _report(model, optimizer, engine, rank, stage, epoch, last_epoch, done_stages, history, step,
                    time.time() - t0, loop_config.get("order"))
        start_epoch = 0


def rank_param_spread(model, max_numel: int = 10_000_000) -> float | None:
    """Largest absolute difference of any trainable parameter between ranks (0.0 when data-parallel
    training keeps the replicas identical, as it must). Skipped (None) for large trainable sets."""
    if not torch.distributed.is_available() or not torch.distributed.is_initialized():
        return 0.0
    params = [p for p in model.parameters() if p.requires_grad]
    if sum(p.numel() for p in params) > max_numel:
        return None
    flat = torch.cat([p.detach().float().reshape(-1) for p in params])
    gathered = [torch.empty_like(flat) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(gathered, flat)
    return max((g - gathered[0]).abs().max().item() for g in gathered)


def _report(model, optimizer, engine, rank, stage, epoch, stage_done, done_stages, history, step, seconds, order):
    metrics = {"order": order, "stage": stage, "epoch": epoch, "stage_done": stage_done, "step": step,
               "epoch_seconds": seconds, "rank_param_spread": rank_param_spread(model), **engine.metrics()}
    if history:
        metrics.update({k: history[-1][k] for k in ("loss", "reward_accuracy", "margin") if k in history[-1]})

    def write(d: Path) -> None:
        save_policy(model, d / "model")
        torch.save({"optimizer": optimizer.state_dict(), "engine": engine.state_dict(),
                    "done_stages": list(done_stages), "next_epoch": 0 if stage_done else epoch + 1,
                    "stage": stage, "step": step, "history": history}, d / TRAIN_STATE)

    report_checkpoint(metrics, rank, write, history)


def report_checkpoint(metrics: dict, rank: int, write, history: list[dict]) -> None:
    """``ray.train.report`` on every worker; rank 0 attaches a checkpoint: what ``write(directory)``
    saves (model, optimizer and engine state, the accountant's with it) plus the history as metrics.jsonl."""
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            write(Path(tmp))
            with open(Path(tmp) / METRICS, "w") as f:
                for row in history:
                    f.write(json.dumps(row) + "\n")
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)
        if checkpoint is not None:
            note_reported(metrics)
