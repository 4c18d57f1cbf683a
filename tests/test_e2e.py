"""End to end on real Ray (local) and a real MLflow store: a small demo, then a re-run that resumes."""

import json
import math

import pandas as pd
import pytest

from props_ray.config import validate_job
from props_ray.driver import Job


@pytest.fixture(scope="module")
def demo_run(ray_local, tiny_job_raw):
    raw = json.loads(json.dumps(tiny_job_raw))
    raw["methods"] = [*raw["methods"], {"method": "dpsgd"}]
    cfg = validate_job(raw)
    results = Job(cfg).run()
    return cfg, results


def _client(cfg):
    from mlflow.tracking import MlflowClient

    c = MlflowClient(cfg.tracking.resolved_uri())
    return c, c.get_experiment_by_name(cfg.tracking.experiment).experiment_id


def test_mlflow_run_tree(demo_run):
    cfg, results = demo_run
    client, exp = _client(cfg)
    runs = client.search_runs([exp], max_results=1000)
    by_id = {r.info.run_id: r for r in runs}
    jobs = [r for r in runs if r.data.tags.get("props_ray.kind") == "job"]
    assert len(jobs) == 1
    trials = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == jobs[0].info.run_id]
    assert sorted((r.data.params["method"], r.data.params["epsilon"]) for r in trials) == \
        [("dpsgd", "0.5"), ("nonprivate", "inf"), ("props", "0.5"), ("rr", "0.5")]
    for t in trials:
        dp = t.data.params["method"] == "dpsgd"
        for m in ("win_rate", "win_rate_ci_low", "win_rate_ci_high", *([] if dp else ["label_accuracy"])):
            assert m in t.data.metrics, (t.info.run_name, m)
        assert t.data.metrics["win_rate_ci_low"] <= t.data.metrics["win_rate"] <= t.data.metrics["win_rate_ci_high"]
        assert t.data.tags["props_ray.privacy"] == "simulation"  # the embedded task's seeded randomness
        stages = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == t.info.run_id]
        assert sorted(r.data.params["stage"] for r in stages) == ["1", "2"]
        for s in stages:
            hist = client.get_metric_history(s.info.run_id, "loss")
            if dp:  # DP-SGD's batch statistics are not noised: never logged
                assert not hist and "epsilon" in s.data.metrics
                continue
            assert hist and all(h.value > 0 for h in hist)
            assert "reward_accuracy" in s.data.metrics and "margin" in s.data.metrics
        arts = [a.path for a in client.list_artifacts(t.info.run_id, "adapter")]
        assert any(p.endswith("adapter_config.json") for p in arts)
    job_arts = [a.path for a in client.list_artifacts(jobs[0].info.run_id)]
    assert {"job.yaml", "trials.csv", "summary.csv", "summary.md", "win_rate_vs_epsilon.png",
            "label_accuracy_vs_epsilon.png", "props_stage_label_accuracy.png"} <= set(job_arts)
    png = cfg.job_dir / "summary" / "win_rate_vs_epsilon.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    assert all(by_id[t.info.run_id].info.status == "FINISHED" for t in trials)


def test_results_and_label_accuracy(demo_run):
    cfg, results = demo_run
    by = {r.method: r for r in results}
    assert by["nonprivate"].label_accuracy == 1.0
    # RR labels at eps=0.5 are right with probability 0.622: far from 1 on 160 pairs
    assert 0.45 < by["rr"].label_accuracy < 0.8
    for r in results:
        assert 0.0 <= r.win.win_rate <= 1.0 and r.win.n == cfg.data.eval_prompts * cfg.eval.samples_per_prompt


def test_two_workers_keep_identical_parameters(demo_run):
    cfg, _ = demo_run
    for state in (cfg.job_dir / "trials").glob("*/state.json"):
        for stage in json.loads(state.read_text())["stages"].values():
            assert stage["metrics"]["rank_param_spread"] == 0.0, state


def test_no_raw_labels_on_disk(demo_run):
    """Every pair table the job wrote is in privatized orientation, never the raw one; so is the ledger."""
    cfg, _ = demo_run
    from props_ray.data.prepare import prepare_data

    data = prepare_data(cfg)
    truth = data.truth().set_index("id")["chosen"]
    tables = list(cfg.job_dir.rglob("*.parquet"))
    assert tables
    for path in tables:
        df = pd.read_parquet(path)
        if "chosen" in df.columns and "id" in df.columns:
            agree = (df["chosen"].to_numpy() == truth.loc[df["id"]].to_numpy()).mean()
            assert agree < 0.9, f"{path} looks like raw labels ({agree:.0%} agree)"
    draws = list(data.ledger.root.glob("draw-*.parquet"))
    assert len(draws) == 1
    draw = pd.read_parquet(draws[0]).set_index("id")["prefers_first"]
    raw = data.dataset.set_index("id")
    agree = (draw.loc[raw.index].to_numpy() == (raw["chosen"] < raw["rejected"]).to_numpy()).mean()
    assert agree < 0.75, f"the ledger's draw looks like raw labels ({agree:.0%} agree)"  # RR at 0.5: ~62%


