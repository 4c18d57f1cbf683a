"""How one optimizer step is taken: the part that differs between non-private DPO and DP-SGD.

The training loop (:mod:`props_ray.train.loop`) is the same for every method;
it asks an *engine* to wrap the model, to yield the physical batches of each
logical step from the worker's data shard, to back-propagate the per-pair
losses and to step the optimizer. :class:`StandardEngine` is data-parallel DPO
(shuffled mini-batches, gradients averaged over ranks, global gradient clipping);
``props_ray.dpsgd.engine.DPSGDEngine`` is DP-SGD.
"""

from __future__ import annotations

from typing import Iterator

import torch

from props_ray.train.collectives import average_gradients, broadcast_trainable, rank_and_world


class StandardEngine:
    name = "standard"
    # Loss, reward accuracy and margin of the training batches may be logged: for RR and PROPS they
    # are post-processing of privatized labels. DP-SGD's engine says False: they are not noised.
    logs_batch_statistics = True

    def __init__(self, batch_size: int, world_size: int, max_grad_norm: float | None, seed: int):
        self.per_worker_batch = max(1, batch_size // world_size)
        self.max_grad_norm = max_grad_norm
        self.seed = seed

    #: whether :meth:`step` averages the gradients over ranks itself (gloo, where the model is not DDP)
    averages = False

    def wrap(self, model, optimizer, num_pairs: int):
        """On gloo (CPU workers): rank 0's trainable parameters to every rank, and one flat all-reduce of
        the gradients after the backward (:func:`~props_ray.train.collectives.average_gradients`), which
        DDP's per-bucket all-reduces during the backward cost more than on 2 cores. Otherwise (NCCL, or one
        worker) Ray Train's ``prepare_model``: DDP, whose all-reduces overlap the backward on GPUs."""
        import ray.train.torch

        if rank_and_world()[1] > 1 and torch.distributed.get_backend() == "gloo":
            broadcast_trainable(model)
            self.averages = True
            return model, optimizer
        prepared = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": False})
        return prepared, optimizer

    def logical_batches(self, shard, epoch: int, device) -> Iterator[list[dict[str, torch.Tensor]]]:
        for batch in shard.iter_torch_batches(batch_size=self.per_worker_batch, device=device,
                                              local_shuffle_buffer_size=4 * self.per_worker_batch,
                                              local_shuffle_seed=self.seed + epoch):
            yield [batch]

    def backward(self, per_pair_loss: torch.Tensor) -> None:
        per_pair_loss.mean().backward()

    def step(self, model, optimizer) -> None:
        params = [p for p in model.parameters() if p.requires_grad]
        if self.averages:
            average_gradients(params)
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def metrics(self) -> dict:
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
