"""DP-SGD DPO (props_ray.dpsgd): per-pair clipping, noise once per step, Poisson sampling, Ray Train.

1. per-pair clipped sums equal a torch.func reference (GPT-NeoX and GPT-2 LoRA), in both pair
   layouts (one row per pair with the prompt shared, and 2B rows), and per-row clipping does not;
2. (accounting: tests/test_accounting.py);
3./5. a real two-worker Ray Train run through the project's training loop: replicas
   stay identical, empty local Poisson batches neither hang nor desync, and a
   worker failure resumes the accountant from the checkpoint;
4. with two gloo processes the aggregated update's variance is sigma^2 C^2 / B^2
   (noise added once), not W times that;
6. DP training really moves the LoRA weights and the loss.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad, vmap

from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import dpo_loss, implicit_reward_margin
from props_ray.dpo.tokenize import PAIR_TENSORS
from props_ray.dpsgd.engine import DPSGDEngine
from props_ray.dpsgd.grad_sample import clip_factors
from props_ray.dpsgd.sampler import PoissonSampler, sampling_generator
from props_ray.embedded.model import build_tiny_model
from props_ray.modeling import LORA_TARGETS, Reference, save_policy
from props_ray.privacy.accounting import epsilon_after

VOCAB, LENGTH, BETA = 40, 12, 0.1
CPU = torch.device("cpu")


# --------------------------------------------------------------------------- helpers

def tiny_lora(kind: str, seed: int = 0, dtype=torch.float32, perturb: bool = True):
    """A tiny GPT-NeoX or GPT-2 with LoRA on the project's default targets (no dropout)."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    if kind == "gpt_neox":
        base = build_tiny_model(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2, seed=seed)
        targets = LORA_TARGETS["gpt_neox"] + ["lm_head"]  # what the embedded model trains
    else:
        base = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB, n_positions=32,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                          bos_token_id=1, eos_token_id=1))
        targets = LORA_TARGETS["gpt2"]
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    if perturb:  # LoRA B starts at zero, which makes every LoRA-A gradient zero: move off it
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.requires_grad and "lora_B" in n:
                    p.normal_(0.0, 0.2)
    return model.to(dtype).train()


