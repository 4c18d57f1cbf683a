"""A 2-trial sweep end to end (real Ray, real MLflow store): two seeds under one job run, the summary
over seeds, the plots, and the report read back from MLflow."""

import json

import pandas as pd

from props_ray.config import validate_job
from props_ray.driver import Job


def test_two_trial_sweep(ray_local, tiny_job_raw, tmp_path, capsys):
    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "sweep", "output_dir": str(tmp_path / "runs"), "methods": [{"method": "rr"}],
                "sweep": {"seeds": [0, 1]}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    cfg = validate_job(raw)
    results = Job(cfg).run()
    assert [r.trial for r in results] == ["rr-eps0.5-seed0", "rr-eps0.5-seed1"]
    # each seed generates its own embedded dataset, so each has its own ledger and RR draw
    assert len(list((cfg.job_dir.parent / "ledger").glob("*/draw-1.parquet"))) == 2

    out = cfg.job_dir / "summary"
    summary = pd.read_csv(out / "summary.csv")
    assert len(summary) == 1 and summary["n_seeds"].iloc[0] == 2
    wins = [r.win.win_rate for r in results]
    assert summary["win_rate_mean"].iloc[0] == sum(wins) / 2
    for png in ("win_rate_vs_epsilon.png", "label_accuracy_vs_epsilon.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"

    from props_ray.cli import main

    capsys.readouterr()
    assert main(["report", "sweep", "--tracking-uri", cfg.tracking.resolved_uri()]) == 0
    printed = capsys.readouterr().out
    assert f"{sum(wins) / 2:.3f}" in printed


def test_trials_run_concurrently(ray_local, tiny_job_raw, tmp_path):
    """Two trials as Ray tasks at once: they overlap in time, read the one RR draw the driver made
    (byte-identical afterwards), and are logged by the driver like sequential trials."""
    import mlflow

    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "concurrent", "output_dir": str(tmp_path / "runs"),
                "methods": [{"method": "rr"}, {"method": "props"}], "sweep": {"max_concurrent_trials": 2},
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    cfg = validate_job(raw)
    job = Job(cfg)
    results = job.run()
    assert [r.trial for r in results] == ["rr-eps0.5", "props-mle-eps0.5"]

    states = {r.trial: json.loads((cfg.job_dir / "trials" / r.trial / "state.json").read_text()) for r in results}
    spans = [(s["outcome"]["started"], s["outcome"]["finished"]) for s in states.values()]
    assert max(a for a, _ in spans) < min(b for _, b in spans), f"trials did not overlap: {spans}"
    files = sorted((cfg.job_dir.parent / "ledger").rglob("*.parquet"))
    assert len(files) == 1  # one draw for the dataset, shared by both trials
    before = {f: f.read_bytes() for f in files}

    client = mlflow.MlflowClient(cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment)
    runs = client.search_runs([exp.experiment_id], max_results=1000)
    trials = {r.info.run_name: r for r in runs if r.data.tags.get("props_ray.kind") == "trial"}
    assert set(trials) == {"rr-eps0.5", "props-mle-eps0.5"}
    for r in results:
        assert trials[r.trial].data.metrics["win_rate"] == r.win.win_rate
        assert trials[r.trial].info.status == "FINISHED"

    # a re-run reuses everything: no redraw, no new runs
    Job(validate_job(raw)).run()
    assert {f: f.read_bytes() for f in files} == before
    assert len(client.search_runs([exp.experiment_id], max_results=1000)) == len(runs)
