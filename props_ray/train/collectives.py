"""What data-parallel ranks exchange outside DDP: rank 0's starting parameters, and a step's gradients
in one flat all-reduce.

DP-SGD's optimizer reduces its noisy sums this way (:mod:`props_ray.dpsgd.engine`), and so does the
non-private engine on CPUs (:class:`props_ray.train.engine.StandardEngine`), where DDP's per-bucket
all-reduces inside the backward cost a two-worker step of the embedded model 25-31 ms against 23.5 ms
for one flat all-reduce after it (gloo, 2 cores, 2026-12-07; ``python -m props_ray.bench.data_parallel``).
"""

from __future__ import annotations

import torch


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def broadcast_trainable(model: torch.nn.Module, src: int = 0) -> None:
    """Make every rank start from rank ``src``'s trainable parameters (LoRA init is random per rank)."""
    _, world = rank_and_world()
    if world == 1:
        return
    for p in model.parameters():
        if p.requires_grad:
            torch.distributed.broadcast(p.data, src)


def all_reduce_flat(tensors: list[torch.Tensor]) -> None:
    """Sum each tensor over all ranks, in place, in one all-reduce of their concatenation (every rank
    passes tensors of the same shapes in the same order)."""
    if rank_and_world()[1] == 1 or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    torch.distributed.all_reduce(flat, op=torch.distributed.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset:offset + n].view_as(t))
        offset += n


def average_gradients(params: list[torch.Tensor]) -> None:
    """Every rank's ``p.grad`` becomes the mean over ranks of the ranks' ``p.grad`` (what DDP computes). A
    parameter without a gradient on this rank takes part as zeros, so the ranks' buffers line up."""
    _, world = rank_and_world()
    if world == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    all_reduce_flat(grads)
    torch._foreach_div_(grads, world)
