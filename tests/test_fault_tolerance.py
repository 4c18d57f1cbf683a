"""Failures lose nothing: a worker dies mid-stage, the driver is killed mid-job, the tracking
server goes away. Real Ray, real MLflow (server processes), no mocks."""

import json
import math
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from props_ray.config import validate_job
from props_ray.driver import Job


def _job(raw, tmp_path, **over):
    raw = json.loads(json.dumps(raw))
    raw.update({"output_dir": str(tmp_path / "runs"),
                "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}})
    for k, v in over.items():
        raw[k] = v
    return raw


@pytest.mark.parametrize("worker_group", ["shared", "per_run"])
def test_worker_failure_resumes_stage_from_last_checkpoint(ray_local, tiny_job_raw, tmp_path, monkeypatch,
                                                           worker_group):
    # 2 workers, batch 16 -> 8 pairs per worker step; 2 epochs. The fault comes in stage 1's second epoch.
    # The job's trainings in one shared worker group, or a worker group per run: Ray Train restarts it.
    raw = _job(tiny_job_raw, tmp_path, name="worker-fault", methods=[{"method": "rr"}])
    raw["train"] = {**raw["train"], "epochs": 2, "worker_group": worker_group}
    cfg = validate_job(raw)
    from props_ray.data.prepare import prepare_data

    n1, n2 = (len(p) for p in prepare_data(cfg).partitions)
    per_epoch = [math.ceil(math.ceil(n / 2) / 8) for n in (n1, n2)]
    fault = per_epoch[0] + 2
    monkeypatch.setenv("PROPS_RAY_FAIL_AT", f"1:{fault}")  # after stage 1's first (epoch-end) checkpoint
    results = Job(cfg).run()
    assert (cfg.job_dir / f".fault-injected-stage1-step{fault}").exists()  # the fault did fire
    state = json.loads((cfg.job_dir / "trials" / "rr-eps0.5" / "state.json").read_text())
    assert sorted(state["stages"]) == ["1", "2"]
    assert state["stages"]["1"]["metrics"]["step"] == 2 * per_epoch[0]  # the stage completed all of its steps
    total = 2 * sum(per_epoch)
    assert state["stages"]["2"]["metrics"]["step"] == total
    rows = [json.loads(x) for x in (Path(state["stages"]["2"]["path"]) / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows]
    assert steps == sorted(set(steps)) and steps[-1] == total  # resumed, not restarted or duplicated
    assert results[0].win.n > 0


# One gunicorn worker and no background job runner: the server starts in seconds on a small machine.
SERVER_ENV = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_driver_killed_mid_job_resumes_without_redrawing(tiny_job_raw, tmp_path):
    raw = _job(tiny_job_raw, tmp_path, name="driver-kill", methods=[{"method": "props"}])
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump(raw))
    cfg = validate_job(raw)
    state = cfg.job_dir / "trials" / "props-mle-eps0.5" / "state.json"
    env = {**os.environ, "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    cli = [sys.executable, "-m", "props_ray.cli", "run", str(job)]
    proc = subprocess.Popen(cli, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 900  # generous: CI machines are small and may be loaded
        while time.time() < deadline and proc.poll() is None:
            if state.exists() and "1" in json.loads(state.read_text())["stages"]:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "the driver ended before stage 1 was checkpointed"
        os.killpg(proc.pid, signal.SIGKILL)  # the driver and the local Ray it started
        proc.wait(30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    priv = sorted((cfg.job_dir.parent / "ledger").rglob("draw-*.parquet"))
    assert len(priv) == 1  # one draw for the dataset, written before stage 1 trained
    before = {p: p.read_bytes() for p in priv}
    stage1 = json.loads(state.read_text())["stages"]["1"]["path"]

    done = subprocess.run(cli, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert {p: p.read_bytes() for p in sorted((cfg.job_dir.parent / "ledger").rglob("draw-*.parquet"))} == before
    final = json.loads(state.read_text())
    assert final["stages"]["1"]["path"] == stage1  # stage 1 was not trained again
    assert "result" in final

    from mlflow.tracking import MlflowClient

    client = MlflowClient(cfg.tracking.resolved_uri())
    exp = client.get_experiment_by_name(cfg.tracking.experiment).experiment_id
    runs = client.search_runs([exp], max_results=100)
    keys = [r.data.tags["props_ray.key"] for r in runs]
    assert len(keys) == len(set(keys)) == 1 + 1 + cfg.stages  # job, trial, stages: no duplicates
    assert all(r.info.status == "FINISHED" for r in runs)


@pytest.fixture
def mlflow_server(tmp_path):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
                             "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                             "--artifacts-destination", str(tmp_path / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=SERVER_ENV)
    uri = f"http://127.0.0.1:{port}"

    def wait_up():
        import urllib.request

        for _ in range(600):
            try:
                urllib.request.urlopen(uri + "/health", timeout=1)
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError("mlflow server did not start within 5 minutes")
    wait_up()
    server = {"uri": uri, "proc": proc, "tmp": tmp_path, "port": port}
    yield server
    proc = server["proc"]  # a test that restarts the server puts the new process here
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(30)


def test_tracking_unreachable_at_start_fails_fast(tmp_path):
    from props_ray.tracking import Tracker, TrackingUnavailable

    uri = f"http://127.0.0.1:{_free_port()}"
    t0 = time.time()
    with pytest.raises(TrackingUnavailable, match="not reachable"):
        Tracker(uri, "x", check_timeout=3)
    assert time.time() - t0 < 20


def test_tracking_outage_mid_run_is_journaled_and_replayed(mlflow_server):
    from mlflow.tracking import MlflowClient

    from props_ray.tracking import Tracker

    journal = mlflow_server["tmp"] / "journal.jsonl"
    tracker = Tracker(mlflow_server["uri"], "outage", journal=journal)
    run = tracker.run("k", "k")
    tracker.metrics(run, {"loss": 1.0}, step=1)
    os.killpg(mlflow_server["proc"].pid, signal.SIGTERM)  # the server goes away
    mlflow_server["proc"].wait(30)
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    try:
        tracker.metrics(run, {"loss": 0.5}, step=2)
        tracker.metrics(run, {"win_rate": 0.75})
    finally:
        os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES")
    assert len(journal.read_text().splitlines()) == 2  # written locally, nothing lost
    # the server comes back on the same port and store
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port",
                             str(mlflow_server["port"]), "--backend-store-uri",
                             f"sqlite:///{mlflow_server['tmp']}/server.db", "--artifacts-destination",
                             str(mlflow_server["tmp"] / "artifacts"), "--workers", "1"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=SERVER_ENV)
    mlflow_server["proc"] = proc
    import urllib.request

    for _ in range(600):
        try:
            urllib.request.urlopen(mlflow_server["uri"] + "/health", timeout=1)
            break
        except OSError:
            time.sleep(0.5)
    assert tracker.flush() == 2
    assert not journal.exists()
    client = MlflowClient(mlflow_server["uri"])
    assert [m.value for m in client.get_metric_history(run, "loss")] == [1.0, 0.5]
    assert client.get_run(run).data.metrics["win_rate"] == 0.75