def make_pairs(n: int, seed: int, easy: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded pairs of varying prompt/response lengths, like props_ray.dpo.tokenize produces.

    ``easy``: the chosen response is always token 7 repeated (learnable by DPO)."""
    g = torch.Generator().manual_seed(seed)
    out = {k: torch.zeros(n, LENGTH, dtype=torch.int64) for k in PAIR_TENSORS}
    for i in range(n):
        plen = int(torch.randint(2, 5, (1,), generator=g))
        prompt = torch.randint(2, VOCAB, (plen,), generator=g)
        for side in ("chosen", "rejected"):
            rlen = int(torch.randint(3, LENGTH - plen + 1, (1,), generator=g))
            resp = torch.randint(2, VOCAB, (rlen,), generator=g)
            if easy and side == "chosen":
                resp = torch.full((rlen,), 7)
            seq = torch.cat([prompt, resp])
            out[f"{side}_input_ids"][i, :len(seq)] = seq
            out[f"{side}_attention_mask"][i, :len(seq)] = 1
            out[f"{side}_loss_mask"][i, plen:len(seq)] = 1
    out["confidence"] = torch.ones(n)
    return out


def dpo_per_pair(model, reference: Reference, batch, share_prompt: bool = False) -> torch.Tensor:
    ref_c, ref_r = reference.pair_logprobs(batch)
    pol_c, pol_r = pair_logprobs(model, batch, share_prompt=share_prompt)
    return dpo_loss("sigmoid", implicit_reward_margin(pol_c, pol_r, ref_c, ref_r), BETA)


def trainable(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def functorch_per_pair_grads(policy, batch, ref_c, ref_r) -> dict[str, torch.Tensor]:
    """vmap(grad(loss of one pair)) over pairs, with functional_call on the trainable parameters.

    The log-probs are written out here over full-length logits, not taken from ``pair_logprobs``
    (whose response window is data-dependent and so cannot run under vmap). The attention mask is
    dropped inside vmap (transformers' mask code branches on data): with right padding and causal
    attention, real tokens never attend to padding, so the loss-masked log-probs are the same."""
    params = {n: p.detach() for n, p in trainable(policy).items()}

    def one_pair_loss(p, c_ids, c_att, c_lm, r_ids, r_att, r_lm, rc, rr):
        ids, lm = torch.stack([c_ids, r_ids]), torch.stack([c_lm, r_lm])
        logits = functional_call(policy, p, (), {"input_ids": ids}).logits[:, :-1]
        logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
        pc, pr = (logp * lm[:, 1:].to(logp.dtype)).sum(-1)
        return dpo_loss("sigmoid", implicit_reward_margin(pc[None], pr[None], rc[None], rr[None]), BETA).sum()

    args = [batch[k] for k in PAIR_TENSORS] + [ref_c, ref_r]
    return vmap(grad(one_pair_loss), in_dims=(None,) + (0,) * len(args))(params, *args)


def clipped_sum(per_sample: dict[str, torch.Tensor], c: float) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    names = list(per_sample)
    n = per_sample[names[0]].shape[0]
    norms = torch.stack([per_sample[k].reshape(n, -1).norm(dim=1) for k in names], 1).norm(dim=1)
    f = torch.clamp(c / norms, max=1.0)
    return {k: torch.einsum("i,i...->...", f, per_sample[k]) for k in names}, norms


def rel_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    x = torch.cat([a[k].reshape(-1) for k in sorted(a)])
    y = torch.cat([b[k].reshape(-1) for k in sorted(a)])
    return float((x - y).norm() / y.norm())


# --------------------------------------------------------------------------- 1. per-pair clipping

@pytest.mark.parametrize("layout", ["shared", "rows", "fallback"])
@pytest.mark.parametrize("kind", ["gpt_neox", "gpt2"])
def test_per_pair_clipped_sum_matches_torch_func(kind, layout):
    """``shared``: one row per pair (what DPO runs); ``rows``: 2B rows; ``fallback``: the shared layout
    asked for, but one pair's rows differ in their first token, so the batch takes 2B rows."""
    from props_ray.dpo.logprobs import shared_prefix

    policy = tiny_lora(kind, seed=1, dtype=torch.float64)
    batch = make_pairs(6, seed=2)
    if layout == "fallback":
        batch["rejected_input_ids"][3, 0] = 3 if int(batch["chosen_input_ids"][3, 0]) == 2 else 2
        assert shared_prefix(batch) is None
    else:
        assert shared_prefix(batch) is not None
    share = layout != "rows"
    reference = Reference(policy)
    ref_c, ref_r = reference.pair_logprobs(batch)
    per_pair = functorch_per_pair_grads(policy, batch, ref_c, ref_r)
    _, pair_norms = clipped_sum(per_pair, 1.0)
    assert (pair_norms > 0).all()
    small_c = 0.5 * float(pair_norms.median())  # clipping active for most pairs

    engine = DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=1e6, expected_batch_size=6, epochs=1,
                         noise_multiplier=0.0)
    model, optimizer = engine.wrap(policy, torch.optim.SGD(list(trainable(policy).values()), lr=0.0))
    names = {id(p): n for n, p in trainable(policy).items()}

    for c in (1e6, small_c):
        engine.max_grad_norm = optimizer.max_grad_norm = c
        optimizer.zero_grad()
        engine.backward(dpo_per_pair(model, reference, batch, share))  # the engine's own path: clip, sum
        got = {names[id(p)]: p.summed_grad.detach().clone() for p in optimizer.params}
        want, _ = clipped_sum(per_pair, c)
        assert rel_diff(got, want) < 1e-6, (kind, c)
        assert all(p.grad is None and p.grad_sample is None for p in optimizer.params)
    assert (pair_norms > small_c).sum() >= 3  # the second round really clipped

    # The samples really are per pair: B of them, for a forward of B rows or of 2B rows.
    optimizer.zero_grad()
    dpo_per_pair(model, reference, batch, share).sum().backward()
    assert {p.grad_sample.shape[0] for p in optimizer.params} == {6}
    optimizer.zero_grad()
    if layout != "rows":
        return

    # Control: clipping the chosen and the rejected row of a pair separately must NOT match. Per-row
    # samples from stock Opacus on an identical policy (same seed).
    from opacus import GradSampleModule

    row_policy = tiny_lora(kind, seed=1, dtype=torch.float64)
    assert all(torch.equal(p, trainable(policy)[n]) for n, p in trainable(row_policy).items())
    row_model = GradSampleModule(row_policy, batch_first=True, loss_reduction="sum")
    dpo_per_pair(row_model, Reference(row_policy), batch).sum().backward()
    row_names = {id(p): n for n, p in trainable(row_policy).items()}
    rows = {row_names[id(p)]: p.grad_sample.detach().clone() for p in trainable(row_policy).values()}
    assert {g.shape[0] for g in rows.values()} == {12}  # 2B rows, unfolded
    unclipped_rows, _ = clipped_sum(rows, 1e12)
    assert rel_diff(unclipped_rows, clipped_sum(per_pair, 1e12)[0]) < 1e-6  # same gradient, before clipping
    per_row, _ = clipped_sum(rows, small_c)
    assert rel_diff(per_row, clipped_sum(per_pair, small_c)[0]) > 1e-2


@pytest.mark.parametrize("backward", ["module", "plain"])
def test_per_pair_samples_of_every_layer_type_match_torch_func(backward):
    """Linear layers (with bias) take the direct per-pair path; embeddings and layer norms take
    Opacus's per-row samplers folded in the hook. Both against vmap(grad) over pairs, through the
    module's backward (what the engine runs) and a plain ``loss.backward()``."""
    from props_ray.dpsgd.grad_sample import PairGradSampleModule

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Embedding(11, 6), torch.nn.LayerNorm(6), torch.nn.Linear(6, 5),
                              torch.nn.Tanh(), torch.nn.Linear(5, 1)).double()
    b, t = 5, 4
    ids = torch.randint(0, 11, (2 * b, t))  # rows 0..b-1 chosen, b..2b-1 rejected

    def pair_loss(params, chosen, rejected):
        rows = functional_call(net, params, (torch.stack([chosen, rejected]),)).sum(dim=(1, 2))
        return torch.nn.functional.logsigmoid(rows[0] - rows[1]).neg()

    params = {n: p.detach() for n, p in net.named_parameters()}
    want = vmap(grad(pair_loss), in_dims=(None, 0, 0))(params, ids[:b], ids[b:])

    model = PairGradSampleModule(net)
    rows = model(ids).sum(dim=(1, 2))
    loss = torch.nn.functional.logsigmoid(rows[:b] - rows[b:]).neg().sum()
    model.backward(loss) if backward == "module" else loss.backward()
    for n, p in net.named_parameters():
        assert p.grad_sample.shape == (b, *p.shape), n
        assert torch.allclose(p.grad_sample, want[n], atol=1e-10), n


