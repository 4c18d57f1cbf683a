"""DPO losses against hand-computed values, and LoRA training that really moves weights."""

import math

import pytest
import torch

from props_ray.dpo.losses import dpo_loss, implicit_reward_margin, robust_loss, sigmoid_loss, soft_loss


def _lsig(x):
    return math.log(1 / (1 + math.exp(-x)))


def test_margin_and_sigmoid_loss_hand_computed():
    h = implicit_reward_margin(torch.tensor([-3.0]), torch.tensor([-5.0]), torch.tensor([-4.0]), torch.tensor([-4.5]))
    assert h.item() == pytest.approx((-3 + 4) - (-5 + 4.5))  # 1.5
    assert sigmoid_loss(h, 0.1).item() == pytest.approx(-_lsig(0.15))
    assert sigmoid_loss(torch.tensor([0.0]), 1.0).item() == pytest.approx(math.log(2))


def test_robust_loss_hand_computed_and_unbiased():
    h, b, g = torch.tensor([2.0]), 0.5, 0.2
    expected = ((1 - g) * -_lsig(1.0) - g * -_lsig(-1.0)) / (1 - 2 * g)
    assert robust_loss(h, b, g).item() == pytest.approx(expected)
    # unbiased: E over the flip of the robust loss equals the clean loss
    hs = torch.linspace(-3, 3, 13)
    avg = (1 - g) * robust_loss(hs, b, g) + g * robust_loss(-hs, b, g)
    torch.testing.assert_close(avg, sigmoid_loss(hs, b))
    with pytest.raises(ValueError):
        robust_loss(h, b, 0.5)


def test_soft_loss_hand_computed():
    h, c = torch.tensor([1.0, 1.0, -2.0]), torch.tensor([1.0, 0.7, 0.5])
    got = soft_loss(h, 1.0, c)
    assert got[0].item() == pytest.approx(-_lsig(1.0))
    assert got[1].item() == pytest.approx(-(0.7 * _lsig(1.0) + 0.3 * _lsig(-1.0)))
    assert got[2].item() == pytest.approx(-(0.5 * _lsig(-2.0) + 0.5 * _lsig(2.0)))


def test_dpo_loss_dispatch_errors():
    h = torch.zeros(2)
    with pytest.raises(ValueError, match="flip rate"):
        dpo_loss("robust", h, 0.1)
    with pytest.raises(ValueError, match="confidence"):
        dpo_loss("soft", h, 0.1)
    with pytest.raises(ValueError, match="unknown"):
        dpo_loss("ipo", h, 0.1)


def test_lora_weights_change_and_loss_falls(tmp_path):
    """A few DPO steps on a LoRA policy change the adapter and lower the loss; the base stays frozen."""
    from props_ray.config import ModelConfig
    from props_ray.dpo.logprobs import pair_logprobs
    from props_ray.dpo.tokenize import tokenize_pairs
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.modeling import Reference, build_policy

    task = EmbeddedTask()
    tok = build_tokenizer(task)
    build_tiny_model(len(tok), 32, 1, 2).save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig()
    policy = build_policy(str(tmp_path), cfg)
    ref = Reference.for_policy(policy, cfg, str(tmp_path))
    df = task.preference_pairs(64, 0)
    batch = {k: torch.from_numpy(v) for k, v in tokenize_pairs(tok, df.prompt, df.chosen, df.rejected, 8, 8).items()}
    before = {n: p.detach().clone() for n, p in policy.named_parameters()}
    opt = torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(15):
        rc, rr = ref.pair_logprobs(batch)
        pc, pr = pair_logprobs(policy, batch)
        loss = sigmoid_loss(implicit_reward_margin(pc, pr, rc, rr), 0.5).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(math.log(2), abs=1e-4)  # policy == reference at the start
    assert losses[-1] < losses[0] - 0.05
    changed = [n for n, p in policy.named_parameters() if not torch.equal(p, before[n])]
    assert changed and all("lora_" in n for n in changed)
    assert any("lm_head" in n for n in changed)  # the embedded default adapts the output head too
    # The reference is still the base model, and its pass leaves the policy as it found it.
    base = build_policy(str(tmp_path), ModelConfig(lora={"enabled": False}), trainable=False).eval()
    with torch.no_grad():
        bc, br = pair_logprobs(base, batch)
    rc, rr = ref.pair_logprobs(batch)
    torch.testing.assert_close((rc, rr), (bc, br))
    assert policy.training
    assert [n for n, p in policy.named_parameters() if p.requires_grad] == \
        [n for n in before if "lora_" in n]
    pc, _ = pair_logprobs(policy, batch)
    assert (pc - rc).abs().max() > 1e-3  # the adapters are back on


