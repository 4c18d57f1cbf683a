"""The PPO loop that runs on every Ray Train worker (DP-PPO with the DP-SGD engine, or data-parallel PPO).

Read it top to bottom: build the policy-with-value model (one body, LoRA or full, a value head), its
frozen reference (the adapters disabled, or the base model) and the reward model; let the engine wrap
them; then for each logical step take a batch of this worker's prompts (Poisson-sampled by the DP
engine), roll out on-policy, score the rollouts with the reward model, turn them into per-token
KL-penalised rewards and per-row advantages, and take ONE PPO epoch over them (T_PPO = 1: each sampled
batch is used once, so the subsampled-Gaussian analysis applies). Every quantity is per row (per
prompt), so DP-SGD with ``unit="row"`` clips each prompt's combined policy and value gradient once.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from props_ray import progress
from props_ray.config import JobConfig
from props_ray.ppo.advantages import gae, kl_penalized_rewards, ppo_loss
from props_ray.ppo.model import PolicyWithValue, token_logprobs
from props_ray.ppo.rollout import sample_responses
from props_ray.train.loop import maybe_inject_fault, report_checkpoint
from props_ray.train.worker_group import checkpoint_to_resume, dataset_shard

PROMPT_COLUMNS = ("prompt_ids", "prompt_length")
TRAIN_STATE = "train_state.pt"
VALUE_HEAD = "value_head.pt"


def _unwrap(model):
    while not isinstance(model, PolicyWithValue):
        model = getattr(model, "module", None) or model._module
    return model


@torch.no_grad()
def _scores(reward_model, ids, att):
    return reward_model(input_ids=ids, attention_mask=att).logits[:, 0].float()


def ppo_loop_per_worker(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from props_ray.modeling import Reference, build_policy, load_tokenizer, save_policy
    from props_ray.reward_model import build_reward_model

    # -- set-up ---------------------------------------------------------------
    cfg = JobConfig.model_validate(loop_config["job"])
    ppo = loop_config["ppo"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    torch.manual_seed(cfg.seed + rank)
    device = ray.train.torch.get_device()
    base = loop_config["base_path"]
    tok = load_tokenizer(cfg.model.tokenizer or base)

    # -- policy with value, reference (adapters off, or the frozen base), reward model
    resume = checkpoint_to_resume(loop_config)
    state: dict = {}
    adapter = None
    if resume is not None:
        with resume.as_directory() as d:
            state = torch.load(Path(d) / TRAIN_STATE, map_location="cpu", weights_only=False)
            adapter = str(Path(d) / "model")
            value_head = torch.load(Path(d) / VALUE_HEAD, map_location="cpu")
            lm = build_policy(base, cfg.model, adapter_path=adapter, device=device)
    else:
        lm = build_policy(base, cfg.model, device=device)
    model = PolicyWithValue(lm, lm.config.hidden_size).to(device)
    reference = Reference.for_policy(lm, cfg.model, base, device)
    if state:
        model.value_head.load_state_dict(value_head)
    reward_model = build_reward_model(base, cfg.model, adapter_path=loop_config["reward_model"], device=device,
                                      trainable=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=ppo["lr"])
    if loop_config["engine"] == "dpsgd":
        from props_ray.dpsgd.engine import DPSGDEngine

        engine = DPSGDEngine.from_config(cfg, world, loop_config, unit="row", columns=PROMPT_COLUMNS)
    else:
        from props_ray.train.engine import StandardEngine

        engine = StandardEngine(cfg.train.batch_size, world, None, cfg.seed)
    wrapped, optimizer = engine.wrap(model, optimizer, loop_config["num_pairs"])
    if state:
        optimizer.load_state_dict(state["optimizer"])
        engine.load_state_dict(state.get("engine", {}))
    start_epoch, step, history = state.get("next_epoch", 0), state.get("step", 0), state.get("history", [])
    sampler = torch.Generator().manual_seed(cfg.seed * 7919 + rank + 1000 * start_epoch)

    # -- PPO: one epoch over each on-policy batch ---------------------------------
    shard = dataset_shard(loop_config, "prompts")
    if hasattr(engine, "start_stage"):
        engine.start_stage(1, shard, device)
    seen, total = 0, (loop_config.get("num_pairs") or 0) * cfg.train.epochs  # prompts, for the console
    for epoch in range(start_epoch, cfg.train.epochs):
        t0 = time.time()
        for physical_batches in engine.logical_batches(shard, epoch, device):
            stats = torch.zeros(3, device=device)  # reward-model score sum, KL sum, rows
            for batch in physical_batches:
                prompts = [row[:int(n)].tolist() for row, n in zip(batch["prompt_ids"], batch["prompt_length"])]
                ids, att, act = sample_responses(lm, prompts, max_new_tokens=ppo["max_new_tokens"],
                                                 temperature=ppo["temperature"], eos_id=tok.eos_token_id,
                                                 pad_id=tok.pad_token_id, fixed_length=ppo["fixed_length"],
                                                 generator=sampler, device=device)
                # One optimizer step per on-policy batch: the policy that sampled the batch is the one
                # being differentiated, so the "old" log-probs and values are this forward's, detached
                # (no second, no-grad forward; the ratio is exactly 1 and its gradient the policy
                # gradient, with the same dropout mask if the model has dropout).
                logits, values = wrapped(ids, att)
                logp = token_logprobs(logits, ids)
                old_logp, old_values = logp.detach(), values.detach()
                with torch.no_grad():
                    ref_logp = token_logprobs(reference.logits(ids, att), ids)
                    score = _scores(reward_model, ids, att)
                    rewards = kl_penalized_rewards(old_logp, ref_logp, act, score, ppo["beta"])
                    advantages, returns = gae(rewards, old_values, act, ppo["gamma"], ppo["lam"])
                per_row = ppo_loss(logp, old_logp, advantages, values, returns, act, ppo["clip"], ppo["value_coef"])
                engine.backward(per_row)
                seen += len(prompts) * world
                with torch.no_grad():
                    kl = ((old_logp - ref_logp) * act).sum(1)
                    stats += torch.stack([score.sum(), kl.sum(), torch.tensor(float(len(prompts)), device=device)])
            engine.step(wrapped, optimizer)
            step += 1
            maybe_inject_fault(loop_config.get("fail_at"), 1, step, rank, world, Path(loop_config["job_dir"]))
            if step % cfg.train.log_every == 0:
                row = {"stage": 1, "epoch": epoch, "step": step, **engine.metrics()}
                if engine.logs_batch_statistics:  # DP-PPO's batch statistics are not noised: not logged
                    if world > 1:
                        torch.distributed.all_reduce(stats)
                    n = max(stats[2].item(), 1.0)
                    row.update({"reward": stats[0].item() / n, "kl": stats[1].item() / n})
                history.append(row)
                if rank == 0:
                    progress.step(loop_config["trial"], stage=1, epoch=epoch, epochs=cfg.train.epochs, step=step,
                                  pairs=seen, total_pairs=total, reward=row.get("reward"),
                                  epsilon=row.get("epsilon"))
        _report(wrapped, optimizer, engine, rank, epoch, epoch == cfg.train.epochs - 1, history, step,
                time.time() - t0, save_policy, loop_config.get("order"))


def _report(wrapped, optimizer, engine, rank, epoch, done, history, step, seconds, save_policy, order):
    metrics = {"order": order, "stage": 1, "epoch": epoch, "stage_done": done, "step": step, "epoch_seconds": seconds,
               **engine.metrics()}
    if history:
        metrics.update({k: history[-1][k] for k in ("reward", "kl") if k in history[-1]})

    def write(d: Path) -> None:
        model = _unwrap(wrapped)
        save_policy(model.policy, d / "model")
        torch.save(model.value_head.state_dict(), d / VALUE_HEAD)
        torch.save({"optimizer": optimizer.state_dict(), "engine": engine.state_dict(),
                    "next_epoch": epoch + 1, "step": step, "history": history}, d / TRAIN_STATE)

    report_checkpoint(metrics, rank, write, history)