def test_a_layer_used_twice_in_one_forward_sums_its_samples_and_backward_passes_stack():
    """A linear layer applied twice in one forward (tied weights): its per-pair sample is the sum over
    both uses, against vmap(grad); a second forward and backward before clearing adds B more samples
    (Opacus's list), not a sum into the first ones. Both layouts."""
    from props_ray.dpsgd.grad_sample import PairGradSampleModule, per_pair_grad_sample

    torch.manual_seed(0)
    lin = torch.nn.Linear(4, 4).double()
    b, t = 3, 5

    def rows_out(module, x):
        return module(torch.tanh(module(x))).sum(dim=(1, 2))  # rows 0..b-1 chosen, b..2b-1 rejected

    def pair_loss(params, chosen, rejected):
        rows = functional_call(lin, params, (torch.stack([chosen, rejected]),))
        rows = functional_call(lin, params, (torch.tanh(rows),)).sum(dim=(1, 2))
        return torch.nn.functional.logsigmoid(rows[0] - rows[1]).neg()

    x = torch.randn(2 * b, t, 4, dtype=torch.float64)
    params = {n: p.detach() for n, p in lin.named_parameters()}
    want = vmap(grad(pair_loss), in_dims=(None, 0, 0))(params, x[:b], x[b:])
    model = PairGradSampleModule(lin)
    for rows_per_pair in (2, 1):
        model.rows_per_pair = rows_per_pair
        for _ in range(2):
            if rows_per_pair == 2:
                out = rows_out(model, x)
                chosen, rejected = out[:b], out[b:]
            else:  # one row per pair: the pair's two sequences side by side in one row (no mixing here)
                out = model(torch.tanh(model(torch.cat([x[:b], x[b:]], 1))))
                chosen, rejected = out[:, :t].sum(dim=(1, 2)), out[:, t:].sum(dim=(1, 2))
            torch.nn.functional.logsigmoid(chosen - rejected).neg().sum().backward()
        for n, p in lin.named_parameters():
            got = per_pair_grad_sample(p)
            assert got.shape == (2 * b, *p.shape), n
            assert torch.allclose(got[:b], want[n], atol=1e-10) and torch.allclose(got[b:], want[n], atol=1e-10), n
            p.grad_sample = None
        model.rows_per_pair = 2


