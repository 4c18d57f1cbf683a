"""``props-ray submit`` against a real Ray cluster and a real MLflow tracking server, no mocks.

The module fixture starts, on 127.0.0.1 and on free ports, a Ray head (4 logical CPUs, dashboard + Jobs
API), a second Ray node (2 logical CPUs) joined to it, and ``mlflow server``; the tests submit through the
Ray Jobs API exactly as a user would (``props-ray submit`` in a subprocess, from the repository root, so
the repository is the uploaded working dir) and read the run tree back from the MLflow server.

Everything the fixture starts is stopped by process id, even when a test fails: the Ray processes are
the ones whose command line names this cluster's private temp dir (plus their descendants, e.g. the job's
driver), and the MLflow server is its own process group. ``ray stop`` is never used: it would stop every
Ray instance on the machine, other test runs' included.

The cluster uses Ray's token authentication with a random token of its own, so it neither depends on nor
touches ``~/.ray/auth_token``.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest

from props_ray.cli import main
from props_ray.storage import check_shared_storage, is_network_fs, mount_for, read_mounts
from props_ray.submit import DEFAULT_EXCLUDES, SubmitError, build_submission

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _exe(name: str) -> str:
    p = BIN / name
    if p.exists():
        return str(p)
    found = shutil.which(name)
    assert found, f"{name} is not installed next to {sys.executable} nor on PATH"
    return found


# -- shared-storage check (pure; a fake /proc/mounts) ------------------------------------------

MOUNTS = r"""/dev/vda / ext4 rw,relatime 0 0
proc /proc proc rw 0 0
fs-1234.efs.us-west-2.amazonaws.com:/ /mnt/shared nfs4 rw,vers=4.1 0 0
tmpfs /mnt/shared/scratch tmpfs rw 0 0
gcsfuse /mnt/gcs fuse.gcsfuse rw 0 0
//files/share /mnt/team\040share cifs rw 0 0
10.0.0.5@tcp:/lustre /lustre lustre rw 0 0
"""


@pytest.fixture()
def mounts(tmp_path):
    p = tmp_path / "mounts"
    p.write_text(MOUNTS)
    return p


def test_mount_table_parsing_and_longest_prefix(mounts):
    table = read_mounts(mounts)
    assert [m.mount_point for m in table][-2:] == ["/mnt/team share", "/lustre"]
    assert mount_for("/mnt/shared/runs/x", table).fs_type == "nfs4"
    assert mount_for("/mnt/shared/scratch/x", table).fs_type == "tmpfs"   # a nested mount shadows NFS
    assert mount_for("/mnt/sharedx/runs", table).fs_type == "ext4"        # prefix on whole components only
    assert mount_for("/mnt/shared", table).fs_type == "nfs4"
    assert is_network_fs("nfs4") and is_network_fs("fuse.juicefs") and is_network_fs("lustre")
    assert not is_network_fs("ext4") and not is_network_fs("overlay") and not is_network_fs("tmpfs")


@pytest.mark.parametrize("path", ["/mnt/shared/runs", "/mnt/gcs/runs", "/mnt/team share/runs", "/lustre/p/runs",
                                  "file:///mnt/shared/runs"])
def test_shared_paths_pass_on_a_multi_node_cluster(path, mounts, monkeypatch):
    monkeypatch.delenv("PROPS_RAY_SHARED_STORAGE", raising=False)
    check_shared_storage(path, num_nodes=3, mounts_file=mounts)


@pytest.mark.parametrize("path,fs", [("/home/me/runs", "ext4"), ("/mnt/shared/scratch/runs", "tmpfs"),
                                     ("/mnt/sharedx/runs", "ext4")])
def test_local_paths_fail_on_a_multi_node_cluster(path, fs, mounts, monkeypatch):
    monkeypatch.delenv("PROPS_RAY_SHARED_STORAGE", raising=False)
    with pytest.raises(ValueError) as err:
        check_shared_storage(path, num_nodes=2, mounts_file=mounts)
    msg = str(err.value)
    assert repr(path) in msg and "2 alive nodes" in msg and f"on {fs}" in msg
    assert "every node" in msg and "NFS" in msg and "PROPS_RAY_SHARED_STORAGE=1" in msg
    check_shared_storage(path, num_nodes=1, mounts_file=mounts)  # one node: anything local is fine
    monkeypatch.setenv("PROPS_RAY_SHARED_STORAGE", "1")
    check_shared_storage(path, num_nodes=2, mounts_file=mounts)  # declared shared


def test_symlinks_are_resolved_before_the_lookup(tmp_path, mounts, monkeypatch):
    monkeypatch.delenv("PROPS_RAY_SHARED_STORAGE", raising=False)
    (tmp_path / "link").symlink_to("/mnt/shared")
    check_shared_storage(str(tmp_path / "link" / "runs"), num_nodes=2, mounts_file=mounts)
    (tmp_path / "local").symlink_to("/mnt/shared/scratch")
    with pytest.raises(ValueError, match="/mnt/shared/scratch/runs"):
        check_shared_storage(str(tmp_path / "local" / "runs"), num_nodes=2, mounts_file=mounts)


@pytest.mark.parametrize("uri", ["s3://bucket/runs", "gs://bucket/runs", "abfs://c@a.dfs.core.windows.net/r"])
def test_object_store_uris_are_not_supported_yet(uri, mounts, monkeypatch):
    monkeypatch.setenv("PROPS_RAY_SHARED_STORAGE", "1")
    with pytest.raises(ValueError, match="does not support yet") as err:
        check_shared_storage(uri, num_nodes=1, mounts_file=mounts)
    assert uri in str(err.value) and "/mnt/shared/runs" in str(err.value)


# -- building a submission (no cluster) ----------------------------------------------------------

def test_submission_entrypoint_runtime_env_and_env_pass_through(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    monkeypatch.setenv("PROPS_RAY_SHARED_STORAGE", "1")
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    sets = ["output_dir=/mnt/shared/runs", "methods=[{method: nonprivate}, {method: rr}]",
            "tracking.experiment=it's mine"]
    sub = build_submission("jobs/demo.yaml", sets, env=["HF_TOKEN=abc=def"], submission_id="my id")
    assert sub.entrypoint.startswith("props-ray run jobs/demo.yaml --set output_dir=/mnt/shared/runs "
                                     "--set 'methods=[{method: nonprivate}, {method: rr}]' --set ")
    assert shlex.split(sub.entrypoint) == ["props-ray", "run", "jobs/demo.yaml",
                                           "--set", sets[0], "--set", sets[1], "--set", sets[2]]
    env = sub.runtime_env
    assert env["working_dir"] == str(REPO)
    assert {"/.venv", "/runs", "/mlflow.db", "/mlruns", ".git"} <= set(env["excludes"])
    assert env["env_vars"] == {"MLFLOW_TRACKING_URI": "http://mlflow.internal:5000", "PROPS_RAY_SHARED_STORAGE": "1",
                               "HF_TOKEN": "abc=def", "RAY_OVERRIDE_JOB_RUNTIME_ENV": "1"}
    assert "pip" not in env
    assert sub.submission_id == "my-id" and sub.cfg.tracking.experiment == "it's mine" and sub.warnings == []


def test_submission_warns_about_a_relative_output_dir_and_no_tracking_server(monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    sub = build_submission("jobs/demo.yaml", [], pip=["props-ray==0.1.0"])
    assert sub.runtime_env["pip"] == ["props-ray==0.1.0"]
    assert any("output_dir 'runs' is relative" in w for w in sub.warnings)
    assert any("no MLflow tracking server" in w for w in sub.warnings)
    assert sub.submission_id.startswith("props-ray-demo-")


def test_submission_refuses_what_would_not_be_uploaded(tmp_path):
    job = (REPO / "jobs" / "demo.yaml").read_text()
    (tmp_path / "runs").mkdir()
    (tmp_path / "runs" / "job.yaml").write_text(job)
    with pytest.raises(SubmitError, match="excluded directory"):
        build_submission(str(tmp_path / "runs" / "job.yaml"), [], working_dir=str(tmp_path))
    (tmp_path / "job.yaml").write_text(job)
    with pytest.raises(SubmitError, match="outside the working dir"):
        build_submission(str(tmp_path / "job.yaml"), [], working_dir=str(REPO))
    (tmp_path / "weights.bin").write_bytes(b"\0" * (3 * 2**20))
    with pytest.raises(SubmitError, match=r"weights\.bin \(3\.0 MiB\)"):
        build_submission(str(tmp_path / "job.yaml"), [], working_dir=str(tmp_path), max_upload_mib=2)
    sub = build_submission(str(tmp_path / "job.yaml"), [], working_dir=str(tmp_path), max_upload_mib=2,
                           excludes=["/weights.bin"])
    assert sub.entrypoint == "props-ray run job.yaml" and "/weights.bin" in sub.runtime_env["excludes"]
    assert set(DEFAULT_EXCLUDES) <= set(sub.runtime_env["excludes"])


def test_submit_validates_the_job_before_contacting_the_cluster(capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    rc = main(["submit", "jobs/demo.yaml", "--set", "train.num_wrkers=2", "--address", "http://127.0.0.1:9"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "field 'train.num_wrkers': unknown field" in err


# -- a real cluster ---------------------------------------------------------------------------

_taken: set[int] = set()


def _free_port(start: int) -> int:
    for port in range(start, start + 500):
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("0.0.0.0", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError(f"no free port from {start}")


def _cluster_processes(tag: str):
    """Processes whose command line names this cluster's temp dir, and their descendants."""
    import psutil

    me = psutil.Process()
    skip = {me.pid, *(p.pid for p in me.parents())}
    found = {}
    for p in psutil.process_iter(["cmdline"]):
        try:
            if p.pid not in skip and any(tag in a for a in (p.info["cmdline"] or [])):
                found[p.pid] = p
                for c in p.children(recursive=True):
                    found[c.pid] = c
        except psutil.Error:
            pass
    return [p for pid, p in found.items() if pid not in skip]


