"""DP synthetic instructions as a method: the generator's per-example clipping against torch.func, the
method end to end on real Ray and a real MLflow store (its epsilon recomputed with Opacus's accountant
from the logged params, the filter fitted on synthetic prompts only), and its config errors."""

import json

import numpy as np
import pytest
import torch
from torch.func import functional_call, grad

from props_ray.config import ConfigError, validate_job
from props_ray.dpsgd.engine import DPSGDEngine
from props_ray.train.objectives import LanguageModel

from conftest import tiny_lora_lm


def _generator():
    return tiny_lora_lm()


def _examples(rows=6, width=9):
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(2, 30, (rows, width), generator=g)
    att = torch.zeros(rows, width, dtype=torch.long)
    for r in range(rows):
        att[r, :int(torch.randint(4, width + 1, (1,), generator=g))] = 1
    loss_mask = att.clone()
    loss_mask[:, 0] = 0
    return {"input_ids": ids, "attention_mask": att, "loss_mask": loss_mask}


def test_generator_dp_sgd_clips_each_example_as_torch_func_does():
    model = _generator()
    batch = _examples()
    objective = LanguageModel()
    params = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)

    def loss_of(p, rows):
        call = lambda **kw: functional_call(model, p, (), kw)  # noqa: E731
        return objective(call, {k: v[rows] for k, v in batch.items()})[0].sum()

    want = torch.stack([torch.cat([g.reshape(-1) for g in grad(loss_of)(params, slice(i, i + 1)).values()])
                        for i in range(6)])
    norms = want.norm(dim=1)
    c = 0.5 * float(norms.median())
    expect = (torch.clamp(c / norms, max=1.0)[:, None] * want).sum(0)

    engine = DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=c, expected_batch_size=6, epochs=1,
                         noise_multiplier=0.0, unit="row")
    wrapped, optimizer = engine.wrap(model, torch.optim.SGD([p for p in model.parameters() if p.requires_grad],
                                                            lr=0.0))
    optimizer.zero_grad()
    engine.backward(objective(wrapped, batch)[0])
    by_name = {id(p): n for n, p in model.named_parameters()}
    got = {by_name[id(p)]: p.summed_grad for p in optimizer.params}
    flat = torch.cat([got[n].reshape(-1) for n in names])
    assert float((flat - expect).norm() / expect.norm()) < 1e-6
    assert (norms > c).sum() >= 2
    # control: clipping the whole batch's gradient once (no per-example clipping) is not the same
    whole = want.sum(0)
    assert float((whole * min(1.0, c / float(whole.norm())) - expect).norm() / expect.norm()) > 1e-2


@pytest.fixture(scope="module")
def run(ray_local, tiny_job_raw, tmp_path_factory):
    import props_ray.synthetic.embedding as embedding
    import props_ray.synthetic.generator as generator
    from props_ray.driver import Job

    out = tmp_path_factory.mktemp("synthetic")
    learns = {"generator_epochs": 12, "generator_lr": 0.02}  # 141 prompts: enough steps to learn their form
    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "synthetic", "output_dir": str(out / "runs"), "task": {"prompt_mix": "skewed"},
                "methods": [{"method": "synthetic_instructions", "clusters": 8, **learns},
                            {"method": "synthetic_instructions", "filter": "none", **learns}],
                "privacy": {"epsilons": [4.0]}, "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"}})
    cfg = validate_job(raw)
    seen = {"sampled": [], "fit": []}
    sample, fit = generator.sample_instructions, embedding.Filter.fit.__func__

    def spy_sample(*a, **k):
        seen["sampled"].append(sample(*a, **k))
        return seen["sampled"][-1]

    def spy_fit(cls, synthetic, *a, **k):
        seen["fit"].append(list(synthetic))
        return fit(cls, synthetic, *a, **k)

    with pytest.MonkeyPatch.context() as mp:  # the trials run in this process (one at a time)
        mp.setattr(generator, "sample_instructions", spy_sample)
        mp.setattr(embedding.Filter, "fit", classmethod(spy_fit))
        results = Job(cfg).run()
    return cfg, results, seen


