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
