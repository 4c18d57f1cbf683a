"""How a job's results map to MLflow: the job run, a run per trial, a run per stage.

::

    job run (tags props_ray.kind = job, props_ray.privacy)   params, job.yaml, summaries and plots
    └── trial run per (method, epsilon[, seed, K])          params of the method; win rate, label accuracy,
        │                                                   spent epsilon, the ledger's cumulative label-epsilon
        └── stage run per stage                             per-step loss / epsilon, relabel statistics

Only the driver writes here (trials in Ray tasks return their outcome); every name comes from
:mod:`props_ray.metrics`. A trial's params are logged when it opens, its results when it is done.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from props_ray import metrics as M
from props_ray.config import JobConfig, dump_job
from props_ray.methods.trial import EVAL_SCORES
from props_ray.privacy.randomized_response import flip_probability
from props_ray.results import TrialResult, format_table, summary_table
from props_ray.sections import MethodSection
from props_ray.win_rate import WinRate

log = logging.getLogger(__name__)

STAGE_METRIC_KEYS = ("loss", "reward_accuracy", "margin", "epsilon", "reward", "kl")


class RunTree:
    def __init__(self, tracker, job_cfg: JobConfig, job_dir: Path):
        self.tracker = tracker
        self.job_cfg = job_cfg
        self.job_dir = job_dir
        self.job_run: str | None = None

    # -- the job ------------------------------------------------------------------------------
    def open_job(self) -> str:
        cfg = self.job_cfg
        self.job_run = self.tracker.run(cfg.name, cfg.name, tags={"props_ray.kind": "job",
                                                                  M.PRIVACY_TAG: cfg.privacy_status})
        self.tracker.params(self.job_run, {"stages": cfg.stages, "seed": cfg.seed, "data_source": cfg.data.source,
                                           "model": cfg.model.name, "secure_randomness": cfg.secure_randomness})
        config_path = self.job_dir / "job.yaml"
        config_path.write_text(dump_job(cfg))
        self.tracker.artifact(self.job_run, config_path)
        return self.job_run

    def log_draw(self, ledger, suffix: str) -> None:
        """The variant's ledger draw on the job run: a random id, the draw and the cumulative label-epsilon."""
        draw = ledger.current
        self.tracker.params(self.job_run, {f"ledger_id{suffix}": ledger.ledger_id})
        self.tracker.metrics(self.job_run, {f"ledger_draw{suffix}": draw.number,
                                            f"ledger_draw_epsilon{suffix}": draw.epsilon,
                                            f"{M.LABEL_EPSILON_CUMULATIVE}{suffix}": ledger.cumulative_epsilon},
                             step=draw.number)

    def finish_job(self, timings: dict[str, float], status: str = "FINISHED") -> None:
        if status == "FINISHED":
            self.tracker.metrics(self.job_run, {f"seconds_{k.replace(':', '_')}": v for k, v in timings.items()})
        self.tracker.finish(self.job_run, status=status)
        self.tracker.flush()

    # -- a trial ------------------------------------------------------------------------------
    def open_trial(self, cfg: JobConfig, method: MethodSection, epsilon: float | None, name: str, state: dict,
                   ledger) -> str:
        """The trial's run, with the params every trial has and its method's own."""
        run_id = self.tracker.run(f"{self.job_cfg.name}/{name}", name, parent=self.job_run,
                                  tags={"props_ray.kind": "trial", "props_ray.method": method.method,
                                        M.PRIVACY_TAG: cfg.privacy_status})
        params = {"method": method.method, "method_name": method.display_name, "privacy_unit": method.privacy_unit,
                  "epsilon": "inf" if epsilon is None else epsilon,
                  "stages": cfg.stages, "loss": method.stage_loss(1), "beta": cfg.train.beta,
                  "num_workers": cfg.train.num_workers, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                  "lr": cfg.train.lr, "lora": cfg.model.lora.enabled, "seed": cfg.seed,
                  **method.params(cfg.stages), "secure_randomness": cfg.secure_randomness}
        if method.labels == "randomized_response":
            draw = ledger.draws[state["ledger_draw"] - 1]
            params.update({"flip_probability": flip_probability(epsilon), "ledger_id": ledger.ledger_id,
                           "ledger_draw": draw.number, "ledger_draw_epsilon": draw.epsilon})
        self.tracker.params(run_id, params)
        if method.labels == "randomized_response":
            self.tracker.metrics(run_id, {M.LABEL_EPSILON_CUMULATIVE: ledger.cumulative_epsilon})
        return run_id

    def log_trial(self, run_id: str, cfg: JobConfig, method: MethodSection, epsilon: float | None, name: str,
                  state: dict, outcome: dict, trial_dir: Path | None = None) -> TrialResult:
        """Log a computed trial (its stages, results and final adapter) and mark it complete in ``state``."""
        checkpoints = state["stages"]
        for k in sorted(checkpoints, key=int):  # the method's stages (K of them for DPO methods)
            self._log_stage(run_id, name, int(k), checkpoints[k], outcome["stage_info"].get(k, {}),
                            outcome["stage_pairs"].get(k, 0), method)
        final = checkpoints[max(checkpoints, key=int)]
        win, acc, stage_acc, extra = (WinRate(**outcome["win"]), outcome["label_accuracy"],
                                      outcome["stage_label_accuracy"], outcome["extra"])
        self.tracker.params(run_id, method.result_params(checkpoints, cfg))
        self.tracker.metrics(run_id, {M.WIN_RATE: win.win_rate, M.WIN_RATE_CI_LOW: win.ci_low,
                                      M.WIN_RATE_CI_HIGH: win.ci_high, "wins": win.wins, "ties": win.ties,
                                      "losses": win.losses, M.LABEL_ACCURACY: acc,
                                      "eval_seconds": outcome["eval_seconds"],
                                      **{k: v for k, v in extra.items()  # epsilon_spent, each part's, ...
                                         if isinstance(v, (int, float)) and not isinstance(v, bool)}})
        for k, a in enumerate(stage_acc, start=1):
            self.tracker.metrics(run_id, {M.STAGE_LABEL_ACCURACY: a}, step=k)
        self.tracker.artifact(run_id, final["model_path"], "adapter")
        scores = trial_dir / EVAL_SCORES if trial_dir is not None else None
        if scores is not None and scores.exists():
            self.tracker.artifact(run_id, scores, "eval")
        state["result"] = {"trial": name, "method": method.method, "epsilon": epsilon, "stages": cfg.stages,
                           "win": win.as_dict(), "label_accuracy": acc, "stage_label_accuracy": stage_acc,
                           "extra": extra}
        self.tracker.finish(run_id)
        return TrialResult.from_state(state["result"])

    def _log_stage(self, trial_run: str, trial: str, k: int, ck: dict, info: dict, num_pairs: int,
                   method: MethodSection) -> None:
        stage_run = self.tracker.run(f"{self.job_cfg.name}/{trial}/stage-{k}", f"{trial}/stage-{k}",
                                     parent=trial_run, tags={"props_ray.kind": "stage"})
        if self.tracker.is_finished(stage_run):
            return
        metrics = ck.get("metrics", {})
        mech = {key: metrics[key] for key in method.stage_params if key in metrics}
        self.tracker.params(stage_run, {"stage": k, "pairs": num_pairs, "loss": method.stage_loss(k), **mech})
        path = Path(ck["path"]) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        self.tracker.metric_history(stage_run, [r for r in rows if r.get("stage") == k], STAGE_METRIC_KEYS)
        self.tracker.metrics(stage_run, {k2: v for k2, v in info.items() if v is not None})
        self.tracker.finish(stage_run)

    # -- the summary --------------------------------------------------------------------------
    def log_summary(self, results: list[TrialResult]) -> None:
        """Per-trial table, the mean +- CI over seeds per (method, epsilon), and the privacy-utility
        plots, all read back from MLflow (so they show what was logged) and logged to the job run."""
        from props_ray.plots import make_plots
        from props_ray.report import summarize, trials_from_mlflow, write_summary

        out = self.job_dir / "summary"
        out.mkdir(exist_ok=True)
        table = summary_table(results)
        table.to_csv(out / "trials.csv", index=False)
        (out / "trials.md").write_text(format_table(table, markdown=True) + "\n")
        files = [out / "trials.csv", out / "trials.md"]
        try:
            trials = trials_from_mlflow(self.tracker.client, self.job_run)
            summary = summarize(trials)
            files += write_summary(summary, out) + make_plots(trials, summary, out)
        except Exception as err:  # noqa: BLE001 - the tracking store may be down: keep the local table
            log.warning("could not build the sweep summary from MLflow (%s); per-trial table only", err)
        for f in files:
            self.tracker.artifact(self.job_run, f)
