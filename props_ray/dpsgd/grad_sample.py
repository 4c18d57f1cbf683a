"""Per-*pair* gradient samples for DPO under Opacus.

The privacy unit is one preference pair: prompt, both responses and the label.
:func:`props_ray.dpo.logprobs.pair_logprobs` runs a batch of B pairs in one of two layouts:

- one row per pair (``prompt + chosen + rejected`` under a mask that keeps the responses apart),
  when the pairs' rows share their prompt: a row's loss depends on that row alone, so Opacus's
  per-row samples are the per-pair samples;
- 2B rows (rows 0..B-1 the chosen sequences, rows B..2B-1 the rejected ones) otherwise. Rows never
  interact in a causal LM forward (no batch norm, attention is within a row), and the per-pair loss
  depends on row i and row B+i only, so the gradient of pair i's loss is exactly the sum of the
  per-row gradients of rows i and B+i.

:class:`PairGradSampleModule` computes the samples of either layout, for a linear layer in that layer's
own backward (:class:`_LinearSamples`, which its forward runs in training), for other layers in
per-layer hooks. The forward tells it which layout it runs (``rows_per_pair``, set by
``pair_logprobs``); the layout travels with what the forward keeps for the backward, so each backward
reads the layout of its own forward. For a linear layer in the 2B-row layout, pair i's weight gradient is
``sum_t g[i,t] a[i,t]^T + sum_t g[B+i,t] a[B+i,t]^T``, two batched products over contiguous halves
of the rows, so no [2B, ...] per-row tensor is ever allocated. Other module types use Opacus's own
sampler, folded with :func:`fold_pair_rows` inside the hook in the 2B-row layout. The optimizer then
clips each pair's *whole* gradient (all parameters, both responses) to norm C once. Clipping the two
rows separately would let one pair contribute up to 2C and double the sensitivity the noise is
calibrated for.
"""

from __future__ import annotations

import math

import torch
from opacus import GradSampleModule
from opacus.grad_sample.functorch import ft_compute_per_sample_gradient, prepare_layer
from opacus.grad_sample.grad_sample_module import promote_current_grad_sample