def _stop_cluster(tag: str) -> list[int]:
    """Stop this cluster's processes by pid: raylets first (they end their workers), then the rest."""
    import psutil

    stopped = []
    for _ in range(3):
        procs = _cluster_processes(tag)
        if not procs:
            break
        raylets = []
        for p in procs:
            try:
                if p.cmdline()[:1] and p.cmdline()[0].endswith("/raylet"):
                    raylets.append(p)
            except psutil.Error:
                pass
        for group in (raylets, procs):
            for p in group:
                try:
                    p.terminate()
                    stopped.append(p.pid)
                except psutil.Error:
                    pass
            _, alive = psutil.wait_procs(group, timeout=8)
            for p in alive:
                try:
                    p.kill()
                except psutil.Error:
                    pass
            psutil.wait_procs(alive, timeout=5)
    return sorted(set(stopped))


def _stop_group(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    except ProcessLookupError:
        pass


def _run(cmd, env, timeout, cwd=None) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, env=env, cwd=cwd, timeout=timeout, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    assert r.returncode == 0, f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stdout[-4000:]}"
    return r


def _wait_http(url: str, timeout: float, proc: subprocess.Popen | None = None, log: Path | None = None,
               token: str | None = None) -> None:
    deadline = time.time() + timeout
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"{url}: the server exited ({proc.returncode}):\n"
                                 + (log.read_text()[-4000:] if log else ""))
        try:
            with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=5) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {timeout:.0f}s" + ("\n" + log.read_text()[-4000:] if log else ""))