def test_under_autocast_linear_activations_are_kept_in_the_low_precision_with_the_same_samples(monkeypatch):
    """bf16 autocast (CPU here, CUDA in jobs): the hook keeps a linear layer's input in bf16, and the per-pair
    samples equal those from float32-kept activations exactly (the sampler casts them to bf16 anyway)."""
    from props_ray.dpsgd import grad_sample
    from props_ray.dpsgd.grad_sample import PairGradSampleModule

    def samples(keep_low: bool):
        policy = tiny_lora("gpt_neox", seed=3)
        if not keep_low:  # the input as it came: float32
            monkeypatch.setattr(PairGradSampleModule, "kept_activations", staticmethod(lambda module, x: x))
        model = PairGradSampleModule(policy)
        seen = []  # the dtype of what the backward receives as lora_A's input
        lora_a = next(m for n, m in policy.named_modules() if n.endswith("lora_A.default"))
        real = grad_sample.pair_linear_grad_sample

        def recording(layer, activations, *args):
            if layer is lora_a:
                seen.append(activations[0].dtype)
            return real(layer, activations, *args)

        monkeypatch.setattr(grad_sample, "pair_linear_grad_sample", recording)
        batch = make_pairs(4, seed=5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            per_pair = dpo_per_pair(model, Reference(policy), batch)
        per_pair.sum().backward()
        monkeypatch.undo()
        assert seen
        return {n: p.grad_sample.clone() for n, p in trainable(policy).items()}, seen

    low, low_dtypes = samples(keep_low=True)
    full, full_dtypes = samples(keep_low=False)
    assert set(low_dtypes) == {torch.bfloat16} and set(full_dtypes) == {torch.float32}
    for n in full:
        assert torch.equal(low[n], full[n]), n


class _HookedLinear(torch.nn.Linear):
    """A linear layer with a forward of its own: PairGradSampleModule forms its samples in hooks, not
    in the linear layers' own backward."""

    def forward(self, input):
        return super().forward(input)


@pytest.mark.parametrize("precision", ["float64", "bf16-autocast"])
def test_linear_layers_own_backward_gives_the_hooks_samples_and_input_gradients(precision, monkeypatch):
    """A trainable nn.Linear forms its samples in its own backward (_LinearSamples), which also gives
    its input's gradient. Against the hook path (the same net with the linear layers' forward
    overridden): the output, and every layer's samples (the first layer's depend on the input gradients
    the later layers pass back), in float64 and under bf16 autocast, where the input gradient must be
    computed in bf16 as autocast's linear computes it. The net's input needs no gradient, so nothing
    but the samples needs the first layer's backward to run: the module's backward runs it all the same.
    And remove_hooks() gives the class's forward back."""
    from props_ray.dpsgd.grad_sample import PairGradSampleModule, _LinearSamples

    samplers = PairGradSampleModule.GRAD_SAMPLERS  # Opacus's registry: the subclass is a linear layer too
    monkeypatch.setitem(samplers, _HookedLinear, samplers[torch.nn.Linear])

    def run(linear_type):
        torch.manual_seed(0)
        net = torch.nn.Sequential(linear_type(6, 8), torch.nn.Tanh(), linear_type(8, 8), torch.nn.Tanh(),
                                  linear_type(8, 1, bias=False))
        x = torch.randn(10, 3, 6)  # 5 pairs of 2 rows
        if precision == "float64":
            net, x = net.double(), x.double()
        model = PairGradSampleModule(net)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision != "float64"):
            out = model(x)
        rows = out.float().sum(dim=(1, 2))
        model.backward(torch.nn.functional.logsigmoid(rows[:5] - rows[5:]).neg().sum())
        samples = {n: p.grad_sample for n, p in net.named_parameters()}
        assert all(p.grad is None for p in net.parameters())  # no summed gradient is formed
        return model, net, out, samples

    model, net, out, own = run(torch.nn.Linear)
    assert isinstance(out.grad_fn, _LinearSamples._backward_cls)
    _, _, hooked_out, hooked = run(_HookedLinear)
    assert out.dtype == hooked_out.dtype and torch.equal(out, hooked_out)
    assert set(own) == set(hooked)
    for n in own:
        assert own[n].shape[0] == 5, n
        assert torch.equal(own[n], hooked[n]), n
    model.remove_hooks()
    assert all("forward" not in m.__dict__ for m in net.modules())


def test_under_autocast_a_linear_layer_keeps_one_low_precision_copy_of_its_input():
    """What a trainable linear layer's training forward keeps for the backward under bf16 autocast: its
    input once, in bf16, and its weight's bf16 cast (as autocast's own linear keeps them), with no hook
    on the layer keeping anything beside autograd (a forward hook beside autograd's linear kept a
    second bf16 copy of the input)."""
    from props_ray.dpsgd.grad_sample import PairGradSampleModule

    torch.manual_seed(0)
    lin = torch.nn.Linear(6, 8, bias=False)
    model = PairGradSampleModule(lin)
    x = torch.randn(4, 3, 6, requires_grad=True)  # an input gradient to form too, as inside a network
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t), \
            torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    assert not lin._forward_hooks and not lin._forward_pre_hooks
    assert [(t.dtype, t.numel()) for t in saved] == [(torch.bfloat16, x.numel()), (torch.bfloat16, lin.weight.numel())]
    assert torch.equal(saved[0].reshape(x.shape), x.detach().to(torch.bfloat16))
    assert torch.equal(saved[1], lin.weight.detach().to(torch.bfloat16))


