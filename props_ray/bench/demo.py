"""Demo wall time: a job end to end (by default ``jobs/demo.yaml``), with where the time went.

The breakdown comes from the job's own timers (the ``seconds_*`` metrics of
its MLflow job run): Ray start (with the tracking store), the reference/SFT
model, the data step with the reference generations, and per trial its
training runs, PROPS relabels, evaluation (generation and judging) and the
rest (tracking, privatized labels); the job's closing summary and plots are
what is left of the wall time.
"""

from __future__ import annotations

import time


def measure(job_path: str, output_dir: str, overrides: list[str] | None = None, say=print) -> dict:
    """Run the job from scratch in ``output_dir`` (the bench's own directory, emptied first: a job
    finds its finished trials and its reference model there and would reuse them, timing nothing)."""
    import shutil

    from props_ray.config import load_job
    from props_ray.driver import Job

    shutil.rmtree(output_dir, ignore_errors=True)
    cfg = load_job(job_path, [f"output_dir={output_dir}", f"tracking.tracking_uri=sqlite:///{output_dir}/mlflow.db",
                              *(overrides or [])])
    t = time.time()
    job = Job(cfg, say=say)
    results = job.run()
    wall = time.time() - t
    tm = dict(job.timings)
    parts = {"ray_start": tm.pop("ray_start", 0.0),
             "reference": sum(v for k, v in tm.items() if k.startswith("reference")),
             "data_and_reference_eval": sum(v for k, v in tm.items() if k.startswith("data_and_reference_eval"))}
    trials = {}
    for r in results:
        total = tm.get(f"trial:{r.trial}", 0.0)
        row = {part: tm.get(f"{r.trial}:{part}", 0.0) for part in ("train", "relabel", "eval")}
        row["other"] = max(0.0, total - sum(row.values()))
        row["total"] = total
        trials[r.trial] = row
    accounted = sum(parts.values()) + sum(t["total"] for t in trials.values())
    parts["summary_and_tracking"] = max(0.0, wall - accounted)
    return {"job": job_path, "overrides": overrides or [], "wall_s": wall, "parts": parts, "trials": trials,
            "results": {r.trial: {"win_rate": r.win.win_rate, "label_accuracy": r.label_accuracy} for r in results}}