@pytest.mark.parametrize("lora", [True, False])
def test_reference_logits_are_the_base_model_after_the_policy_moves(tmp_path, lora):
    """PPO's KL reference: with LoRA the adapters switched off, with full fine-tuning a frozen copy of the
    base; either way the base model's logits, however far the policy has moved."""
    from props_ray.config import ModelConfig
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.modeling import Reference, build_policy

    tok = build_tokenizer(EmbeddedTask())
    build_tiny_model(len(tok), 32, 1, 2).save_pretrained(tmp_path)
    cfg = ModelConfig(lora={"enabled": lora})
    policy = build_policy(str(tmp_path), cfg)
    reference = Reference.for_policy(policy, cfg, str(tmp_path))
    ids = torch.randint(0, len(tok), (3, 7), generator=torch.Generator().manual_seed(0))
    att = torch.ones_like(ids)
    with torch.no_grad():
        for p in policy.parameters():
            if p.requires_grad:
                p.add_(0.5)
        moved = policy(input_ids=ids, attention_mask=att).logits
    base = build_policy(str(tmp_path), ModelConfig(lora={"enabled": False}), trainable=False).eval()
    with torch.no_grad():
        want = base(input_ids=ids, attention_mask=att).logits
    torch.testing.assert_close(reference.logits(ids, att), want)
    assert not torch.allclose(moved, want)
    assert policy.training


def _full_logits_logprobs(model, ids, att, mask):
    """Every position through the LM head, the sum taken over response tokens: what the window replaces."""
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    logp = torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), -1)
    return (logp.gather(-1, ids[:, 1:, None]).squeeze(-1) * mask[:, 1:]).sum(-1)


def _tiny_lora_policy(tmp_path, perturb: bool = True):
    """The embedded tiny model with LoRA in float64, seeded (weights and adapters do not depend on the
    tests that ran before), its adapters moved off zero so their gradients are not trivial; and the
    tokenizer."""
    from props_ray.config import ModelConfig
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.modeling import build_policy

    tok = build_tokenizer(EmbeddedTask())
    with torch.random.fork_rng():
        torch.manual_seed(0)
        build_tiny_model(len(tok), 32, 2, 2).save_pretrained(tmp_path)
        tok.save_pretrained(tmp_path)
        policy = build_policy(str(tmp_path), ModelConfig()).double()
        if perturb:
            with torch.no_grad():
                for n, p in policy.named_parameters():
                    if "lora_B" in n:
                        p.normal_(0, 0.1)
    return policy, tok


@pytest.mark.parametrize("prompt_lengths", [(3, 5, 1, 7), (4, 4, 4, 4), (0, 2, 6, 3)])
def test_response_window_logprobs_match_full_logits_values_and_gradients(tmp_path, prompt_lengths):
    """The forward cut at the last real token and the head run from the first response token give the
    same sums and the same LoRA gradients as full-length logits, whatever the prompts' lengths and padding."""
    from props_ray.dpo.logprobs import response_window, sequence_logprobs

    policy, tok = _tiny_lora_policy(tmp_path)
    g = torch.Generator().manual_seed(0)
    length, n = 16, len(prompt_lengths)
    ids = torch.randint(3, len(tok), (n, length), generator=g)
    att = torch.zeros(n, length, dtype=torch.long)
    mask = torch.zeros(n, length, dtype=torch.long)
    for i, p in enumerate(prompt_lengths):
        used = p + 2 + i  # right padding after a response of 2 + i tokens; the last column is never used
        att[i, :used], mask[i, p:used] = 1, 1
        ids[i, used:] = tok.pad_token_id
    mask[:, 0] = 0  # the first column has no prefix (a row without a prompt starts its response there)
    start, end = response_window(att, mask)
    assert (start, end) == (max(min(prompt_lengths), 1), max(p + 2 + i for i, p in enumerate(prompt_lengths)))
    assert end < length

    def grads(fn):
        policy.zero_grad()
        out = fn(policy, ids, att, mask)
        out.pow(2).sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in policy.named_parameters() if p.requires_grad}

    got, got_grads = grads(sequence_logprobs)
    want, want_grads = grads(_full_logits_logprobs)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)  # float64: layout, not rounding
    assert want_grads and want_grads.keys() == got_grads.keys()
    for k in want_grads:
        torch.testing.assert_close(got_grads[k], want_grads[k], rtol=1e-7, atol=1e-10)