def test_autocast_leaves_a_float64_linear_layer_and_its_samples_as_they_are():
    """Autocast casts float32 (and half) tensors only: a float64 layer under autocast runs, and forms its
    samples, in float64, the same as without autocast."""
    from props_ray.dpsgd.grad_sample import PairGradSampleModule

    def samples(autocast: bool):
        torch.manual_seed(0)
        lin = torch.nn.Linear(6, 3).double()
        model = PairGradSampleModule(lin)
        x = torch.randn(8, 2, 6, dtype=torch.float64, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = model(x)
        rows = out.sum(dim=(1, 2))
        model.backward(torch.nn.functional.logsigmoid(rows[:4] - rows[4:]).neg().sum())
        return out, {n: p.grad_sample for n, p in lin.named_parameters()}

    (out, got), (want_out, want) = samples(True), samples(False)
    assert out.dtype == torch.float64 and torch.equal(out, want_out)
    assert all(torch.equal(got[n], want[n]) for n in want)


def test_per_pair_samples_refuse_an_odd_number_of_rows():
    from props_ray.dpsgd.grad_sample import PairGradSampleModule

    model = PairGradSampleModule(torch.nn.Linear(3, 1))
    with pytest.raises(ValueError, match="even number of rows"):
        model(torch.randn(3, 3)).sum().backward()


def test_clip_factor_is_exact_min_one_c_over_norm():
    norms = torch.tensor([0.0, 0.5, 1.0, 4.0], dtype=torch.float64)
    assert clip_factors(norms, 1.0).tolist() == [1.0, 1.0, 1.0, 0.25]


# --------------------------------------------------------------------------- 6. training moves things

def test_dp_training_moves_lora_weights_and_loss(tmp_path):
    from peft import PeftModel

    torch.manual_seed(0)
    policy = tiny_lora("gpt_neox", seed=3, perturb=False)
    shard = make_pairs(64, seed=4, easy=True)
    reference = Reference(policy)
    init = {n: p.detach().clone() for n, p in trainable(policy).items()}
    ref_before = reference.pair_logprobs(shard)

    def mean_loss(model) -> float:
        with torch.no_grad():
            return float(dpo_per_pair(model, reference, shard).mean())

    # a fixed sigma (calibration is tested in test_accounting.py and in the Ray run; it costs seconds)
    engine = DPSGDEngine(target_epsilon=8.0, delta=1e-3, max_grad_norm=1.0, expected_batch_size=16, epochs=4,
                         physical_batch_size=6, noise_multiplier=0.8)
    model, optimizer = engine.wrap(policy, torch.optim.AdamW(list(trainable(policy).values()), lr=0.02))
    before = mean_loss(model)
    engine.start_stage(1, shard, CPU)
    for epoch in range(4):
        for physical in engine.logical_batches(shard, epoch, CPU):
            for b in physical:
                engine.backward(dpo_per_pair(model, reference, b))
            engine.step(model, optimizer)
    m = engine.metrics()
    assert m["steps"] == m["planned_steps"] == 16 and m["noise_multiplier"] == 0.8
    assert m["sample_rate"] == 0.25
    assert m["epsilon"] == pytest.approx(epsilon_after(16, 0.25, 0.8, 1e-3, "prv"))
    after = mean_loss(model)
    assert after < before - 0.1, (before, after)  # log 2 = 0.693 at the start
    for n, p in trainable(policy).items():
        assert not torch.equal(p.detach(), init[n]), f"{n} did not change"
    # The no-grad reference pass (adapters disabled) through the hooked model records nothing,
    # and the reference itself did not move.
    ref_after = reference.pair_logprobs(shard)
    assert torch.allclose(ref_before[0], ref_after[0]) and torch.allclose(ref_before[1], ref_after[1])
    assert not any(getattr(mod, "activations", None) for mod in policy.modules())
    assert all(p.grad_sample is None for p in trainable(policy).values())
    # What the loop checkpoints is the trained adapter.
    save_policy(model, tmp_path / "adapter")
    base = tiny_lora("gpt_neox", seed=3, perturb=False).base_model.model
    for p in base.parameters():
        p.requires_grad_(False)
    loaded = PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    for n, p in trainable(policy).items():
        assert torch.equal(dict(loaded.named_parameters())[n], p.detach())


# --------------------------------------------------------------------------- 4. noise once, two ranks

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _noise_worker(rank: int, world: int, port: int, out: str, sigma: float, c: float, steps: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    try:
        policy = tiny_lora("gpt_neox", seed=10 + rank)  # different init per rank: wrap() must broadcast
        shard = make_pairs(4, seed=20 + rank)  # this rank's disjoint shard
        reference = Reference(policy)
        # expected batch = all 8 pairs -> q = 1: every step sees the same pairs; lr 0 keeps the params,
        # so the clipped sum S is the same every step and all the spread is noise.
        engine = DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=c, expected_batch_size=4 * world,
                             epochs=1, noise_multiplier=sigma)
        model, optimizer = engine.wrap(policy, torch.optim.SGD(list(trainable(policy).values()), lr=0.0))
        engine.start_stage(1, shard, CPU)
        grads, local = [], []

        def hook(opt):
            grads.append(torch.cat([p.grad.reshape(-1) for p in opt.params]).clone())
            local.append(torch.cat([p.summed_grad.reshape(-1) for p in opt.params]).clone())

        optimizer.attach_step_hook(hook)
        for t in range(steps):  # one logical step per "epoch" (planned = round(1 * 8 / 8) = 1)
            for physical in engine.logical_batches(shard, t, CPU):
                for b in physical:
                    engine.backward(dpo_per_pair(model, reference, b))
                engine.step(model, optimizer)
        params = torch.cat([p.detach().reshape(-1) for p in trainable(policy).values()])
        np.savez(Path(out) / f"rank{rank}.npz", grads=torch.stack(grads).numpy(), local=local[0].numpy(),
                 q=engine.accounting.stages[1].sample_rate, params=params.numpy())
    finally:
        dist.destroy_process_group()


def test_noise_added_once_across_two_ranks(tmp_path):
    from scipy.stats import chi2

    sigma, c, steps, world = 0.5, 1e-3, 150, 2
    batch = 4 * world
    torch.multiprocessing.spawn(_noise_worker, args=(world, _free_port(), str(tmp_path), sigma, c, steps),
                                nprocs=world, join=True)
    r0, r1 = (np.load(tmp_path / f"rank{r}.npz") for r in range(world))
    assert float(r0["q"]) == 1.0
    assert np.array_equal(r0["params"], r1["params"])  # different seeds per rank, broadcast at wrap()
    g = r0["grads"].astype(np.float64)  # [steps, D]: the aggregated update of every step
    assert np.array_equal(g, r1["grads"])  # every rank applies the same update
    steps_, dim = g.shape
    # c is tiny, so every pair is clipped to norm exactly c: |S_r| <= 4c, and S is constant
    signal = (r0["local"].astype(np.float64) + r1["local"]) / batch  # SUM over ranks / global B
    assert 0 < np.linalg.norm(r0["local"]) <= 4 * c * (1 + 1e-5)
    resid = g - g.mean(0)
    var_unit = (sigma * c / batch) ** 2  # noise added once: N(0, sigma^2 c^2) / B per coordinate
    stat = float((resid ** 2).sum() / var_unit)
    dof = dim * (steps_ - 1)
    lo, hi = chi2.ppf(1e-6, dof), chi2.ppf(1 - 1e-6, dof)
    assert lo < stat < hi, f"variance ratio {stat / dof:.4f} (1 = noise once, {world} = noise on every rank)"
    assert not (chi2.ppf(1e-6, dof) < stat / world < chi2.ppf(1 - 1e-6, dof))
    # the mean update is the SUM of the ranks' clipped sums over the global expected batch size
    z2 = ((g.mean(0) - signal) ** 2).sum() / (var_unit / steps_)
    assert chi2.ppf(1e-6, dim) < z2 < chi2.ppf(1 - 1e-6, dim), z2 / dim


# --------------------------------------------------------------------------- 3./5. Ray Train, two workers

FAIL_AT = "2:27"  # stage 2, global step 27: mid second epoch of stage 2 (stage 1: 8 steps, stage 2: 16/epoch)


@pytest.fixture(scope="module")
def ray_cluster():
    """A local Ray for this module (started and stopped here, or reused if one is already up)."""
    import ray

    from props_ray.ray_runtime import ensure_ray

    started = not ray.is_initialized()
    if started:
        ensure_ray(num_workers=2)  # 4 logical CPUs on a 2-core machine
    yield
    if started:
        ray.shutdown()


@pytest.fixture(scope="module")
def ray_dpsgd_run(ray_cluster, tmp_path_factory):
    """fit_stages with method dpsgd: stage 1 has 4 pairs (2 per worker, q = 1/4: many empty local
    batches), stage 2 has 16; physical batches of 1 pair; one injected failure in stage 2."""
    import ray.data

    from props_ray.config import validate_job
    from props_ray.train.trainer import fit_stages

    out = tmp_path_factory.mktemp("dpsgd-ray")
    base = out / "base"
    build_tiny_model(vocab_size=VOCAB, hidden_size=32, num_layers=1, num_heads=2).save_pretrained(base)
    cfg = validate_job({
        "name": "dpsgd-ray", "seed": 0, "output_dir": str(out), "stages": 2,
        "model": {"lora": {"r": 4, "alpha": 8}},
        "train": {"num_workers": 2, "batch_size": 2, "epochs": 2, "lr": 0.01, "log_every": 2, "max_failures": 1},
        "privacy": {"epsilons": [1.0], "dpsgd": {"expected_batch_size": 1, "physical_batch_size": 1}},
        "methods": [{"method": "dpsgd"}],
        "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
    })

    def dataset(n, seed):
        t = make_pairs(n, seed, easy=True)
        return ray.data.from_items([{k: v[i].numpy() for k, v in t.items()} for i in range(n)])

    def fit():
        return fit_stages(cfg, run_name="dpsgd-ray-test", trial="dpsgd-eps1", method="dpsgd", stages=[1, 2],
                          datasets={1: dataset(4, 1), 2: dataset(16, 2)}, base_path=str(base), init_adapter=None,
                          loss="sigmoid", flip_rate=None, num_pairs=20, extra={"epsilon": 1.0, "total_pairs": 20})

    old = os.environ.get("PROPS_RAY_FAIL_AT")
    os.environ["PROPS_RAY_FAIL_AT"] = FAIL_AT  # one injected worker failure (the driver passes it on)
    try:
        with concurrent.futures.ThreadPoolExecutor(1) as pool:  # a desync would hang: fail instead
            checkpoints = pool.submit(fit).result(timeout=420)
    finally:
        if old is None:
            os.environ.pop("PROPS_RAY_FAIL_AT", None)
        else:
            os.environ["PROPS_RAY_FAIL_AT"] = old
    return cfg, checkpoints


def test_ray_two_workers_stay_identical_and_survive_empty_batches(ray_dpsgd_run):
    cfg, (ck1, ck2) = ray_dpsgd_run
    for ck in (ck1, ck2):
        assert ck.metrics["replicas_in_sync"] == 1
        if "rank_param_spread" in ck.metrics and ck.metrics["rank_param_spread"] is not None:
            assert ck.metrics["rank_param_spread"] == 0.0
    rows = [json.loads(x) for x in ck2.metrics_path.read_text().splitlines()]
    assert rows and all(r["replicas_in_sync"] == 1 for r in rows)
    # stage 1 really had steps where one rank's Poisson batch was empty and the other's was not
    asym = 0
    for epoch in range(2):
        s = [PoissonSampler(2, 0.25, sampling_generator(0, 1, epoch, r, False)) for r in range(2)]
        for _ in range(4):
            sizes = [x.sample().numel() for x in s]
            asym += (min(sizes) == 0 < max(sizes))
    assert asym >= 1
    assert ck1.metrics["empty_local_batches"] > 0
    assert ck1.metrics["steps"] == ck1.metrics["planned_steps"] == 8
    assert ck2.metrics["steps"] == ck2.metrics["planned_steps"] == 32
    # the trained adapter differs from LoRA's zero-initialised B
    from safetensors.torch import load_file

    weights = load_file(str(Path(ck2.model_path) / "adapter_model.safetensors"))
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in weights.items())