def test_both_variants_run_and_their_epsilon_is_opacus_accountant(run):
    from mlflow.tracking import MlflowClient
    from opacus.accountants import PRVAccountant

    cfg, results, _ = run
    assert [r.trial for r in results] == ["synthetic-instructions-eps4", "synthetic-instructions-unfiltered-eps4"]
    client = MlflowClient(cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    trials = {r.info.run_name: r for r in client.search_runs([exp]) if r.data.tags.get("props_ray.kind") == "trial"}
    for name, histogram in (("synthetic-instructions-eps4", True), ("synthetic-instructions-unfiltered-eps4", False)):
        t = trials[name]
        p, m = t.data.params, t.data.metrics
        acc = PRVAccountant()
        acc.history = [(float(p["generator_noise_multiplier"]), float(p["generator_sample_rate"]),
                        int(p["generator_steps"]))]
        if histogram:
            acc.history.append((float(p["histogram_sigma"]), 1.0, 1))
        with np.errstate(divide="ignore"):
            eps = acc.get_epsilon(delta=float(p["generator_delta"]))
        assert m["epsilon_spent"] == pytest.approx(eps, rel=1e-6) and 0.99 * 4.0 <= eps <= 4.0
        assert ("histogram_epsilon" in m) == histogram
        assert 0.0 <= m["synthetic_tv_before"] <= 1.0 and 0.0 <= m["synthetic_tv_after"] <= 1.0
    for r in results:
        assert 0.0 <= r.win.win_rate <= 1.0 and r.win.n == cfg.data.eval_prompts * cfg.eval.samples_per_prompt


def test_real_prompts_never_enter_the_filter_fit(run):
    _, _, seen = run
    assert len(seen["fit"]) == 1  # the filtered variant only
    sampled = set(seen["sampled"][0])
    assert seen["fit"][0] and set(seen["fit"][0]) <= sampled  # what was fitted is the generator's output


def test_synthetic_instructions_config_errors_name_the_field():
    with pytest.raises(ConfigError, match=r"histogram_noise applies to filter dp_histogram only"):
        validate_job({"name": "j", "methods": [{"method": "synthetic_instructions", "filter": "none",
                                                "histogram_noise": 5}]})
    with pytest.raises(ConfigError, match=r"clusters \(5000\) is more than the synthetic prompts"):
        validate_job({"name": "j", "data": {"num_pairs": 1000},
                      "methods": [{"method": "synthetic_instructions", "clusters": 5000}]})
    with pytest.raises(ConfigError, match=r"histogram_noise"):
        validate_job({"name": "j", "methods": [{"method": "synthetic_instructions", "histogram_noise": 0}]})


def test_report_shows_the_unit_each_part_and_the_filter(run):
    from mlflow.tracking import MlflowClient

    from props_ray.report import format_summary, summarize, trials_from_mlflow

    cfg, _, _ = run
    trials = trials_from_mlflow(MlflowClient(cfg.tracking.resolved_uri()), cfg.tracking.experiment)
    assert set(trials["privacy_unit"]) == {"prompt"}
    text = format_summary(summarize(trials), markdown=True)
    synthetic = text[text.index("DP synthetic instructions"):]
    rows = [r for r in synthetic.splitlines() if r.startswith("| synthetic")]
    assert len(rows) == 2
    filtered = [c.strip() for c in rows[0].strip("|").split("|")]
    unfiltered = [c.strip() for c in rows[1].strip("|").split("|")]
    assert float(filtered[2]) < 4.0 and float(filtered[3]) > 0  # generator and histogram each spend a part
    assert unfiltered[3] == "-"  # no histogram without the filter


def test_a_histogram_that_spends_the_trials_epsilon_is_refused_in_the_data_step(tmp_path):
    """At epsilon 0.1 the default histogram (sigma 10) alone spends about 0.2 here (0.27 at 3,000 pairs): the data step refuses the
    job before any trial, naming the field; a larger sigma, or a larger epsilon, passes."""
    from props_ray.data.prepare import prepare_data
    from props_ray.errors import UserError

    def job(eps, **method):
        return validate_job({"name": "j", "output_dir": str(tmp_path / f"o{eps}{len(method)}"),
                             "data": {"num_pairs": 400, "eval_prompts": 20}, "privacy": {"epsilons": [eps, 2]},
                             "methods": [{"method": "synthetic_instructions", **method}]})

    with pytest.raises(UserError, match=r"histogram_noise \(10\) alone spends epsilon 0\.\d+ of 0\.1 at delta"):
        prepare_data(job(0.1))
    prepare_data(job(0.1, histogram_noise=80))  # about 0.03 of 0.1: room for the generator
    prepare_data(job(0.5))
