import pytest

from props_ray.config import ConfigError, apply_override, load_job, validate_job

BASE = {"name": "j", "methods": [{"method": "rr"}]}


def test_demo_job_validates():
    cfg = load_job("jobs/demo.yaml")
    assert [(m.display_name, e) for m, e in cfg.trials()] == [("nonprivate", None), ("rr", 0.5), ("props-mle", 0.5),
                                                              ("dpsgd", 0.5), ("dprlhf-central", 0.5),
                                                              ("dprlhf-label", 0.5),
                                                              ("synthetic-instructions", 0.5)]
    assert cfg.train.num_workers == 2 and cfg.stages == 3 and cfg.task.prompt_mix == "skewed"


def test_errors_name_the_field_and_value():
    with pytest.raises(ConfigError) as e:
        validate_job({**BASE, "train": {"num_workers": -1}}, "job.yaml")
    assert "train.num_workers" in str(e.value) and "-1" in str(e.value) and "job.yaml" in str(e.value)
    with pytest.raises(ConfigError, match=r"methods\.0\.method"):
        validate_job({"name": "j", "methods": [{"method": "dp"}]})
    with pytest.raises(ConfigError, match=r"'trian'.*unknown field"):
        validate_job({**BASE, "trian": {}})
    with pytest.raises(ConfigError, match=r"privacy\.epsilons"):
        validate_job({**BASE, "privacy": {"epsilons": [0.5, -1]}})
    with pytest.raises(ConfigError, match="stage_proportions"):
        validate_job({**BASE, "stages": 3, "data": {"stage_proportions": [1, 1]}})
    with pytest.raises(ConfigError, match="soft loss"):
        validate_job({"name": "j", "methods": [{"method": "rr", "loss": "soft"}]})
    with pytest.raises(ConfigError, match="oracle"):
        validate_job({**BASE, "data": {"source": "x.jsonl"}})


def test_refused_before_anything_needs_data():
    """What validate refuses from the config alone (issue: privacy ledger)."""
    with pytest.raises(ConfigError, match=r"model\.gradient_checkpointing cannot be used with method 'dpsgd'"):
        validate_job({"name": "j", "model": {"gradient_checkpointing": True}, "methods": [{"method": "dpsgd"}]})
    validate_job({"name": "j", "model": {"gradient_checkpointing": True}, "methods": [{"method": "rr"}]})
    with pytest.raises(ConfigError, match=r"methods\.0\.epsilons.*empty list"):
        validate_job({"name": "j", "methods": [{"method": "rr", "epsilons": []}]})
    real = {"name": "j", "data": {"source": "x.jsonl"}, "eval": {"judge": "rm"}, "methods": [{"method": "rr"}]}
    with pytest.raises(ConfigError, match=r"privacy\.acknowledge_seeded_randomness"):
        validate_job({**real, "privacy": {"secure_randomness": False}})
    cfg = validate_job({**real, "privacy": {"secure_randomness": False, "acknowledge_seeded_randomness": True}})
    assert cfg.privacy_status == "not private"
    assert validate_job(real).privacy_status == "private" and validate_job(BASE).privacy_status == "simulation"


def test_every_job_file_passes_the_config_checks():
    from pathlib import Path

    for path in sorted(Path("jobs").glob("*.yaml")):
        load_job(path)  # e.g. no job combines dpsgd with gradient checkpointing


def test_overrides():
    raw = {"name": "j", "methods": [{"method": "props"}]}
    apply_override(raw, "train.num_workers=1")
    apply_override(raw, "methods.0.rule=posterior")
    apply_override(raw, "privacy.epsilons=[0.1, 1]")
    cfg = validate_job(raw)
    assert cfg.train.num_workers == 1 and cfg.methods[0].rule == "posterior"
    assert [e for _, e in cfg.trials()] == [0.1, 1.0]
    with pytest.raises(ConfigError, match="section.key=value"):
        apply_override(raw, "train.num_workers")
    with pytest.raises(ConfigError, match="index"):
        apply_override(raw, "methods.5.rule=mle")


def test_load_job_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_job(tmp_path / "none.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_job(bad)


def test_props_stage_loss_follows_the_rule_unless_the_method_names_one():
    from props_ray.config import parse_method

    loss = {}
    for spec in ({"rule": "mle"}, {"rule": "posterior"}, {"rule": "posterior", "loss": "sigmoid"},
                 {"rule": "mle", "loss": "soft"}, {"rule": "posterior", "loss": "robust"}):
        m = parse_method({"method": "props", **spec})
        loss[tuple(spec.values())] = [m.stage_loss(k) for k in (1, 2, 3)]
    assert loss[("mle",)] == ["sigmoid"] * 3
    assert loss[("posterior",)] == ["sigmoid", "soft", "soft"]  # stage 1 trains on RR labels
    assert loss[("posterior", "sigmoid")] == ["sigmoid"] * 3  # the Bayes decision as a hard label
    assert loss[("mle", "soft")] == ["sigmoid", "soft", "soft"]
    assert loss[("posterior", "robust")] == ["robust", "soft", "soft"]  # RR's flip rate fits stage 1 only


def test_model_error_confidence_is_checked():
    ok = validate_job({"name": "j", "methods": [{"method": "props", "model_error_confidence": 0.95,
                                                  "name": "props-mle-bounded"}]})
    assert ok.methods[0].model_error_confidence == 0.95
    with pytest.raises(ConfigError, match=r"methods\.0\.model_error_confidence"):
        validate_job({"name": "j", "methods": [{"method": "props", "model_error_confidence": 1.5}]})
    with pytest.raises(ConfigError, match=r"methods\.0\.model_error_confidence': unknown field"):
        validate_job({"name": "j", "methods": [{"method": "rr", "model_error_confidence": 0.9}]})  # props' own
    with pytest.raises(ConfigError, match="rule 'mle' only"):
        validate_job({"name": "j", "methods": [{"method": "props", "rule": "posterior",
                                                 "model_error_confidence": 0.9}]})
