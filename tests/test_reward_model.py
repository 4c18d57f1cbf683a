"""The reward model (Bradley--Terry on a scalar head): per-pair DP-SGD gradients against torch.func,
training on real Ray Train workers (non-private and DP-SGD), and the exported judge."""

import copy

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from props_ray.config import ModelConfig
from props_ray.dpo.tokenize import tokenize_pairs
from props_ray.dpsgd.engine import DPSGDEngine
from props_ray.modeling import load_tokenizer
from props_ray.reward_model import bradley_terry_loss, build_reward_model, pair_rewards


def _batch(base, pairs) -> dict[str, torch.Tensor]:
    arrays = tokenize_pairs(load_tokenizer(base), list(pairs["prompt"]), list(pairs["chosen"]),
                            list(pairs["rejected"]), 8, 8)
    return {k: torch.as_tensor(v) for k, v in arrays.items()}


def _trainable(model):
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def test_per_pair_clipped_bradley_terry_gradient_matches_torch_func(stage_adapter):
    """The DP-SGD engine's clipped per-pair sums (LoRA + the scalar head) equal torch.func's per-pair
    gradients clipped by hand; clipping each row separately does not."""
    base, _, task = stage_adapter
    model = build_reward_model(base, ModelConfig()).double()
    with torch.no_grad():  # move LoRA B off zero, so every trainable tensor has a gradient
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.3)
    batch = _batch(base, task.preference_pairs(6, seed=3))
    params = {n: p.detach() for n, p in _trainable(model).items()}

    def one_pair(p, i):
        c, r = _functional_rewards(model, p, {k: v[i:i + 1] for k, v in batch.items()})
        return bradley_terry_loss(c, r).sum()

    want = [grad(one_pair)(params, i) for i in range(6)]
    norms = torch.stack([torch.cat([g[n].reshape(-1) for n in params]).norm() for g in want])
    assert (norms > 0).all()
    c = 0.5 * float(norms.median())

    row_model = copy.deepcopy(model)  # for the per-row control below, before the engine hooks this one
    engine = DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=c, expected_batch_size=6, epochs=1,
                         noise_multiplier=0.0)
    wrapped, optimizer = engine.wrap(model, torch.optim.SGD(list(_trainable(model).values()), lr=0.0))
    names = {id(p): n for n, p in _trainable(model).items()}
    optimizer.zero_grad()
    engine.backward(bradley_terry_loss(*pair_rewards(wrapped, batch)))
    got = torch.cat([optimizer.params[j].summed_grad.reshape(-1) for j in range(len(optimizer.params))])
    factors = torch.clamp(c / norms, max=1.0)
    order = [names[id(p)] for p in optimizer.params]
    expect = torch.cat([sum(f * g[n] for f, g in zip(factors, want)).reshape(-1) for n in order])
    assert float((got - expect).norm() / expect.norm()) < 1e-6
    assert (norms > c).sum() >= 3  # clipping was active
    assert any("score" in n for n in order)  # the head is trained, through its own per-pair samples

    # control: stock Opacus per-row samples (2B rows), the chosen and the rejected row clipped separately
    from opacus import GradSampleModule

    rows_model = GradSampleModule(row_model, batch_first=True, loss_reduction="sum")
    bradley_terry_loss(*pair_rewards(rows_model, batch)).sum().backward()
    row_names = {id(p): n for n, p in _trainable(row_model).items()}
    samples = {row_names[id(p)]: p.grad_sample for p in _trainable(row_model).values()}
    per_row = torch.cat([samples[n].reshape(12, -1) for n in order], dim=1)
    assert float((per_row.sum(0) - torch.cat([sum(g[n] for g in want).reshape(-1) for n in order])).norm()) < 1e-8
    row_clip = torch.clamp(c / per_row.norm(dim=1), max=1.0)
    assert float(((row_clip[:, None] * per_row).sum(0) - expect).norm() / expect.norm()) > 1e-2


