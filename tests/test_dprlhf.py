"""DP-RLHF as a method, end to end on real Ray and a real MLflow store: both privacy models in one job,
each stage's epsilon recomputed with Opacus's accountant from the logged params, and the composed total."""

import json

import pytest

from props_ray.config import ConfigError, validate_job
from props_ray.driver import Job


@pytest.fixture(scope="module")
def run(ray_local, tiny_job_raw, tmp_path_factory):
    out = tmp_path_factory.mktemp("dprlhf")
    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "dprlhf", "output_dir": str(out / "runs"),
                "methods": [{"method": "dprlhf"}, {"method": "dprlhf", "privacy_model": "label"}],
                "privacy": {"epsilons": [2.0]}, "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"}})
    raw["train"] = {**raw["train"], "epochs": 2}
    cfg = validate_job(raw)
    return cfg, Job(cfg).run()


def test_both_privacy_models_run_and_are_logged(run):
    from mlflow.tracking import MlflowClient

    from props_ray.privacy.accounting import epsilon_after

    cfg, results = run
    assert [r.trial for r in results] == ["dprlhf-central-eps2", "dprlhf-label-eps2"]
    client = MlflowClient(cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    trials = {r.info.run_name: r for r in client.search_runs([exp]) if r.data.tags.get("props_ray.kind") == "trial"}
    central = trials["dprlhf-central-eps2"]
    p = central.data.params
    eps = []
    for part in ("reward_model", "ppo"):  # every stage's epsilon, recomputed from its logged params
        e = epsilon_after(int(p[f"{part}_steps"]), float(p[f"{part}_sample_rate"]),
                          float(p[f"{part}_noise_multiplier"]), float(p[f"{part}_delta"]), p["accountant"])
        assert 0.99 * 2.0 <= e <= 2.0
        eps.append(e)
    assert central.data.metrics["epsilon_spent"] == pytest.approx(max(eps))  # parallel composition
    assert "parallel" in p["composition"]
    label = trials["dprlhf-label-eps2"]
    assert label.data.params["ledger_draw_epsilon"] == "2.0" and "epsilon_spent" not in label.data.metrics
    for r in results:
        assert 0.0 <= r.win.win_rate <= 1.0 and r.win.n == cfg.data.eval_prompts * cfg.eval.samples_per_prompt
    stages = [r for r in client.search_runs([exp]) if r.data.tags.get("mlflow.parentRunId") == central.info.run_id]
    assert sorted(s.data.params["loss"] for s in stages) == ["bradley_terry", "ppo"]


def test_bad_dprlhf_config_names_the_field():
    with pytest.raises(ConfigError, match=r"methods\.0\.ppo_epochs_per_batch.*no accounting rule"):
        validate_job({"name": "j", "stages": 2, "methods": [{"method": "dprlhf", "ppo_epochs_per_batch": 2}]})
    with pytest.raises(ConfigError, match="reward_model_stages"):
        validate_job({"name": "j", "stages": 2, "methods": [{"method": "dprlhf", "reward_model_stages": 2}]})
