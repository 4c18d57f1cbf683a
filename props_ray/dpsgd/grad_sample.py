"""Per-*pair* gradient samples for DPO under Opacus.

The privacy unit is one preference pair: prompt, both responses and the label.
:func:`props_ray.dpo.logprobs.pair_logprobs` runs a batch of B pairs as ONE
forward of 2B rows (rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected
ones). Rows never interact in a causal LM forward (no batch norm, attention is
within a row), and the per-pair loss depends on row i and row B+i only, so the
gradient of pair i's loss is exactly the sum of the per-row gradients of rows i
and B+i.

:class:`PairGradSampleModule` computes those per-pair samples directly in
Opacus's backward hooks: for a linear layer, pair i's weight gradient is
``sum_t g[i,t] a[i,t]^T + sum_t g[B+i,t] a[B+i,t]^T``, two batched products
over contiguous halves of the rows, so no [2B, ...] per-row tensor is ever
allocated (half the per-sample memory of folding afterwards, and no fold pass).
Other module types fall back to Opacus's own sampler on the 2B rows, folded
with :func:`fold_pair_rows` inside the hook. The optimizer then clips each
pair's *whole* gradient (all parameters, both rows) to norm C once. Clipping the
two rows separately would let one pair contribute up to 2C and double the
sensitivity the noise is calibrated for.
"""

from __future__ import annotations

import torch
from opacus import GradSampleModule


class PairGradSampleModule(GradSampleModule):
    """Opacus ``GradSampleModule`` (hooks mode, summed loss) whose samples are per *pair*.

    ``p.grad_sample`` has B rows for a forward of 2B rows (chosen rows first).
    ``loss_reduction='sum'``: the engine back-propagates the *sum* of per-pair
    losses, so the samples need no rescaling (Opacus's 'mean' would multiply them
    by the number of rows). ``.module`` is the wrapped policy (what
    ``save_policy`` saves; the ``Reference`` is built on the policy before it is wrapped).
    """

    #: its forward must be the 2B-row layout (``pair_logprobs`` refuses ``share_prompt`` on it)
    pair_rows = True

    def __init__(self, module: torch.nn.Module, strict: bool = True):
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=strict)
        # Per instance: Opacus's class-level table stays untouched for anyone else using it.
        self.GRAD_SAMPLERS = {t: _per_pair(fn) for t, fn in GradSampleModule.GRAD_SAMPLERS.items()}
        self.GRAD_SAMPLERS[torch.nn.Linear] = pair_linear_grad_sample
        for name, m in self._module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own and type(m) not in self.GRAD_SAMPLERS:
                raise NotImplementedError(f"DP-SGD: no per-pair gradient sampler for trainable module {name!r} "
                                          f"({type(m).__name__}); train LoRA adapters or supported layers")

    def capture_activations_hook(self, module, forward_input, _forward_output):
        # Under autocast a linear layer multiplies in the autocast dtype, and its per-pair sample casts the
        # captured activations to the backprops' dtype (that one) anyway: capture them in it. The samples are
        # the same; the captured activations take half the memory of float32 ones.
        if isinstance(module, torch.nn.Linear) and forward_input:
            kind = forward_input[0].device.type
            if torch.is_autocast_enabled(kind):
                low = torch.get_autocast_dtype(kind)
                forward_input = [t.to(low) if t.is_floating_point() else t for t in forward_input]
        super().capture_activations_hook(module, forward_input, _forward_output)

    def rearrange_grad_samples(self, *, module, backprops, loss_reduction, batch_first):
        # Opacus sizes the sample buffer by ``module.max_batch_len``, which it computes (in rows) on
        # a batch's first backward through the module and drops after its last: one row per pair.
        fresh = not hasattr(module, "max_batch_len")
        activations, backprops = super().rearrange_grad_samples(module=module, backprops=backprops,
                                                                loss_reduction=loss_reduction,
                                                                batch_first=batch_first)
        if fresh:
            module.max_batch_len = _pairs(module.max_batch_len)
        return activations, backprops

    @property
    def module(self) -> torch.nn.Module:
        return self._module


class RowGradSampleModule(GradSampleModule):
    """Opacus's own per-row samples (hooks mode, summed loss): the privacy unit is one row, e.g. one
    prompt's rollout in DP-PPO, where a row's loss (policy and value terms) depends on that row alone."""

    def __init__(self, module: torch.nn.Module, strict: bool = True):
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=strict)

    @property
    def module(self) -> torch.nn.Module:
        return self._module


def _pairs(rows: int) -> int:
    if rows % 2:
        raise ValueError(f"a pair batch must have an even number of rows (chosen then rejected), got {rows}")
    return rows // 2


def pair_linear_grad_sample(layer: torch.nn.Linear, activations: list[torch.Tensor],
                            backprops: torch.Tensor) -> dict[torch.Tensor, torch.Tensor]:
    """Per-pair samples of a linear layer: the chosen half's per-row products plus the rejected half's."""
    half = _pairs(activations[0].shape[0])
    # [rows, positions, features]: any leading per-row dims (sequence positions) flattened.
    g = backprops.reshape(backprops.shape[0], -1, backprops.shape[-1])
    out = {}
    if layer.weight.requires_grad:
        a = activations[0].to(backprops.dtype)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        w = torch.bmm(g[:half].transpose(1, 2), a[:half])  # sum over positions of g a^T, chosen rows
        w.baddbmm_(g[half:].transpose(1, 2), a[half:])  # + the rejected rows, in place
        out[layer.weight] = w
    if layer.bias is not None and layer.bias.requires_grad:
        b = g.sum(1)
        out[layer.bias] = b[:half] + b[half:]
    return out


def _per_pair(sampler):
    """Opacus's per-row sampler for a module type, folded to per-pair samples."""
    def fold(layer, activations, backprops):
        return {p: fold_pair_rows(g) for p, g in sampler(layer, activations, backprops).items()}
    return fold


def fold_pair_rows(grad_sample: torch.Tensor) -> torch.Tensor:
    """[2B, ...] per-row samples (chosen rows first) -> [B, ...] per-pair samples."""
    rows = grad_sample.shape[0]
    if rows % 2:
        raise ValueError(f"per-row gradient samples must have an even number of rows (chosen then rejected), "
                         f"got {rows}")
    half = rows // 2
    return grad_sample[:half] + grad_sample[half:]


def per_pair_grad_sample(p: torch.Tensor) -> torch.Tensor:
    """A parameter's per-pair samples (a list, from several backward passes, is concatenated)."""
    gs = getattr(p, "grad_sample", None)
    if gs is None:
        raise ValueError("per-sample gradient not found: is the model wrapped in PairGradSampleModule and "
                         "did this parameter take part in the forward pass?")
    if isinstance(gs, list):
        return torch.cat(gs, dim=0)
    return gs


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
