"""The non-private step on two CPU workers: DDP against the engine's one flat all-reduce.

    python -m props_ray.bench.data_parallel [--rounds 2] [--steps 100] [--batch 16]

Two gloo processes (one torch thread each) run the DP-SGD bench's tiny DPO step (the embedded model
with LoRA, ``--batch`` pairs a process of 2 x 16 tokens, the reference forward every step, AdamW) in
three modes, one after another in each round:

- ``alone``: no process group, the two processes side by side (what the step costs on its own);
- ``ddp``: the model in DDP, as Ray Train's ``prepare_model`` wraps it (all-reduces per bucket, during
  the backward);
- ``engine``: :class:`~props_ray.train.engine.StandardEngine` on gloo, as the training loop runs it
  (rank 0's start broadcast, one all-reduce of the gradients after the backward).

Each figure is one process's mean milliseconds a step over ``--steps`` steps after 20 warm-up steps.
"""

from __future__ import annotations

import argparse
import datetime
import os
import socket
import time

MODES = ("alone", "ddp", "engine")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _process(rank: int, mode: str, port: int, batch: int, steps: int, out) -> None:
    import torch
    import torch.distributed as dist

    from props_ray.bench.dp_overhead import build_model, make_batch
    from props_ray.dpo.logprobs import pair_logprobs
    from props_ray.dpo.losses import dpo_loss, implicit_reward_margin
    from props_ray.modeling import Reference
    from props_ray.train.engine import StandardEngine

    torch.set_num_threads(1)
    if mode != "alone":
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        # a partner that died leaves this one waiting in a collective: give up after two minutes
        dist.init_process_group("gloo", rank=rank, world_size=2, timeout=datetime.timedelta(seconds=120))
    torch.manual_seed(rank)
    policy, vocab = build_model("tiny")
    policy.train()
    reference = Reference(policy)
    optimizer = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-4)
    engine = StandardEngine(2 * batch, 2, 1.0, 0)
    if mode == "ddp":
        model = torch.nn.parallel.DistributedDataParallel(policy, find_unused_parameters=False)
    elif mode == "engine":
        model, optimizer = engine.wrap(policy, optimizer, 2 * batch)
    else:
        model = policy
    data = make_batch(batch, 16, vocab, torch.device("cpu"))

    def step():
        ref_c, ref_r = reference.pair_logprobs(data)
        pol_c, pol_r = pair_logprobs(model, data, share_prompt=True)
        engine.backward(dpo_loss("sigmoid", implicit_reward_margin(pol_c, pol_r, ref_c, ref_r), 0.1))
        engine.step(model, optimizer)

    try:
        for _ in range(20):
            step()
        if mode != "alone":
            dist.barrier()
        t = time.perf_counter()
        for _ in range(steps):
            step()
        out.put((mode, rank, (time.perf_counter() - t) / steps * 1e3))
    finally:
        if mode != "alone":
            dist.destroy_process_group()


def measure(mode: str, batch: int = 16, steps: int = 100) -> list[float]:
    """Milliseconds a step of each of the two processes in ``mode``."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    port = _free_port()
    procs = [ctx.Process(target=_process, args=(r, mode, port, batch, steps, out)) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=600)
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    if any(p.exitcode for p in procs):
        raise RuntimeError(f"a {mode} process failed (exit codes {[p.exitcode for p in procs]})")
    return [ms for _, _, ms in sorted(out.get() for _ in procs)]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--batch", type=int, default=16, help="pairs a process a step")
    args = ap.parse_args(argv)
    print(f"two processes x 1 thread, {args.batch} pairs x 2 rows x 16 tokens each, {args.steps} timed steps")
    for r in range(args.rounds):
        row = {m: measure(m, args.batch, args.steps) for m in MODES}
        print(f"round {r + 1}: " + "   ".join(f"{m} {a:.1f} / {b:.1f} ms" for m, (a, b) in row.items()))


if __name__ == "__main__":
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    main()