def _functional_rewards(model, params, rows):
    """pair_rewards with the trainable parameters replaced (torch.func)."""
    class Call:
        config = model.config

        def __call__(self, **kw):
            return functional_call(model, params, (), kw)

    return pair_rewards(Call(), rows)


@pytest.fixture(scope="module")
def trained(ray_local, tmp_path_factory):
    """A non-private and a DP-SGD reward model on 800 embedded pairs, on two Ray Train workers, on the
    embedded default's architecture (hidden 64, 2 layers: a 1-layer hidden-32 body ranks at ~0.65)."""
    from props_ray.config import validate_job
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.reward_model import export_reward_model
    from props_ray.train.trainer import fit_reward_model

    out = tmp_path_factory.mktemp("rm")
    task, base = EmbeddedTask(), str(out / "base")
    tok = build_tokenizer(task)
    build_tiny_model(len(tok), 64, 2, 4).save_pretrained(base)
    tok.save_pretrained(base)
    cfg = validate_job({"name": "rm", "output_dir": str(out), "methods": [{"method": "dpsgd"}],
                        "train": {"num_workers": 2, "batch_size": 32, "epochs": 4, "lr": 0.005, "log_every": 5},
                        "privacy": {"dpsgd": {"max_grad_norm": 1.0}}})
    pairs = task.preference_pairs(800, seed=11)
    plain = fit_reward_model(cfg, pairs, base, name="rm-plain")
    private = fit_reward_model(cfg, pairs, base, name="rm-dp", epsilon=2.0)
    judge = export_reward_model(base, cfg.model, plain.model_path, out / "judge")
    return cfg, base, task, plain, private, judge


def _accuracy(base, model_path, pairs):
    """Fraction of held-out pairs whose truly better response gets the higher reward."""
    model = build_reward_model(base, ModelConfig(), adapter_path=model_path, trainable=False)
    with torch.no_grad():
        c, r = pair_rewards(model, _batch(base, pairs))
    return float((c > r).float().mean())


def test_reward_model_learns_the_embedded_preference(trained):
    _, base, task, plain, _, _ = trained
    held_out = task.preference_pairs(400, seed=99)
    truth = held_out.copy()
    rc, rr = task.rewards(held_out["prompt"], held_out["chosen"]), task.rewards(held_out["prompt"], held_out["rejected"])
    truth["chosen"] = np.where(rc >= rr, held_out["chosen"], held_out["rejected"])
    truth["rejected"] = np.where(rc >= rr, held_out["rejected"], held_out["chosen"])
    acc = _accuracy(base, plain.model_path, truth)
    print(f"non-private reward model: held-out accuracy {acc:.3f} against the true reward")
    assert acc > 0.7  # chance is 0.5; measured about 0.8


def test_dp_reward_model_spends_what_opacus_accounts(trained):
    from props_ray.privacy.accounting import epsilon_after

    _, _, _, _, private, _ = trained
    m = private.metrics
    assert m["steps"] == m["planned_steps"] and m["replicas_in_sync"] == 1
    assert m["delta"] == pytest.approx(800 ** -1.1)
    assert m["epsilon"] == pytest.approx(epsilon_after(m["steps"], m["sample_rate"], m["noise_multiplier"],
                                                       m["delta"], "prv"))
    assert 0.99 * 2.0 <= m["epsilon"] <= 2.0


def test_exported_reward_model_is_a_judge(trained):
    """The exported directory scores (prompt, response) through eval.judge's scorer, in line with the truth."""
    from scipy.stats import spearmanr

    from props_ray.judge import RewardModelScorer

    _, _, task, _, _, judge = trained
    rng = np.random.default_rng(5)
    prompts = task.sample_prompts(300, rng)
    responses = task.sample_responses(300, rng)
    scores = RewardModelScorer(str(judge))({"prompt": prompts, "response": responses, "row": np.arange(300)})
    rho = spearmanr(scores["score"], task.rewards(prompts, responses)).statistic
    print(f"exported judge: Spearman {rho:.3f} with the oracle reward")
    assert rho > 0.4
    assert len(scores["score"]) == 300 and np.isfinite(scores["score"]).all()
