"""The non-private engine's data parallelism on CPU workers (gloo): without DDP, its step must still give
every rank rank 0's starting parameters and the mean over ranks of the ranks' gradients, clipped as one.

Checked against the update computed here in one process from the same starting model and both ranks'
shards, with autograd."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import dpo_loss, implicit_reward_margin
from props_ray.modeling import Reference
from props_ray.train.engine import StandardEngine
from test_dpsgd import BETA, _free_port, make_pairs, tiny_lora, trainable

LR, PAIRS, WORLD = 1.0, 4, 2


def _per_pair(model, reference, rank: int) -> torch.Tensor:
    batch = make_pairs(PAIRS, seed=20 + rank)  # rank r's shard
    ref_c, ref_r = reference.pair_logprobs(batch)
    pol_c, pol_r = pair_logprobs(model, batch)
    return dpo_loss("sigmoid", implicit_reward_margin(pol_c, pol_r, ref_c, ref_r), BETA)


def _start(rank: int):
    """Every rank's model: the same base, LoRA weights of the rank's own (as each worker initialises them)."""
    model = tiny_lora("gpt_neox", seed=10)
    if rank:
        torch.manual_seed(100 + rank)
        with torch.no_grad():
            for p in trainable(model).values():
                p.normal_(0.0, 0.2)
    return model


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors])


def _rank(rank: int, world: int, port: int, out: str, max_norms: list[float]) -> None:
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        policy = _start(rank)  # a different start per rank: wrap() must broadcast rank 0's
        reference = Reference(policy)
        params = list(trainable(policy).values())
        saved = {}
        for i, max_norm in enumerate(max_norms):  # one step from the same start for each clipping norm
            engine = StandardEngine(PAIRS * world, world, max_norm, seed=0)
            model, optimizer = engine.wrap(policy, torch.optim.SGD(params, lr=LR), PAIRS * world)
            start = _flat(params).clone()
            engine.backward(_per_pair(model, reference, rank))
            engine.step(model, optimizer)
            saved[f"start{i}"], saved[f"after{i}"] = start.numpy(), _flat(params).numpy()
            with torch.no_grad():  # back to the start for the next norm
                offset = 0
                for p in params:
                    p.copy_(start[offset:offset + p.numel()].view_as(p))
                    offset += p.numel()
            saved[f"ddp{i}"] = float(hasattr(model, "module"))
        np.savez(Path(out) / f"rank{rank}.npz", **saved)
    finally:
        dist.destroy_process_group()


def test_cpu_ranks_step_on_the_clipped_mean_of_their_gradients(tmp_path):
    # the step computed here: rank 0's start, each rank's shard's gradient of its mean loss
    policy = _start(0)
    reference = Reference(policy)
    params = list(trainable(policy).values())
    start = _flat(params)
    grads = [_flat(torch.autograd.grad(_per_pair(policy, reference, r).mean(), params)) for r in range(WORLD)]
    mean = (grads[0] + grads[1]) / 2
    assert not torch.allclose(grads[0] / grads[0].norm(), grads[1] / grads[1].norm(), atol=1e-2)  # shards differ

    def clipped(g, c):
        return g * min(1.0, c / float(g.norm()))

    # 1.2 |mean|: the mean is not clipped and the sum is; 0.5 |mean|: the mean is clipped, and clipping each
    # rank's gradient before averaging gives another direction
    norms = [1.2 * float(mean.norm()), 0.5 * float(mean.norm())]
    torch.multiprocessing.spawn(_rank, args=(WORLD, _free_port(), str(tmp_path), norms), nprocs=WORLD, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(WORLD))
    for i, c in enumerate(norms):
        assert r0[f"ddp{i}"] == 0.0  # gloo: the engine averages itself, no DDP wrapper
        assert np.array_equal(r0[f"start{i}"], start.numpy())  # rank 0's start ...
        assert np.array_equal(r1[f"start{i}"], start.numpy())  # ... broadcast to rank 1
        assert np.array_equal(r0[f"after{i}"], r1[f"after{i}"])  # one update on every rank
        expected = (start - LR * clipped(mean, c)).numpy()
        np.testing.assert_allclose(r0[f"after{i}"], expected, rtol=1e-4, atol=1e-7)
        # what a broken reduction would give is told apart by these tolerances
        wrong = {"sum": clipped(grads[0] + grads[1], c),
                 "clip each rank, then average": (clipped(grads[0], c) + clipped(grads[1], c)) / 2,
                 "rank 0 alone": clipped(grads[0], c)}
        for name, g in wrong.items():
            if name == "sum" and i == 1:
                continue  # both clipped to the same norm in the same direction: equal by design
            if name.startswith("clip each") and i == 0 and max(float(x.norm()) for x in grads) <= c:
                continue
            assert not np.allclose((start - LR * g).numpy(), expected, rtol=1e-4, atol=1e-7), name
