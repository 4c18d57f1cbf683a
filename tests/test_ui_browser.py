"""`props-ray ui` in a real browser: a real MLflow UI server on a real store that props-ray's Tracker wrote,
loaded by headless Chromium, which must show the trials, flat and with their results as columns.

Chromium is a Debian package (`apt-get install chromium`); .ci/run installs it, so in CI its absence is a
failure. Elsewhere the test is skipped without it."""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

from props_ray.tracking import TRIALS_VIEW, Tracker

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

pytestmark = pytest.mark.e2e


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _chromium(*args: str, timeout: int = 120) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--window-size=1600,1000",
           "--virtual-time-budget=20000", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout).stdout


@pytest.fixture
def store(tmp_path):
    """A job run with two trials (each with a stage run) and the job's own results, as a job logs them."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    t = Tracker(uri, "props-ray-ui")
    job = t.run("job", "ui-job")
    t.metrics(job, {"seconds_total": 12.0})
    for name, method, eps, win, reward in (("rr-eps0.5", "rr", "0.5", 0.87, 0.79),
                                           ("props-mle-eps0.5", "props-mle", "0.5", 0.99, 1.49)):
        trial = t.run(f"job/{name}", name, parent=job)
        t.params(trial, {"method_name": method, "epsilon": eps, "seed": 0})
        stage = t.run(f"job/{name}/stage1", f"{name}-stage-1", parent=trial)
        t.metrics(stage, {"loss": 0.69})
        t.finish(stage)
        t.metrics(trial, {"win_rate": win, "reward_mean": reward, "label_accuracy": 0.62})
        t.finish(trial)
    t.finish(job)
    return uri


@pytest.mark.skipif(CHROMIUM is None and os.environ.get("CI") != "true",
                    reason="headless Chromium is not installed (apt-get install chromium)")
def test_ui_opens_on_the_trials_with_their_results(store, tmp_path):
    assert CHROMIUM, "CI installs chromium (.ci/run); it is missing"
    port = _free_port()
    ui = subprocess.Popen([sys.executable, "-m", "props_ray.cli", "ui", "--tracking-uri", store,
                           "--port", str(port)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          cwd=tmp_path, start_new_session=True)  # its own group: the server it starts goes too
    try:
        url = None
        for line in ui.stdout:  # props-ray ui prints each experiment's URL before the server starts
            if "props-ray-ui:" in line:
                url = line.split(": ", 1)[1].strip()
                break
        assert url and f"viewStateShareKey={TRIALS_VIEW}" in url and "workflowType=machine_learning" in url, url
        for _ in range(120):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                time.sleep(0.5)
        dom = _chromium("--dump-dom", url)
        shot = tmp_path / "ui.png"
        _chromium(f"--screenshot={shot}", url)
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)
    # The trials are rows, not collapsed under the job run; the job and stage runs are filtered out.
    assert "rr-eps0.5" in dom and "props-mle-eps0.5" in dom, dom[-2000:]
    assert "ui-job" not in dom and "stage-1" not in dom
    # Their method and results are columns, and the page is in model-training mode.
    for column in ("method_name", "win_rate", "reward_mean", "label_accuracy"):
        assert column in dom
    assert "Model training" in dom
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