class _OutputGradHooks(GradSampleModule):
    """Opacus's ``GradSampleModule`` (hooks mode, summed loss) with lighter hooks.

    Opacus registers a forward hook and a *full* backward hook per layer; the latter wraps every
    hooked layer's inputs and outputs in extra autograd nodes on each forward, and its backward pass
    goes through a general path (a zero-filled buffer per parameter sized for packed sequences). A
    per-sample gradient needs only the layer's input and the gradient with respect to its output.

    - A trainable ``torch.nn.Linear`` (every LoRA matrix) runs, in a training forward, as one autograd
      function (:class:`_LinearSamples`) that keeps its input and whose backward gives the input's
      gradient and the layer's samples: no hook at all, and no weight gradient.
    - Any other trainable layer gets a forward hook that keeps the input and registers a hook on the
      output tensor, which computes the samples with Opacus's samplers.

    What a forward keeps travels with its own autograd node or hook, not in a list on the module, so
    each backward pairs with its own forward. ``p.grad_sample`` follows Opacus: summed over a
    layer's uses in one backward, a list over backward passes.

    ``loss_reduction='sum'``: the engine back-propagates the *sum* of per-unit losses, so the samples
    need no rescaling (Opacus's 'mean' would multiply them by the number of rows). ``.module`` is the
    wrapped model (what ``save_policy`` saves).
    """

    def __init__(self, module: torch.nn.Module, strict: bool = True):
        super().__init__(module, batch_first=True, loss_reduction="sum", strict=strict)

    def add_hooks(self, *, loss_reduction: str = "mean", batch_first: bool = True,
                  force_functorch: bool = False) -> None:
        if force_functorch or loss_reduction != "sum" or not batch_first:
            raise NotImplementedError("per-sample hooks here: summed loss, batch first, Opacus's samplers")
        if hasattr(self._module, "autograd_grad_sample_hooks"):
            raise ValueError("Trying to add hooks twice to the same model")
        self._module.autograd_grad_sample_hooks = []
        self.autograd_grad_sample_hooks = self._module.autograd_grad_sample_hooks
        # the parameters with samples (trainable when wrapped, as the optimizer's): what backward()
        # differentiates towards, so that the backward of every layer with samples runs
        self._sample_params: list[torch.Tensor] = []
        for module in self.iterate_submodules(self._module):
            params = [p for p in module.parameters(recurse=False) if p.requires_grad]
            self._sample_params.extend(params)
            if params and type(module).forward is torch.nn.Linear.forward:
                module.forward = self._linear_forward_for(module, params)
                self.autograd_grad_sample_hooks.append(_RestoreForward(module))
                continue
            if type(module) not in self.GRAD_SAMPLERS:
                prepare_layer(module, batch_first=True)
            if params:
                self.autograd_grad_sample_hooks.append(module.register_forward_hook(self._forward_hook_for(module, params)))
        self.enable_hooks()

    def _add_samples(self, params, samples: dict) -> None:
        """Add one use's samples to its layer's samples of this backward; at the layer's last use in the
        backward its samples are complete (Opacus's ``p.grad_sample``: summed over a layer's uses in one
        backward, a list over backward passes)."""
        for p, g in samples.items():
            current = getattr(p, "_current_grad_sample", None)
            p._current_grad_sample = g if current is None else current + g
        for p in params:
            p._forward_counter -= 1
            if p._forward_counter == 0 and hasattr(p, "_current_grad_sample"):
                promote_current_grad_sample(p)

    def _linear_forward_for(self, module, params):
        """The forward of one trainable linear layer: in a training forward, :class:`_LinearSamples` (the
        same output; its backward forms the layer's samples); otherwise the plain linear map. In place
        of a forward hook beside autograd's linear, which kept a second copy of the input under
        autocast."""
        linear = torch.nn.functional.linear
        samples = _LinearSamples.apply

        def forward(input):
            if self.hooks_enabled and module.training and torch.is_grad_enabled():
                for p in params:
                    p._forward_counter += 1
                return samples(input, module.weight, module.bias, self, module, params)
            return linear(input, module.weight, module.bias)

        return forward

    def _forward_hook_for(self, module, params):
        """The forward hook of one layer: keeps its input, and hooks its output's gradient to form the
        samples. One closure a layer, with what it needs bound once (this runs for every layer on
        every training forward)."""
        keep_low = isinstance(module, torch.nn.Linear)  # see kept_activations
        per_sample = self.per_sample
        add_samples = self._add_samples

        def output_grad_hook(kept, rows_per_pair, grad):
            add_samples(params, per_sample(module, kept, grad.detach(), rows_per_pair))

        def forward_hook(module, forward_input, output):
            if not (self.hooks_enabled and module.training and torch.is_grad_enabled()
                    and isinstance(output, torch.Tensor) and output.requires_grad):
                return
            for p in params:
                p._forward_counter += 1
            kept = [t.detach() for t in (self.kept_activations(module, forward_input) if keep_low else forward_input)]
            rows_per_pair = self.rows_per_pair
            output.register_hook(lambda grad: output_grad_hook(kept, rows_per_pair, grad))

        return forward_hook

    def backward(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` for the samples only. It differentiates towards the parameters with
        samples, so the backward of every layer that took part runs: a linear layer's own backward forms
        its samples and gives no parameter gradient; another layer's output hook forms its samples before
        its backward, whose parameter gradients are returned here and dropped. No ``p.grad`` is formed:
        DP-SGD never uses it. (A plain ``loss.backward()`` gives the same samples, and ``p.grad`` of the
        hooked layers.)"""
        if not self._sample_params:  # nothing trainable to form samples of
            loss.backward()
            return
        torch.autograd.grad(loss, self._sample_params, allow_unused=True)

    #: what one sample is made of, in rows; only pair samplers set it to anything but 1
    rows_per_pair = 1

    def per_sample(self, module, activations, backprops, rows_per_pair: int) -> dict:
        sampler = self.GRAD_SAMPLERS.get(type(module), ft_compute_per_sample_gradient)
        return sampler(module, activations, backprops)

    @staticmethod
    def kept_activations(module, forward_input):
        """Under autocast a linear layer multiplies in the autocast dtype, and its per-sample gradient
        casts the kept activations to the backprops' dtype (that one) anyway: they are kept in it. The
        samples are the same; the kept activations take half the memory of float32 ones."""
        if isinstance(module, torch.nn.Linear) and forward_input:
            kind = forward_input[0].device.type
            if torch.is_autocast_enabled(kind):
                low = torch.get_autocast_dtype(kind)
                return [t.to(low) if t.dtype in _AUTOCAST_ELIGIBLE else t for t in forward_input]
        return forward_input

    @property
    def module(self) -> torch.nn.Module:
        return self._module


#: what autocast casts to its low precision (it leaves float64 and integer tensors as they are)
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)


class _RestoreForward:
    """The handle of a replaced ``forward``: ``remove()`` gives the layer its class's forward back."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def remove(self) -> None:
        self.module.__dict__.pop("forward", None)


class _LinearSamples(torch.autograd.Function):
    """``linear(input, weight, bias)`` whose backward also forms the layer's per-sample gradients.

    Forward: the input is kept as :meth:`_OutputGradHooks.kept_activations` keeps it (in the autocast
    dtype under autocast, which is what the linear map multiplies in anyway, so the output is the
    same), with the weight (under autocast its cast, as autocast's linear keeps it) and the pair
    layout of this forward. Backward: the input's gradient ``grad @ weight`` (in the gradient's dtype,
    as autocast's linear computes it) and the samples, from the owner's sampler, added to the layer's
    samples of this backward. The parameters get no gradient: DP-SGD uses only the samples."""

    @staticmethod
    def forward(ctx, input, weight, bias, owner, module, params):
        kept = owner.kept_activations(module, [input])[0].detach()
        kind = input.device.type
        if torch.is_autocast_enabled(kind) and weight.dtype in _AUTOCAST_ELIGIBLE:
            # autocast's cast, done here to keep it for the input's gradient (as autocast's linear does)
            weight = weight.detach().to(torch.get_autocast_dtype(kind))
        ctx.save_for_backward(kept, weight)
        ctx.owner, ctx.module, ctx.params, ctx.rows_per_pair = owner, module, params, owner.rows_per_pair
        return torch.nn.functional.linear(kept, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        kept, weight = ctx.saved_tensors
        grad_input = grad @ weight.to(grad.dtype) if ctx.needs_input_grad[0] else None
        ctx.owner._add_samples(ctx.params, ctx.owner.per_sample(ctx.module, [kept], grad, ctx.rows_per_pair))
        return grad_input, None, None, None, None, None


class PairGradSampleModule(_OutputGradHooks):
    """Per-sample gradients whose samples are per *pair*: ``p.grad_sample`` has B rows for a batch of
    B pairs, whichever layout the forward ran. ``.module`` is the wrapped policy (the ``Reference`` is
    built on the policy before it is wrapped)."""

    def __init__(self, module: torch.nn.Module, strict: bool = True):
        super().__init__(module, strict=strict)
        #: rows per pair in the forward now running: 2 (chosen rows, then rejected rows) or 1 (one row
        #: per pair, the prompt shared); whoever runs the other layout sets it for its forward only
        self.rows_per_pair = 2
        for name, m in self._module.named_modules():
            own = [p for p in m.parameters(recurse=False) if p.requires_grad]
            if own and type(m) not in self.GRAD_SAMPLERS:
                raise NotImplementedError(f"DP-SGD: no per-pair gradient sampler for trainable module {name!r} "
                                          f"({type(m).__name__}); train LoRA adapters or supported layers")

    def per_sample(self, module, activations, backprops, rows_per_pair: int) -> dict:
        if isinstance(module, torch.nn.Linear):
            return pair_linear_grad_sample(module, activations, backprops, rows_per_pair)
        samples = self.GRAD_SAMPLERS[type(module)](module, activations, backprops)
        if rows_per_pair == 1:
            return samples
        return {p: fold_pair_rows(g) for p, g in samples.items()}


class RowGradSampleModule(_OutputGradHooks):
    """Per-row samples: the privacy unit is one row, e.g. one prompt's rollout in DP-PPO, where a row's
    loss (policy and value terms) depends on that row alone."""


def _pairs(rows: int, rows_per_pair: int = 2) -> int:
    if rows_per_pair == 1:
        return rows
    if rows_per_pair != 2 or rows % 2:
        raise ValueError(f"a pair batch must have an even number of rows (chosen then rejected), got {rows}")
    return rows // 2


def pair_linear_grad_sample(layer: torch.nn.Linear, activations: list[torch.Tensor], backprops: torch.Tensor,
                            rows_per_pair: int = 2) -> dict[torch.Tensor, torch.Tensor]:
    """Per-pair samples of a linear layer. One row per pair: each row's products. 2B rows: the chosen
    half's per-row products plus the rejected half's."""
    rows = backprops.shape[0]
    one_row = rows_per_pair == 1
    half = _pairs(rows, rows_per_pair)
    # [rows, positions, features]: any leading per-row dims (sequence positions) flattened.
    g = backprops.reshape(rows, -1, backprops.shape[-1])
    out = {}
    if layer.weight.requires_grad:
        a = activations[0].to(backprops.dtype)
        a = a.reshape(a.shape[0], -1, a.shape[-1])
        w = torch.bmm(g[:half].transpose(1, 2), a[:half])  # sum over positions of g a^T, chosen rows
        if not one_row:
            w.baddbmm_(g[half:].transpose(1, 2), a[half:])  # + the rejected rows, in place
        out[layer.weight] = w
    if layer.bias is not None and layer.bias.requires_grad:
        b = g.sum(1)
        out[layer.bias] = b if one_row else b[:half] + b[half:]
    return out


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
    """L2 norm of each sample's full gradient, over all parameters (in float32 at least)."""
    n = samples[0].shape[0]
    per_param = [torch.linalg.vector_norm(g.reshape(n, -1), dim=1) if g.dtype in _NORM_DTYPES
                 else torch.linalg.vector_norm(g.reshape(n, -1), dim=1, dtype=torch.float32) for g in samples]
    if len({x.dtype for x in per_param}) > 1:  # float32 and float64 parameters: the norms in float64
        per_param = [x.double() for x in per_param]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1)


_NORM_DTYPES = (torch.float32, torch.float64)


def clip_factors(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """min(1, C / norm), exactly (no epsilon in the denominator; a zero norm gives 1)."""
    return max_norm / norms.clamp_min(max_norm)


def clip_and_sum(samples: list[torch.Tensor], max_norm: float,
                 dtypes: list[torch.dtype] | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Clip each sample's full gradient to ``max_norm`` and sum over samples; returns (sums, norms).
    The sum of parameter ``i`` is flat (``numel`` long; the caller views it as the parameter) and in
    ``dtypes[i]`` (default: its samples' dtype)."""
    n = samples[0].shape[0]
    if n == 0:
        return [torch.zeros(math.prod(g.shape[1:]), dtype=(dtypes[i] if dtypes else g.dtype), device=g.device)
                for i, g in enumerate(samples)], torch.zeros(0)
    norms = per_sample_norms(samples)
    factors = clip_factors(norms, max_norm)
    cast: dict = {}  # the factors once per (device, dtype)
    sums = []
    for i, g in enumerate(samples):
        dtype = dtypes[i] if dtypes else g.dtype
        key = (g.device, dtype)
        f = cast.get(key)
        if f is None:
            f = cast[key] = factors.to(device=g.device, dtype=dtype)
        flat = g.reshape(n, -1)
        # the factor-weighted sum over samples as one vector-matrix product
        sums.append(f @ (flat if flat.dtype == dtype else flat.to(dtype)))
    return sums, norms
