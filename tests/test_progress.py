"""The quiet console: progress lines from workers, one line per training run, no Ray internals."""

import io
import os
import subprocess
import sys
from pathlib import Path

from props_ray import progress

ROOT = Path(__file__).resolve().parents[1]


def _events(run="rr-eps1", steps=3):
    out = [{"kind": "line", "text": "job demo: starting", "time": 0.0}]
    for i in range(1, steps + 1):
        out.append({"kind": "step", "run": run, "stage": 1, "epoch": 0, "epochs": 1, "step": 10 * i,
                    "pairs": 320 * i, "total_pairs": 320 * steps, "loss": 0.7 - 0.01 * i, "epsilon": None,
                    "time": float(i)})
    out.append({"kind": "end", "run": run, "what": "trained stage 1", "seconds": 4.5, "label": run, "time": 4.0})
    return out


def test_a_run_is_one_line_when_not_a_terminal():
    out = io.StringIO()
    progress.Console(out=out, live=False).render(_events())
    lines = out.getvalue().splitlines()
    assert lines == ["job demo: starting",
                     "[rr-eps1] trained stage 1: 30 steps in 4.5s (320/s), loss 0.6700"]


def test_a_terminal_redraws_the_run_in_place_with_rate_and_eta():
    out = io.StringIO()
    progress.Console(out=out, live=True).render(_events())
    text = out.getvalue()
    assert text.count("\n") == 2  # the message and the finished run; the steps were redrawn in place
    assert "\r\033[K[rr-eps1] stage 1 epoch 1/1 step 20: loss 0.6800 · 320/s · ETA 1s" in text
    assert text.endswith("[rr-eps1] trained stage 1: 30 steps in 4.5s (320/s), loss 0.6700\n")


def test_without_a_board_an_event_prints(capsys):
    progress.step("dpsgd-eps1", stage=2, epoch=1, epochs=2, step=7, epsilon=0.5)
    assert capsys.readouterr().out.strip() == "[dpsgd-eps1] stage 2 epoch 2/2 step 7: ε 0.500"


def _run_cli(tmp_path, *args):
    job = tmp_path / "job.yaml"
    job.write_text("name: quiet\nseed: 0\nstages: 2\ndata: {source: embedded, num_pairs: 96, eval_prompts: 8}\n"
                   "train: {num_workers: 2, batch_size: 16, epochs: 1, log_every: 1}\n"
                   "eval: {samples_per_prompt: 1}\nprivacy: {epsilons: [1]}\n"
                   "methods: [{method: nonprivate}, {method: props, rule: mle}]\n")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("RAY_ADDRESS", None)
    env.pop("MLFLOW_TRACKING_URI", None)  # the job's own store (sqlite in tmp_path), whatever ran before
    return subprocess.run([sys.executable, "-m", "props_ray.cli", *args, "run", str(job)], cwd=tmp_path,
                          capture_output=True, text=True, env=env, timeout=900)


def test_the_console_is_quiet_and_shows_each_training_run(tmp_path):
    done = _run_cli(tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = (done.stdout + done.stderr).splitlines()
    for internal in ("TrainingReport", "SplitCoordinator", "TrainController", "Checkpoint successfully",
                     "RayTrainWorker", "Warning", "WARNING"):
        assert not any(internal in line for line in lines), internal
    runs = [line for line in lines if " steps in " in line]
    # nonprivate trains both stages in one run; PROPS one run per stage, the relabel between them
    assert [line.split(":")[0] for line in runs] == ["[nonprivate] trained stages 1, 2",
                                                     "[props-mle-eps1] trained stage 1",
                                                     "[props-mle-eps1] trained stage 2"], runs
    assert any(line.startswith("[props-mle-eps1] reward ") and "win rate" in line for line in lines)
    assert len(lines) <= 30, "\n".join(lines)