def test_ray_accounting_per_stage_and_resume(ray_dpsgd_run):
    cfg, (ck1, ck2) = ray_dpsgd_run
    state = torch.load(Path(ck2.path) / "train_state.pt", weights_only=False)
    stages = state["engine"]["accounting"]["stages"]
    delta = state["engine"]["accounting"]["delta"]
    assert delta == pytest.approx(20 ** -1.1) and delta < 1 / 20  # the default, strictly below 1/N
    eps = {}
    for k, n, steps in (("1", 4, 8), ("2", 16, 32)):
        p = stages[k]
        assert p["num_pairs"] == n and p["sample_rate"] == pytest.approx(1 / n)
        assert sum(h[2] for h in p["history"]) == steps == p["planned_steps"]
        eps[k] = epsilon_after(steps, p["sample_rate"], p["noise_multiplier"], delta, "prv")
        assert 0.99 <= eps[k] <= 1.0  # each stage calibrated to the target for its own (q, T)
    assert ck2.metrics["epsilon"] == pytest.approx(max(eps.values()))  # max over disjoint stages
    # The run survived one injected worker failure in stage 2's second epoch: it resumed from the
    # stage-2 epoch-0 checkpoint, so the step counts above (8 and 32, neither reset nor double
    # counted) come from the accountant state restored from that checkpoint.
    assert list(cfg.job_dir.resolve().glob(".fault-injected*")), "the injected worker failure did not happen"