def _pairs_with_shared_prompts(vocab: int, pad: int, prompt_lengths, seed: int = 0):
    """Pairs whose chosen and rejected rows share their prompt and differ in their responses' tokens
    and lengths, right-padded to 16 columns."""
    g = torch.Generator().manual_seed(seed)
    n, length = len(prompt_lengths), 16
    batch = {}
    prompts = torch.randint(3, vocab, (n, length), generator=g)
    for side, extra in (("chosen", 2), ("rejected", 4)):
        ids = torch.randint(3, vocab, (n, length), generator=g)
        att = torch.zeros(n, length, dtype=torch.long)
        mask = torch.zeros(n, length, dtype=torch.long)
        for i, p in enumerate(prompt_lengths):
            used = p + extra + (i % 3)
            ids[i, :p] = prompts[i, :p]
            ids[i, used:] = pad
            att[i, :used], mask[i, p:used] = 1, 1
        mask[:, 0] = 0
        batch.update({f"{side}_input_ids": ids, f"{side}_attention_mask": att, f"{side}_loss_mask": mask})
    return batch


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("prompt_lengths", [(3, 5, 1, 7), (6, 6, 6, 6)])
def test_shared_prompt_layout_matches_full_logits_values_and_gradients(tmp_path, prompt_lengths, attention):
    """One row per pair (prompt once, then both responses kept apart by the mask) gives the log-probs
    and LoRA gradients of full-length logits over 2B rows."""
    from props_ray.dpo.logprobs import pair_logprobs, shared_prefix

    policy, tok = _tiny_lora_policy(tmp_path)  # float64: differences are layout, not rounding
    policy.base_model.model.set_attn_implementation(attention)
    assert policy.config._attn_implementation == attention
    batch = _pairs_with_shared_prompts(len(tok), tok.pad_token_id, prompt_lengths)
    assert shared_prefix(batch)[0] == min(prompt_lengths)

    def grads(fn):
        policy.zero_grad()
        c, r = fn()
        (c.pow(2).sum() + 3 * r.pow(2).sum()).backward()
        return (c.detach(), r.detach()), {k: p.grad.clone() for k, p in policy.named_parameters() if p.requires_grad}

    def full():
        return tuple(_full_logits_logprobs(policy, batch[f"{s}_input_ids"], batch[f"{s}_attention_mask"],
                                           batch[f"{s}_loss_mask"]) for s in ("chosen", "rejected"))

    got, got_grads = grads(lambda: pair_logprobs(policy, batch, share_prompt=True))
    want, want_grads = grads(full)
    # Eager attention takes its softmax in float32 (transformers), so it agrees to float32's rounding;
    # a layout error moves the sums and gradients by orders of magnitude more.
    tol = 1e-9 if attention == "sdpa" else 1e-6
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)
    assert want_grads and want_grads.keys() == got_grads.keys()
    for k in want_grads:
        assert (got_grads[k] - want_grads[k]).norm() <= 100 * tol * want_grads[k].norm(), k


def test_shared_prompt_falls_back_to_rows(tmp_path):
    """Pairs whose rows differ in their first column take the 2B-row layout (same values). (DP-SGD's
    per-pair samples in both layouts: tests/test_dpsgd.py.)"""
    from props_ray.dpo.logprobs import pair_logprobs, shared_prefix

    policy, tok = _tiny_lora_policy(tmp_path, perturb=False)
    batch = _pairs_with_shared_prompts(len(tok), tok.pad_token_id, (3, 4))
    batch["rejected_input_ids"][0, 0] = batch["chosen_input_ids"][0, 0] + 1
    assert shared_prefix(batch) is None
    with torch.no_grad():
        torch.testing.assert_close(pair_logprobs(policy, batch, share_prompt=True), pair_logprobs(policy, batch))


def test_reference_logprobs_are_computed_once_per_pair_and_reused(tmp_path):
    """The DPO objective's reference log-probs: a pair seen before (in any order, padded to any width)
    takes its stored values without a reference forward; a batch with a new pair, or a pair whose
    prompt/response split differs, runs the reference and gets its exact values."""
    from props_ray.modeling import Reference
    from props_ray.train.objectives import ReferenceLogprobs

    policy, tok = _tiny_lora_policy(tmp_path)
    calls = []

    class Counting(Reference):
        def pair_logprobs(self, batch):
            calls.append(batch["chosen_input_ids"].shape[0])
            return super().pair_logprobs(batch)

    reference = Counting(policy)
    memo = ReferenceLogprobs(reference)
    batch = _pairs_with_shared_prompts(len(tok), tok.pad_token_id, (3, 4, 5, 2), seed=1)
    first = memo(batch)
    assert calls == [4]

    order = torch.tensor([2, 0, 3, 1])
    wider = {k: torch.nn.functional.pad(v[order], (0, 7)) if v.dim() == 2 else v[order] for k, v in batch.items()}
    again = memo(wider)
    assert calls == [4]  # no reference forward
    assert again[0].dtype == first[0].dtype == torch.float64
    torch.testing.assert_close(again, (first[0][order], first[1][order]), rtol=0, atol=0)

    other = _pairs_with_shared_prompts(len(tok), tok.pad_token_id, (3, 4), seed=2)
    mixed = {k: torch.cat([batch[k][:1], other[k]]) for k in batch}
    got = memo(mixed)
    assert calls == [4, 3]
    torch.testing.assert_close(got, reference.pair_logprobs(mixed), rtol=0, atol=0)

    split = {k: v[:1].clone() for k, v in batch.items()}  # the same tokens, one more of them in the prompt
    for side in ("chosen", "rejected"):
        row = split[f"{side}_loss_mask"][0]
        row[int(row.nonzero()[0])] = 0
    calls.clear()
    got = memo(split)
    assert calls == [1]
    torch.testing.assert_close(got, reference.pair_logprobs(split), rtol=0, atol=0)
    assert not torch.equal(got[0], first[0][:1])
