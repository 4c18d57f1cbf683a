"""A 2-trial sweep end to end (real Ray, real MLflow store): two seeds under one job run, the summary
over seeds, the plots, and the report read back from MLflow."""

import json

import pandas as pd

from props_ray.config import validate_job
from props_ray.pipeline import Job


def test_two_trial_sweep(ray_local, tiny_job_raw, tmp_path, capsys):
    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "sweep", "output_dir": str(tmp_path / "runs"), "methods": [{"method": "rr"}],
                "sweep": {"seeds": [0, 1]}, "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    cfg = validate_job(raw)
    results = Job(cfg).run()
    assert [r.trial for r in results] == ["rr-eps0.5-seed0", "rr-eps0.5-seed1"]
    # each seed has its own RR draw and its own reference model
    assert len(list((cfg.job_dir / "privatized").glob("seed=*"))) == 2

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
