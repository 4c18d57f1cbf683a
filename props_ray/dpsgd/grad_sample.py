"""Per-*pair* gradient samples for DPO under Opacus.

The privacy unit is one preference pair: prompt, both responses and the label.
:func:`props_ray.dpo.logprobs.pair_logprobs` runs a batch of B pairs as ONE
forward of 2B rows (rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected
ones), so Opacus's hooks produce per-*row* gradient samples with 2B rows. Rows
never interact in a causal LM forward (no batch norm, attention is within a
row), and the per-pair loss depends on row i and row B+i only, so the gradient
of pair i's loss is exactly ``grad_sample[i] + grad_sample[B + i]``.

:func:`fold_pair_rows` does that folding; the optimizer then clips each pair's
*whole* gradient (all parameters, both rows) to norm C once. Clipping the two
rows separately would let one pair contribute up to 2C and double the
sensitivity the noise is calibrated for.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule


class PairGradSampleModule(GradSampleModule):
    """Opacus ``GradSampleModule`` (hooks mode, summed loss) around the policy.

    ``loss_reduction='sum'``: the engine back-propagates the *sum* of per-pair
    losses, so the per-row samples need no rescaling (Opacus's 'mean' would
    multiply them by the number of rows, 2B). ``.module`` is the wrapped policy
    (what ``save_policy`` and ``Reference`` use).
    """

    def __init__(self, module: torch.nn.Module, strict: bool = True):
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=strict)

    @property
    def module(self) -> torch.nn.Module:
        return self._module

    def disable_adapter(self):
        return self._module.disable_adapter()


def fold_pair_rows(grad_sample: torch.Tensor) -> torch.Tensor:
    """[2B, ...] per-row samples (chosen rows first) -> [B, ...] per-pair samples."""
    rows = grad_sample.shape[0]
    if rows % 2:
        raise ValueError(f"per-row gradient samples must have an even number of rows (chosen then rejected), "
                         f"got {rows}")
    half = rows // 2
    return grad_sample[:half] + grad_sample[half:]


def per_pair_grad_sample(p: torch.Tensor) -> torch.Tensor:
    """A parameter's per-pair samples; a list (several backward passes) is folded pass by pass."""
    gs = getattr(p, "grad_sample", None)
    if gs is None:
        raise ValueError("per-sample gradient not found: is the model wrapped in PairGradSampleModule and "
                         "did this parameter take part in the forward pass?")
    if isinstance(gs, list):
        return torch.cat([fold_pair_rows(g) for g in gs], dim=0)
    return fold_pair_rows(gs)


def per_sample_norms(samples: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each sample's full gradient, over all parameters."""
    n = samples[0].shape[0]
    per_param = [g.reshape(n, -1).to(torch.promote_types(g.dtype, torch.float32)).norm(2, dim=1) for g in samples]
    dtype = torch.float64 if any(x.dtype == torch.float64 for x in per_param) else torch.float32
    return torch.stack([x.to(dtype) for x in per_param], dim=1).norm(2, dim=1)


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / norm), exactly (no epsilon in the denominator; a zero norm gives 1)."""
    return max_norm / norms.clamp_min(max_norm)


def clip_and_sum(samples: list[torch.Tensor], max_norm: float,
                 dtypes: list[torch.dtype] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each sample's full gradient to ``max_norm`` and sum over samples; returns (sums, norms)."""
    n = samples[0].shape[0]
    if n == 0:
        return [torch.zeros(g.shape[1:], dtype=(dtypes[i] if dtypes else g.dtype), device=g.device)
                for i, g in enumerate(samples)], torch.zeros(0)
    norms = per_sample_norms(samples)
    factors = clip_factors(norms, max_norm)
    sums = []
    for i, g in enumerate(samples):
        dtype = dtypes[i] if dtypes else g.dtype
        sums.append(torch.einsum("i,i...->...", factors.to(device=g.device, dtype=dtype), g.to(dtype)))
    return sums, norms
