"""Poisson sampling of preference pairs over one worker's shard.

Ray Train splits each stage's dataset into disjoint, equal shards, one per
worker. DP-SGD needs every pair of the stage partition to enter every logical
step independently with probability ``q``; since each pair lives on exactly one
worker, each worker flipping an independent ``q``-coin for each of its own pairs
gives exactly that, and the global logical batch is the union of the local ones
(its expected size is ``q * N_stage``, the expected batch size).

The shard is materialized into tensors once per stage (pairs are a few hundred
bytes each); the logical batch is then split into physical batches of at most
``physical_batch_size`` pairs (per worker), like Opacus's ``BatchMemoryManager``.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from props_ray.dpo.tokenize import TRAIN_COLUMNS
from props_ray.privacy.randomness import csprng_uniform


def materialize_shard(shard, columns=TRAIN_COLUMNS, batch_size: int = 4096) -> dict[str, torch.Tensor]:
    """The whole local shard as CPU tensors: from a Ray ``DataIterator`` (one pass) or a mapping of arrays."""
    if isinstance(shard, Mapping):
        return {c: torch.as_tensor(np.asarray(shard[c])) for c in columns if c in shard}
    parts: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    for batch in shard.iter_batches(batch_size=batch_size, batch_format="numpy"):
        for c in columns:
            if c in batch:
                parts[c].append(np.asarray(batch[c]))
    out = {}
    for c, arrs in parts.items():
        if arrs:
            out[c] = torch.from_numpy(np.concatenate(arrs))
    if not out:  # an empty shard: keep the schema so empty batches still have the right columns
        out = {c: torch.zeros((0, 1), dtype=torch.int64) for c in columns if c != "confidence"}
        out["confidence"] = torch.zeros((0,), dtype=torch.float32)
    return out


def shard_size(tensors: Mapping[str, torch.Tensor]) -> int:
    return int(next(iter(tensors.values())).shape[0]) if tensors else 0


class CSPRNGCoins:
    """Uniforms straight from the OS CSPRNG, with the one method the sampler uses."""

    def random(self, n: int) -> np.ndarray:
        return csprng_uniform(n)


def sampling_generator(seed: int, stage: int, epoch: int, rank: int, secure: bool, stream: int = 0):
    """The coin-flip stream of one worker for one (stage, epoch).

    Seeded runs derive it from (seed, stream, stage, epoch, rank), ``stream`` being the trial's
    and epsilon's own, so a restarted epoch replays the same batches and no two trials share coins;
    ``secure`` runs flip every coin with the OS CSPRNG (:class:`CSPRNGCoins`), which nothing replays.
    """
    if secure:
        return CSPRNGCoins()
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, stream, stage, epoch, rank, 0xD95])))


class PoissonSampler:
    """Each of the ``num_local`` pairs of this worker joins a logical batch independently with rate ``q``."""

    def __init__(self, num_local: int, sample_rate: float, generator: np.random.Generator):
        if not 0.0 <= sample_rate <= 1.0:
            raise ValueError(f"sample rate must be in [0, 1], got {sample_rate}")
        self.num_local = num_local
        self.sample_rate = sample_rate
        self.generator = generator

    def sample(self) -> torch.Tensor:
        """Indices of one local logical batch (possibly empty)."""
        mask = self.generator.random(self.num_local) < self.sample_rate
        return torch.from_numpy(np.flatnonzero(mask))


def physical_batches(tensors: Mapping[str, torch.Tensor], indices: torch.Tensor, physical_batch_size: int | None,
                     device) -> list[dict[str, torch.Tensor]]:
    """Split a logical batch into physical batches on ``device``; an empty logical batch gives ``[]``."""
    n = int(indices.numel())
    if n == 0:
        return []
    size = physical_batch_size or n
    out = []
    for start in range(0, n, size):
        idx = indices[start:start + size]
        out.append({k: v.index_select(0, idx).to(device, non_blocking=True) for k, v in tensors.items()})
    return out