# --------------------------------------------------------------------------- 7. where the randomness comes from

def test_secure_noise_comes_from_the_csprng_with_the_stated_scale():
    """Secure noise ignores any torch generator (nothing seeded can replay it) and has std sigma*C."""
    from scipy.stats import chi2

    from props_ray.dpsgd.engine import gaussian_noise

    ref = torch.zeros(200_000)
    a = gaussian_noise(0.7, ref, torch.Generator().manual_seed(1), secure=True)
    b = gaussian_noise(0.7, ref, torch.Generator().manual_seed(1), secure=True)
    assert not torch.equal(a, b)
    stat = float((a.double() ** 2).sum() / 0.7 ** 2)
    assert chi2.ppf(1e-6, a.numel()) < stat < chi2.ppf(1 - 1e-6, a.numel())
    assert abs(float(a.double().mean())) < 5 * 0.7 / a.numel() ** 0.5
    seeded = [gaussian_noise(0.7, ref, torch.Generator().manual_seed(1), secure=False) for _ in range(2)]
    assert torch.equal(*seeded)  # seeded: replayable, which is why it is not private


def test_secure_sampling_coins_come_from_the_csprng():
    from props_ray.dpsgd.sampler import CSPRNGCoins

    coins = sampling_generator(0, 1, 0, 0, secure=True)
    assert isinstance(coins, CSPRNGCoins)
    draws = [PoissonSampler(5000, 0.3, sampling_generator(0, 1, 0, 0, secure=True)).sample() for _ in range(2)]
    assert not torch.equal(*draws)
    assert abs(len(draws[0]) / 5000 - 0.3) < 0.03


