"""Every user error is one message and exit status 2, never a traceback, and comes before anything is spent.

These run the real ``props-ray`` command in a subprocess, as a user would.
"""

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "props_ray.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _job(tmp_path, source, **over):
    raw = {"name": "cli", "output_dir": str(tmp_path / "runs"), "stages": 2,
           "data": {"source": str(source), "eval_prompts": 5}, "eval": {"judge": "no/such-reward-model"},
           "methods": [{"method": "rr"}], "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    raw.update(over)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _pairs_file(tmp_path, n=60, bad_row=None):
    rows = [{"id": f"r{i}", "prompt": f"q{i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(n)]
    if bad_row is not None:
        del rows[bad_row]["rejected"]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _one_error(done, *needles):
    assert done.returncode == 2, (done.returncode, done.stderr[-2000:])
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, done.stderr
    for n in needles:
        assert n in done.stderr, (n, done.stderr)


def test_malformed_row_is_one_message_naming_the_row(tmp_path):
    job = _job(tmp_path, _pairs_file(tmp_path, bad_row=17))
    done = _cli("run", str(job), cwd=tmp_path)
    _one_error(done, "row 17", "'rejected'")
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "runs" / "cli").exists()  # nothing started


@pytest.mark.parametrize("command", ["validate", "run"])
def test_missing_data_file_is_refused(tmp_path, command):
    _one_error(_cli(command, str(_job(tmp_path, tmp_path / "absent.jsonl")), cwd=tmp_path),
               "absent.jsonl: no such file")


def test_validate_refuses_dpsgd_with_gradient_checkpointing(tmp_path):
    job = _job(tmp_path, _pairs_file(tmp_path), model={"gradient_checkpointing": True},
               methods=[{"method": "dpsgd"}])
    _one_error(_cli("validate", str(job), cwd=tmp_path), "model.gradient_checkpointing")


def test_a_lost_draw_stops_run_before_anything_starts(tmp_path):
    from props_ray.config import load_job
    from props_ray.data.prepare import prepare_data

    job = _job(tmp_path, _pairs_file(tmp_path))
    data = prepare_data(load_job(job))
    data.ledger.ensure_draw(data.dataset, 0.5, accept_new_draw=None, seed=0, job="cli")
    (data.ledger.root / "draw-1.parquet").unlink()
    done = _cli("run", str(job), cwd=tmp_path)
    _one_error(done, "draw-1.parquet is missing", "spend privacy again", "privacy.accept_new_draw=2")
    assert not (tmp_path / "mlflow.db").exists()
    # validate shows the ledger and the same refusal
    _one_error(_cli("validate", str(job), cwd=tmp_path), "is missing")


def test_validate_shows_the_ledger_and_its_cumulative_epsilon(tmp_path):
    from props_ray.config import load_job
    from props_ray.data.prepare import prepare_data

    job = _job(tmp_path, _pairs_file(tmp_path), privacy={"epsilons": [0.5, 1.0]})
    done = _cli("validate", str(job), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "no RR draw yet; this job draws at epsilon 1" in done.stdout
    data = prepare_data(load_job(job))
    data.ledger.ensure_draw(data.dataset, 1.0, accept_new_draw=None, seed=0, job="cli")
    done = _cli("validate", str(job), cwd=tmp_path)
    assert "draw 1 at epsilon 1 for 60 pairs; cumulative label-epsilon spent on this dataset 1" in done.stdout
    assert "reuses it" in done.stdout
    assert not pd.read_parquet(data.ledger.root / "draw-1.parquet").empty


def test_an_alpaca_eval_tie_is_skipped_and_counted_while_a_malformed_row_still_stops(tmp_path):
    rows = [{"instruction": f"q{i}", "output_1": f"a {i}", "output_2": f"b {i}", "preference": 1 + i % 2}
            for i in range(60)]
    rows[21]["preference"] = 1.5
    path = tmp_path / "annotations.json"
    path.write_text(json.dumps(rows))
    done = _cli("validate", str(_job(tmp_path, path)), cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 ties skipped" in done.stdout and "bad rows" not in done.stdout
    rows[33]["preference"] = "n/a"
    path.write_text(json.dumps(rows))
    _one_error(_cli("validate", str(_job(tmp_path, path)), cwd=tmp_path), "row 33", "'preference'")


def test_use_gpu_without_a_gpu_is_one_message_before_any_training(tmp_path):
    """This machine has no GPU: the local Ray instance has none, and the job stops before its MLflow run
    opens, a label is drawn or a worker starts."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("needs a machine without a GPU")
    job = _job(tmp_path, "embedded", data={"source": "embedded", "num_pairs": 60, "eval_prompts": 4},
               eval={}, train={"use_gpu": True, "num_workers": 1})
    done = _cli("run", str(job), cwd=tmp_path)
    _one_error(done, "train.use_gpu: true needs 1 GPU (one per worker", "has 0", "set train.use_gpu: false")
    assert not list((tmp_path / "runs").rglob("draw-*.parquet"))  # no label drawn
    assert not [p for p in (tmp_path / "runs" / "cli").rglob("*") if p.name != "tracking-journal.jsonl"]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert not [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