@pytest.fixture(scope="module")
def cluster():
    # A short private temp dir: Ray's unix sockets live under it (path length limit ~107 bytes).
    base = Path(tempfile.mkdtemp(prefix="prc", dir="/tmp"))
    tag = str(base) + "/"
    env = {k: v for k, v in os.environ.items()
           if k not in ("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "MLFLOW_TRACKING_URI", "RAY_AUTH_TOKEN_PATH")}
    env.update({"PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}", "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0",
                "PYTHONUNBUFFERED": "1"})
    gcs, dash, client = _free_port(6390), _free_port(8275), _free_port(20390)
    agent_head, agent_worker, mlport = _free_port(52390), _free_port(52390), _free_port(5390)
    mlflow_log = base / "mlflow.log"
    mlflow = None
    timings = {}
    t0 = time.time()
    try:
        with open(mlflow_log, "w") as log:  # started first: it comes up while Ray does
            mlflow = subprocess.Popen(
                [_exe("mlflow"), "server", "--host", "127.0.0.1", "--port", str(mlport), "--workers", "1",
                 "--backend-store-uri", f"sqlite:///{base}/mlflow.db", "--artifacts-destination",
                 str(base / "artifacts")],
                cwd=base, env={**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # no job-runner pool
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        (base / "h").mkdir()
        (base / "w").mkdir()
        common = ["--node-ip-address=127.0.0.1", "--object-store-memory=300000000", "--disable-usage-stats"]
        _run([_exe("ray"), "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
              f"--dashboard-port={dash}", "--num-cpus=4", "--include-dashboard=true", f"--temp-dir={base}/h",
              f"--ray-client-server-port={client}", f"--dashboard-agent-listen-port={agent_head}", *common],
             env, timeout=240)
        timings["head"] = time.time() - t0
        _run([_exe("ray"), "start", f"--address=127.0.0.1:{gcs}", "--num-cpus=2", f"--temp-dir={base}/w",
              f"--dashboard-agent-listen-port={agent_worker}", *common], env, timeout=240)
        timings["worker"] = time.time() - t0
        _wait_http(f"http://127.0.0.1:{dash}/api/version", 120, token=env["RAY_AUTH_TOKEN"])
        _wait_http(f"http://127.0.0.1:{mlport}/health", 240, mlflow, mlflow_log)
        timings["ready"] = time.time() - t0
        print(f"\ncluster up: {timings}", flush=True)
        yield {"base": base, "env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dash}",
               "mlflow": f"http://127.0.0.1:{mlport}"}
    finally:
        stopped = _stop_cluster(tag)
        if mlflow is not None:
            _stop_group(mlflow)
        left = _cluster_processes(tag)
        print(f"\nstopped {len(stopped)} Ray processes by pid; {len(left)} left", flush=True)
        shutil.rmtree(base, ignore_errors=True)
        assert not left, f"processes of the test cluster still running: {[p.pid for p in left]}"


STORAGE_PROBE = """
import json, os, sys
import ray
ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=False)
from props_ray.storage import check_shared_storage
out = {"nodes": sum(1 for n in ray.nodes() if n["Alive"])}
try:
    check_shared_storage(sys.argv[1])
    out["local"] = None
except ValueError as err:
    out["local"] = str(err)
os.environ["PROPS_RAY_SHARED_STORAGE"] = "1"
check_shared_storage(sys.argv[1])
ray.shutdown()
print("PROBE " + json.dumps(out))
"""


def test_two_node_cluster_refuses_a_local_output_dir(cluster):
    path = str(cluster["base"] / "runs")
    env = {**cluster["env"], "RAY_ADDRESS": cluster["gcs"]}
    env.pop("PROPS_RAY_SHARED_STORAGE", None)
    r = _run([sys.executable, "-c", STORAGE_PROBE, path], env, timeout=180, cwd=REPO)
    out = json.loads(r.stdout.split("PROBE ", 1)[1])
    assert out["nodes"] == 2
    fs = mount_for(path, read_mounts())
    if fs is not None and is_network_fs(fs.fs_type):
        pytest.skip(f"{path} is on {fs.fs_type} here: shared, so no error is expected")
    assert out["local"] and path in out["local"] and "2 alive nodes" in out["local"]


DEMO_SETS = ["name=cluster-ci", "stages=2", "data.num_pairs=120", "data.eval_prompts=8", "train.num_workers=1",
             "train.batch_size=16", "train.epochs=1", "train.log_every=1", "model.sft.steps=60",
             "model.sft.examples=512", "eval.samples_per_prompt=1", "privacy.epsilons=[0.5]",
             "methods=[{method: nonprivate}, {method: rr}]", "tracking.experiment=props-ray-cluster-ci"]


def _submit(cluster, sets, timeout, extra=()):
    env = {**cluster["env"], "MLFLOW_TRACKING_URI": cluster["mlflow"]}
    cmd = [_exe("props-ray"), "submit", "jobs/demo.yaml", "--address", cluster["dashboard"], *extra]
    for s in sets:
        cmd += ["--set", s]
    t = time.time()
    r = subprocess.run(cmd, cwd=REPO, env=env, timeout=timeout, text=True, stdout=subprocess.PIPE,
                       stderr=subprocess.STDOUT)
    return r, time.time() - t


def test_submit_runs_the_demo_on_the_cluster_and_tracks_to_the_server(cluster):
    out_dir = cluster["base"] / "runs"
    # Both nodes are on this machine, so the temp dir is shared between them: say so (the real check runs).
    r, seconds = _submit(cluster, DEMO_SETS + [f"output_dir={out_dir}"], timeout=900,
                         extra=["--env", "PROPS_RAY_SHARED_STORAGE=1"])
    tail = r.stdout[-6000:]
    assert r.returncode == 0, f"props-ray submit exited {r.returncode}:\n{tail}"
    m = re.search(r"job (props-ray-cluster-ci-\S+) SUCCEEDED after ([\d.]+)s", r.stdout)
    assert m, tail
    print(f"\nsubmitted job {m.group(1)}: SUCCEEDED after {m.group(2)}s (props-ray submit: {seconds:.1f}s)")
    print("\n".join(line for line in r.stdout.splitlines()
                    if re.match(r"(\[(nonprivate|rr-eps0\.5)\] |reference model:|data: |job cluster-ci finished)", line)))
    for trial in ("rr-eps0.5", "nonprivate"):  # the streamed driver log: each trial's result line
        assert re.search(rf"\[{re.escape(trial)}\] reward .* win rate ", r.stdout), tail
    assert (out_dir / "cluster-ci" / "summary" / "summary.csv").is_file()

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=cluster["mlflow"])
    exp = client.get_experiment_by_name("props-ray-cluster-ci")
    assert exp is not None
    runs = client.search_runs([exp.experiment_id], max_results=100)
    jobs = [x for x in runs if x.data.tags.get("props_ray.kind") == "job"]
    assert [j.info.run_name for j in jobs] == ["cluster-ci"] and jobs[0].info.status == "FINISHED"
    job = jobs[0]
    trials = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == job.info.run_id]
    assert sorted((t.data.params["method"], t.data.params["epsilon"]) for t in trials) == \
        [("nonprivate", "inf"), ("rr", "0.5")]
    for t in trials:
        assert t.info.status == "FINISHED"
        assert 0.0 <= t.data.metrics["win_rate"] <= 1.0
        assert 0.0 <= t.data.metrics["label_accuracy"] <= 1.0
        stages = [x for x in runs if x.data.tags.get("mlflow.parentRunId") == t.info.run_id]
        assert sorted(s.data.params["stage"] for s in stages) == ["1", "2"]
        for s in stages:
            assert s.data.tags.get("props_ray.kind") == "stage"
            assert client.get_metric_history(s.info.run_id, "loss"), s.info.run_name
        assert any(a.path.endswith("adapter_config.json") for a in client.list_artifacts(t.info.run_id, "adapter"))
    by_method = {t.data.params["method"]: t for t in trials}
    assert by_method["nonprivate"].data.metrics["label_accuracy"] == 1.0
    assert by_method["rr"].data.metrics["label_accuracy"] < 0.9  # RR at eps=0.5 keeps a label w.p. 0.62
    assert {"job.yaml", "summary.csv", "summary.md"} <= {a.path for a in client.list_artifacts(job.info.run_id)}
    # the artifacts went through the server to its --artifacts-destination
    assert list((cluster["base"] / "artifacts").rglob("adapter_config.json"))


def test_a_failing_job_exits_1_and_shows_why(cluster):
    dead = _free_port(5490)  # nothing listens there
    r, _ = _submit(cluster, ["name=cluster-ci-fail", f"output_dir={cluster['base'] / 'runs'}",
                             f"tracking.tracking_uri=http://127.0.0.1:{dead}"], timeout=300)
    assert r.returncode == 1, r.stdout[-4000:]
    assert re.search(r"job props-ray-cluster-ci-fail-\S+ FAILED", r.stdout), r.stdout[-4000:]
    assert "is not reachable" in r.stdout  # the driver's error, streamed back