def test_seeded_streams_differ_per_trial_and_epsilon():
    from props_ray.config import validate_job
    from props_ray.dpsgd.engine import stream_id

    cfg = validate_job({"name": "s", "methods": [{"method": "dpsgd"}], "privacy": {"epsilons": [0.5, 1.0]}})
    engines = {(trial, eps): DPSGDEngine.from_config(cfg, 1, {"trial": trial, "epsilon": eps, "num_pairs": 1000})
               for trial, eps in (("dpsgd-eps0.5", 0.5), ("dpsgd-eps1", 1.0), ("dpsgd-eps0.5-seed1", 0.5))}
    streams = {k: e.stream for k, e in engines.items()}
    assert len(set(streams.values())) == 3 and streams[("dpsgd-eps0.5", 0.5)] == stream_id("dpsgd-eps0.5", 0.5)

    def coins(stream):
        return PoissonSampler(2000, 0.5, sampling_generator(0, 1, 0, 0, False, stream)).sample()

    assert torch.equal(coins(streams[("dpsgd-eps1", 1.0)]), coins(streams[("dpsgd-eps1", 1.0)]))  # replayable
    assert not torch.equal(coins(streams[("dpsgd-eps0.5", 0.5)]), coins(streams[("dpsgd-eps1", 1.0)]))


def test_noise_for_all_parameters_is_one_draw_cut_into_their_shapes():
    """One draw over every parameter's coordinates: independent N(0, std^2) entries, the parameters'
    shapes, replayable from a seeded generator; mixed dtypes fall back to a draw per parameter."""
    from scipy.stats import chi2

    from props_ray.dpsgd.engine import gaussian_noise_like

    shapes = [(300, 40), (7,), (50, 3, 20)]
    like = [torch.zeros(s) for s in shapes]
    noise = gaussian_noise_like(0.3, like, torch.Generator().manual_seed(3), secure=False)
    assert [tuple(z.shape) for z in noise] == shapes
    flat = torch.cat([z.reshape(-1) for z in noise]).double()
    stat = float((flat ** 2).sum() / 0.3 ** 2)
    assert chi2.ppf(1e-6, flat.numel()) < stat < chi2.ppf(1 - 1e-6, flat.numel())
    # no two parameters get the same stretch of the draw
    assert not torch.equal(noise[0].reshape(-1)[:7], noise[1])
    again = gaussian_noise_like(0.3, like, torch.Generator().manual_seed(3), secure=False)
    assert all(torch.equal(a, b) for a, b in zip(noise, again))
    mixed = gaussian_noise_like(0.3, [torch.zeros(5), torch.zeros(4, dtype=torch.float64)], None, secure=True)
    assert [z.dtype for z in mixed] == [torch.float32, torch.float64]
