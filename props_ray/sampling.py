"""Ancestral sampling with a KV cache: the one token loop behind evaluation's generations
(:mod:`props_ray.generation`) and PPO's on-policy rollouts (:mod:`props_ray.ppo.rollout`).

The caller chooses how each step's tokens are drawn from the step's probabilities (``draw``):
:class:`RowDraw` for generations that must not depend on their batch, one generator for a rollout
batch.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import torch

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(z: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijection of uint64 that spreads every input bit over the output."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def row_uniforms(seed: int, rows: np.ndarray, step: int) -> np.ndarray:
    """[len(rows)] uniforms in [0, 1) with 53 bits, a pure function of (seed, row, step): a counter-based
    stream, so a row's draws do not depend on which rows share its batch. Sampling randomness only;
    privacy noise comes from :mod:`props_ray.privacy.randomness`."""
    with np.errstate(over="ignore"):
        z = _mix(np.full(len(rows), np.uint64(seed % 2 ** 64)) + _GOLDEN)
        z = _mix(z ^ (np.asarray(rows).astype(np.uint64) + _GOLDEN))
        z = _mix(z ^ (np.uint64(step) + _GOLDEN))
    return (z >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


def inverse_cdf(p: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """[B] tokens: row i's token is the first whose cumulative probability exceeds u_i times the row's
    total (exact sampling of p given uniform u); never a token of probability zero."""
    cdf = p.double().cumsum(-1)
    if not (torch.isfinite(cdf[:, -1]) & (cdf[:, -1] > 0)).all():  # as torch.multinomial refuses them
        raise ValueError("sampling probabilities contain nan or inf, or a row is all zeros "
                         "(the model's logits are not finite)")
    idx = torch.searchsorted(cdf, (u.to(cdf) * cdf[:, -1])[:, None], right=True).squeeze(1)
    # Any u < 1 in float64 (the stream's) lands on a token of positive probability; u = 1 (a float32
    # uniform rounded up) steps past the end, and takes the last token that is possible.
    past_end = idx == p.shape[-1]
    if past_end.any():
        idx = torch.where(past_end, p.shape[-1] - 1 - (p > 0).flip(-1).int().argmax(-1), idx)
    return idx


class RowDraw:
    """``draw`` for :func:`sample_tokens` with a stream per row: step t of row r uses
    ``row_uniforms(seed, r, t)``, whatever the batch. One vectorised draw per step."""

    def __init__(self, seed: int, rows):
        self.seed, self.rows, self.step = seed, np.asarray(rows, dtype=np.int64), 0

    def __call__(self, p: torch.Tensor) -> list[int]:
        u = torch.from_numpy(row_uniforms(self.seed, self.rows, self.step)).to(p.device)
        self.step += 1
        return inverse_cdf(p, u).tolist()


@torch.no_grad()
def sample_tokens(lm, x: torch.Tensor, *, max_new_tokens: int, temperature: float, eos_id: int | None,
                  fixed_length: bool, draw: Callable[[torch.Tensor], list[int]]) -> list[list[int]]:
    """Up to ``max_new_tokens`` tokens for each row of the equal-length prompts ``x``; a row ends with its
    eos token, which is kept (the caller decides whether it is an action or dropped). With
    ``fixed_length`` the eos is masked out, so every row gets exactly ``max_new_tokens``."""
    outs: list[list[int]] = [[] for _ in range(x.shape[0])]
    done = [False] * x.shape[0]
    past, inp = None, x
    for _ in range(max_new_tokens):
        res = lm(input_ids=inp, past_key_values=past, use_cache=True)
        past = res.past_key_values
        logits = res.logits[:, -1].float() / temperature
        if fixed_length and eos_id is not None:
            logits[:, eos_id] = float("-inf")
        nxt = draw(torch.softmax(logits, -1))
        for i, t in enumerate(nxt):
            if not done[i]:
                outs[i].append(t)
                done[i] = t == eos_id
        if all(done):
            break
        inp = torch.tensor([[t] for t in nxt], device=x.device)
    return outs