def test_spent_epsilon_reaches_the_report(demo_run, capsys):
    """The report reads DP-SGD's spent epsilon from this real run's MLflow store (one name end to end)."""
    from props_ray import metrics as M
    from props_ray.cli import main
    from props_ray.report import summarize, trials_from_mlflow

    cfg, results = demo_run
    client, _ = _client(cfg)
    trials = trials_from_mlflow(client, cfg.name).set_index("method")
    spent = trials.loc["dpsgd", M.EPSILON_SPENT]
    assert 0.45 < spent <= 0.5 + 1e-9  # calibrated to the target, never above it
    assert all(math.isnan(trials.loc[m, M.EPSILON_SPENT]) for m in ("rr", "props", "nonprivate"))
    assert next(r for r in results if r.method == "dpsgd").extra[M.EPSILON_SPENT] == pytest.approx(spent)
    summary = summarize(trials.reset_index())
    assert summary.set_index("method_label").loc["dpsgd", f"{M.EPSILON_SPENT}_mean"] == pytest.approx(spent)
    capsys.readouterr()
    assert main(["report", cfg.name, "--tracking-uri", cfg.tracking.resolved_uri()]) == 0
    assert f"0.5 (spent {spent:.4g})" in capsys.readouterr().out


def test_rerun_resumes_without_redrawing_or_duplicating(demo_run, ray_local):
    cfg, results = demo_run
    ledger = sorted((cfg.job_dir.parent / "ledger").rglob("*.parquet"))
    before = {p: p.read_bytes() for p in ledger}
    cumulative = json.loads(next((cfg.job_dir.parent / "ledger").rglob("ledger.json")).read_text())["draws"]
    client, exp = _client(cfg)
    n_runs = len(client.search_runs([exp], max_results=1000))
    again = Job(cfg).run()
    assert {p: p.read_bytes() for p in ledger} == before
    assert sorted((cfg.job_dir.parent / "ledger").rglob("*.parquet")) == ledger
    assert json.loads(next((cfg.job_dir.parent / "ledger").rglob("ledger.json")).read_text())["draws"] == cumulative
    assert len(client.search_runs([exp], max_results=1000)) == n_runs
    assert [r.win.win_rate for r in again] == [r.win.win_rate for r in results]


def test_another_seed_never_resumes_this_seeds_trials(demo_run):
    # the job's directory holds seed 0's finished trials: a run of seed 1 (one seed of a sweep, or the
    # job's own seed changed) must not report them as its own
    from props_ray.errors import UserError

    cfg, _ = demo_run
    raw = json.loads(json.dumps(cfg.model_dump(mode="json")))
    one_seed = validate_job({**raw, "sweep": {"seeds": [1]}})
    variants = Job(one_seed).preflight()  # the data step only: no Ray, no training
    assert [v.suffix for v in variants] == ["-seed1"]
    assert not (cfg.job_dir / "trials" / "rr-eps0.5-seed1").exists()
    with pytest.raises(UserError, match=r"trial nonprivate in .* another configuration \(seed 0 \(now 1\)"):
        Job(validate_job({**raw, "seed": 1})).preflight()
    with pytest.raises(UserError, match=r"trial nonprivate .*another configuration \(train\)"):
        Job(validate_job({**raw, "train": {**raw["train"], "lr": raw["train"]["lr"] * 2}})).preflight()
    # how it runs is not what it computes: more failures allowed still resumes
    Job(validate_job({**raw, "train": {**raw["train"], "max_failures": 5}})).preflight()


def test_report_ranks_by_reward_gain_and_head_to_head(demo_run):
    from props_ray.report import format_summary, summarize, trials_from_mlflow

    cfg, results = demo_run
    client, _ = _client(cfg)
    trials = trials_from_mlflow(client, cfg.tracking.experiment).set_index("method_label")
    top = trials.loc["nonprivate"]
    assert top["normalised_gain"] == pytest.approx(1.0)  # the ceiling measured against itself
    assert top["win_rate_vs_nonprivate"] == pytest.approx(0.5)  # every comparison a tie with itself
    for label, t in trials.iterrows():
        scores = json.loads((cfg.job_dir / "trials" / t["trial"] / "eval-scores.json").read_text())
        assert t["reward_mean"] == pytest.approx(sum(scores["policy"]) / len(scores["policy"]))
        assert t["reward_ci_low"] <= t["reward_mean"] <= t["reward_ci_high"]
        want = (t["reward_mean"] - t["reference_reward_mean"]) / (top["reward_mean"] - t["reference_reward_mean"])
        assert t["normalised_gain"] == pytest.approx(want)
        assert 0.0 <= t["win_rate_vs_nonprivate"] <= 1.0
    text = format_summary(summarize(trials.reset_index()), markdown=True)
    assert "| reward ± 95% CI | gain | vs non-private |" in text
