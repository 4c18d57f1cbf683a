import pytest

from props_ray.config import ConfigError, apply_override, load_job, validate_job

BASE = {"name": "j", "methods": [{"method": "rr"}]}


def test_demo_job_validates():
    cfg = load_job("jobs/demo.yaml")
    assert [(m.display_name, e) for m, e in cfg.trials()] == [("nonprivate", None), ("rr", 0.5), ("props-mle", 0.5),
                                                              ("dpsgd", 0.5)]
    assert cfg.train.num_workers == 2 and cfg.stages == 3


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
