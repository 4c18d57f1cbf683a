"""A job, start to finish: data step, reference, every (method, epsilon) trial, evaluation, tracking.

A trial trains through the K stage partitions:

- ``nonprivate``: DPO on the raw labels of all partitions (the ceiling);
- ``rr``: DPO on the randomized-response labels of all partitions;
- ``props``: stage 1 trains on partition 1's RR labels; at stage k the
  stage k-1 model relabels partition k (Ray Data batch inference), its label is
  combined with the RR label, and DPO continues from the stage k-1 model;
- ``dpsgd``: DPO with DP-SGD on the raw labels of all partitions.

The data step runs first, for every variant, before Ray starts: a job that
would be refused (bad data, a delta of 1/N or more, a ledger refusal) spends
nothing. RR labels come from the dataset's privacy ledger
(:mod:`props_ray.data.ledger`): one draw per dataset at the largest epsilon,
made in the driver before any trial starts; trials only read it.

Everything a trial produces is written under ``JOB_DIR/trials/TRIAL``; a re-run
of the same job skips what is complete and resumes the rest.
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pandas as pd

from props_ray import metrics as M
from props_ray.config import JobConfig, MethodConfig, dump_job
from props_ray.data.prepare import PreparedData, label_epsilon_max, prepare_data
from props_ray.data.tokenize_step import to_training_dataset
from props_ray.privacy.randomized_response import flip_probability
from props_ray.win_rate import WinRate, label_accuracy, win_rate

log = logging.getLogger(__name__)

STAGE_METRIC_KEYS = ("loss", "reward_accuracy", "margin", "epsilon")


@dataclass
class TrialResult:
    trial: str
    method: str
    epsilon: float | None
    stages: int
    win: WinRate
    label_accuracy: float | None
    stage_label_accuracy: list[float | None] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def row(self) -> dict:
        return {"trial": self.trial, "method": self.method,
                "epsilon": "inf" if self.epsilon is None else self.epsilon, "stages": self.stages,
                "label_accuracy": self.label_accuracy, "win_rate": self.win.win_rate,
                "win_rate_ci_low": self.win.ci_low, "win_rate_ci_high": self.win.ci_high,
                **{k: v for k, v in self.extra.items() if k in (M.EPSILON_SPENT, M.DELTA)}}


def trial_name(method: MethodConfig, epsilon: float | None) -> str:
    return method.display_name if epsilon is None else f"{method.display_name}-eps{epsilon:g}"


class Job:
    """A job; for a sweep, ``self.cfg`` is the (seed, K) variant being run, ``self.job_cfg`` the job."""

    def __init__(self, cfg: JobConfig, progress: Callable[[str], None] = print):
        self.job_cfg = cfg
        self.cfg = cfg
        self.suffix = ""
        self.say = progress
        self.job_dir = cfg.job_dir.resolve()
        self.timings: dict[str, float] = {}
        self.in_task = False  # True in a trial running as a Ray task, beside other trials
        self.prepared: list[PreparedData] = []  # the data step of every variant, done before Ray starts

    # -- the whole job ----------------------------------------------------------
    def run(self) -> list[TrialResult]:
        from props_ray.ray_runtime import ensure_ray
        from props_ray.tracking import Tracker

        cfg = self.cfg
        t = time.time()
        self.prepared = self.preflight(cfg)  # every data-dependent refusal comes before anything is spent
        self.timings["data_step"] = time.time() - t
        self.job_dir.mkdir(parents=True, exist_ok=True)
        t = time.time()
        # Ray starts while the tracking store opens (a new sqlite store migrates its schema, ~3 s here):
        # the Ray processes start on the other cores meanwhile.
        with ThreadPoolExecutor(1) as pool:
            tracker = pool.submit(Tracker, cfg.tracking.resolved_uri(), cfg.tracking.experiment,
                                  journal=self.job_dir / "tracking-journal.jsonl")
            ensure_ray(cfg.train.num_workers, cfg.train.cpus_per_worker)
            self.tracker = tracker.result()
        self.timings["ray_start"] = time.time() - t
        self.tracker.flush()
        self.job_run = self.tracker.run(cfg.name, cfg.name, tags={"props_ray.kind": "job",
                                                                  M.PRIVACY_TAG: cfg.privacy_status})
        self.tracker.params(self.job_run, {"stages": cfg.stages, "seed": cfg.seed, "data_source": cfg.data.source,
                                           "model": cfg.model.name, "secure_randomness": cfg.secure_randomness})
        config_path = self.job_dir / "job.yaml"
        config_path.write_text(dump_job(cfg))
        self.tracker.artifact(self.job_run, config_path)
        self.say(f"job {cfg.name}: tracking at {cfg.tracking.resolved_uri()}, output in {self.job_dir}")
        from props_ray.storage import check_shared_storage

        try:
            check_shared_storage(cfg.output_dir)  # multi-node: checkpoints and RR labels need shared storage
        except ValueError:
            self.tracker.finish(self.job_run, status="FAILED")
            raise

        results = []
        for variant, data in zip(cfg.variants(), self.prepared):
            self.cfg, self.data = variant, data
            self.suffix = ""
            if cfg.is_sweep:
                self.suffix = (f"-seed{variant.seed}" if len(cfg.sweep.seeds or [cfg.seed]) > 1 else "") + \
                              (f"-K{variant.stages}" if len(cfg.sweep.stages or [cfg.stages]) > 1 else "")
                self.say(f"sweep variant: seed {variant.seed}, K = {variant.stages}")
            results.extend(self._run_variant())
        self.cfg = cfg

        self._log_summary(results)
        self.tracker.metrics(self.job_run, {f"seconds_{k.replace(':', '_')}": v for k, v in self.timings.items()})
        self.tracker.finish(self.job_run)
        self.tracker.flush()
        return results

    def preflight(self, cfg: JobConfig) -> list[PreparedData]:
        """The data step of every variant: load, ledger checks, hold-out, partitions, N-dependent checks.
        Raises a :class:`~props_ray.errors.UserError` before any draw, training or Ray start. Writes only
        a new ledger's keys (stage assignment depends on them), never a draw."""
        out = []
        for variant in cfg.variants():
            data = prepare_data(variant)
            data.ledger.save()  # a later variant on the same data must see the same keys
            out.append(data)
        return out

    def _run_variant(self) -> list[TrialResult]:
        from props_ray.reference import resolve_reference

        cfg = self.cfg
        t = time.time()
        self.base_path = resolve_reference(cfg)
        self.timings[f"reference{self.suffix}"] = time.time() - t
        self.say(f"reference model: {self.base_path} ({time.time() - t:.1f}s)")

        t = time.time()
        self.judge = self._judge()
        self.reference_scores = self._reference_scores()
        self.say(f"data: {self.data.num_pairs} pairs from {self.data.source} in {cfg.stages} partitions "
                 f"{[len(p) for p in self.data.partitions]}, {len(self.data.eval_prompts)} held-out prompts"
                 + (f", {len(self.data.skipped)} rows skipped" if self.data.skipped else ""))
        self.timings[f"data_and_reference_eval{self.suffix}"] = time.time() - t

        # RR labels: the ledger's one draw, made here in the driver and persisted before any trial starts
        # (trials running at once all read the same draw; a trial task never draws).
        ledger = self.data.ledger
        draw = ledger.ensure_draw(self.data.dataset, label_epsilon_max(cfg),
                                  accept_new_draw=cfg.privacy.accept_new_draw, seed=cfg.seed, job=self.job_cfg.name)
        if draw is not None:
            self.say(f"privacy ledger: {ledger.describe()}")
            self.tracker.params(self.job_run, {f"ledger_id{self.suffix}": ledger.ledger_id})
            self.tracker.metrics(self.job_run, {f"ledger_draw{self.suffix}": draw.number,
                                                f"ledger_draw_epsilon{self.suffix}": draw.epsilon,
                                                f"{M.LABEL_EPSILON_CUMULATIVE}{self.suffix}": ledger.cumulative_epsilon},
                                 step=draw.number)

        trials = cfg.trials()
        limit = self._concurrency(len(trials))
        if limit <= 1:
            return [self.run_trial(method, eps) for method, eps in trials]
        return self._run_concurrently(trials, limit)

    def _load_data(self) -> None:
        """Data, judge and reference scores of the current variant (in the driver or a trial task)."""
        self.data = prepare_data(self.cfg)  # reads the ledger the driver wrote
        self.judge = self._judge()
        self.reference_scores = self._reference_scores()

    def _concurrency(self, n_trials: int) -> int:
        """How many trials run at once: ``sweep.max_concurrent_trials``, else as many as the cluster's
        CPUs hold, each trial needing its training workers plus one inference actor."""
        import ray

        if self.cfg.sweep.max_concurrent_trials:
            return min(n_trials, self.cfg.sweep.max_concurrent_trials)
        per_trial = self.cfg.train.num_workers * self.cfg.train.cpus_per_worker + 1
        return max(1, min(n_trials, int(ray.cluster_resources().get("CPU", 0) // per_trial)))

    def _run_concurrently(self, trials, limit: int) -> list[TrialResult]:
        """Each trial's training, relabels and evaluation run in a Ray task (which launches the
        trial's TorchTrainers and Ray Data jobs; Ray places them as resources free up); at most
        ``limit`` at a time. MLflow logging stays here in the driver."""
        import ray

        self.say(f"running {len(trials)} trials, up to {limit} at a time")
        execute = ray.remote(num_cpus=0, max_retries=0)(_execute_trial_task)
        results: dict[int, TrialResult] = {}
        # PROPS trials are the longest (a training run per stage, relabels between): start them first.
        todo = sorted(enumerate(trials), key=lambda it: it[1][0].method != "props")
        running: dict = {}
        while todo or running:
            while todo and len(running) < limit:
                i, (method, eps) = todo.pop(0)
                opened = self._open_trial(method, eps)
                if isinstance(opened, TrialResult):  # already complete (a resumed job)
                    results[i] = opened
                    continue
                ref = execute.remote(self.job_cfg.model_dump(mode="json"), self.cfg.model_dump(mode="json"),
                                     self.suffix, self.base_path, method.model_dump(mode="json"), eps)
                running[ref] = (i, method, eps, opened, time.time())
            if not running:
                continue
            done, _ = ray.wait(list(running), num_returns=1)
            i, method, eps, (run_id, name), t = running.pop(done[0])
            outcome, timings = ray.get(done[0])  # a failed trial raises here, with its worker's error
            for k, v in timings.items():
                self._add_time(k, v)
            results[i] = self._track_trial(run_id, name, method, eps, outcome)
            self.timings[f"trial:{name}"] = time.time() - t
        return [results[i] for i in range(len(trials))]

    # -- one (method, epsilon) --------------------------------------------------
    def run_trial(self, method: MethodConfig, epsilon: float | None) -> TrialResult:
        t = time.time()
        opened = self._open_trial(method, epsilon)
        if isinstance(opened, TrialResult):
            return opened
        run_id, name = opened
        outcome = self.execute_trial(method, epsilon)
        result = self._track_trial(run_id, name, method, epsilon, outcome)
        self.timings[f"trial:{name}"] = time.time() - t
        return result

    def _trial_paths(self, method: MethodConfig, epsilon: float | None) -> tuple[str, Path, Path]:
        name = trial_name(method, epsilon) + self.suffix
        trial_dir = self.job_dir / "trials" / name
        return name, trial_dir, trial_dir / "state.json"

    def _open_trial(self, method: MethodConfig, epsilon: float | None):
        """The trial's MLflow run and params (driver side); its stored result if it is complete."""
        cfg = self.cfg
        name, trial_dir, state_path = self._trial_paths(method, epsilon)
        trial_dir.mkdir(parents=True, exist_ok=True)
        state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}

        run_id = self.tracker.run(f"{self.job_cfg.name}/{name}", name, parent=self.job_run,
                                  tags={"props_ray.kind": "trial", "props_ray.method": method.method,
                                        M.PRIVACY_TAG: cfg.privacy_status})
        params = {"method": method.method, "method_name": method.display_name,
                  "epsilon": "inf" if epsilon is None else epsilon,
                  "stages": cfg.stages, "loss": self._stage_loss(method, 1), "beta": cfg.train.beta,
                  "num_workers": cfg.train.num_workers, "epochs": cfg.train.epochs, "batch_size": cfg.train.batch_size,
                  "lr": cfg.train.lr, "lora": cfg.model.lora.enabled, "seed": cfg.seed}
        if method.method == "props":
            params["rule"] = method.rule
            params["stage_loss"] = self._stage_loss(method, cfg.stages)
            if method.model_error_confidence is not None:
                params["model_error_confidence"] = method.model_error_confidence
        params["secure_randomness"] = cfg.secure_randomness
        if epsilon is not None and method.method != "dpsgd":
            ledger = self.data.ledger
            used = state.get("ledger_draw")
            if used is not None and used != ledger.current.number and "result" not in state:
                from props_ray.data.ledger import LedgerError

                raise LedgerError(f"trial {name} started on the ledger's draw {used}, and the ledger now serves draw "
                                  f"{ledger.current.number}: its checkpoints hold draw {used}'s labels. Give the job "
                                  f"a new name to train on draw {ledger.current.number}")
            if used is None:
                state["ledger_draw"] = ledger.current.number
                state_path.write_text(json.dumps(state, indent=1))
            draw = ledger.draws[state["ledger_draw"] - 1]
            params.update({"flip_probability": flip_probability(epsilon), "ledger_id": ledger.ledger_id,
                           "ledger_draw": draw.number, "ledger_draw_epsilon": draw.epsilon})
        self.tracker.params(run_id, params)
        if epsilon is not None and method.method != "dpsgd":
            self.tracker.metrics(run_id, {M.LABEL_EPSILON_CUMULATIVE: self.data.ledger.cumulative_epsilon})

        if "result" in state:
            self.say(f"[{name}] already complete; reusing its results")
            return self._result_from_state(state["result"])
        return run_id, name

    def execute_trial(self, method: MethodConfig, epsilon: float | None) -> dict:
        """Train the trial's stages (PROPS: with relabels in between) and evaluate the final model.

        No tracking here: this runs in the driver or in a Ray task. Progress is kept in the
        trial's ``state.json`` (checkpoints, relabels), so a re-run resumes where it stopped; the
        returned outcome (also stored there) is what the driver logs.
        """
        cfg = self.cfg
        name, trial_dir, state_path = self._trial_paths(method, epsilon)
        self._trial = name
        state = json.loads(state_path.read_text()) if state_path.exists() else {"stages": {}}
        if "outcome" in state:  # computed, but the driver stopped before logging it
            return state["outcome"]
        started = time.time()
        self.say(f"[{name}] training {cfg.stages} stage(s)")
        stage_pairs = self._stage_inputs(method, epsilon)  # stage -> pairs, or None where relabel decides
        used_pairs: dict[int, pd.DataFrame] = {}
        stage_info: dict[int, dict] = {}
        checkpoints: dict[str, dict] = state["stages"]

        if method.method == "props":
            prev = None
            for k in range(1, cfg.stages + 1):
                pairs = stage_pairs[k]
                if k > 1:
                    relabeled = state.setdefault("relabel", {})
                    labels_path = trial_dir / f"labels-stage-{k}.parquet"
                    if str(k) in relabeled and labels_path.exists():  # resumed: the same labels, not redone
                        pairs, info = pd.read_parquet(labels_path), relabeled[str(k)]
                    else:
                        pairs, info = self._relabel(k, pairs, prev, epsilon, method, labels_path)
                        relabeled[str(k)] = info
                        state_path.write_text(json.dumps(state, indent=1))
                    stage_info[k] = info
                used_pairs[k] = pairs
                if str(k) not in checkpoints:
                    ck = self._fit(method, name, [k], {k: pairs}, epsilon,
                                   init_adapter=prev["model_path"] if prev else None)[0]
                    checkpoints[str(k)] = ck
                    state_path.write_text(json.dumps(state, indent=1))
                prev = checkpoints[str(k)]
        else:
            used_pairs = stage_pairs
            todo = [k for k in range(1, cfg.stages + 1) if str(k) not in checkpoints]
            if todo:
                for ck in self._fit(method, name, todo, {k: stage_pairs[k] for k in todo}, epsilon, None):
                    checkpoints[str(ck["stage"])] = ck
                state_path.write_text(json.dumps(state, indent=1))

        # -- evaluation --------------------------------------------------------
        final = checkpoints[str(cfg.stages)]
        t = time.time()
        win = win_rate(self._policy_scores(final["model_path"]), self.reference_scores)
        eval_seconds = time.time() - t
        self._add_time(f"{name}:eval", eval_seconds)
        acc, stage_acc = None, []
        if cfg.want_label_accuracy and method.method in ("rr", "props", "nonprivate"):
            truth = self.data.truth()  # the evaluator knows the truth; only accuracies leave this step
            stage_acc = [label_accuracy(used_pairs[k], truth) for k in range(1, cfg.stages + 1)]
            acc = label_accuracy(pd.concat(used_pairs.values(), ignore_index=True), truth)
        extra = {k: v for k, v in final.get("metrics", {}).items() if k in ("epsilon", "delta", "noise_multiplier",
                                                                            "sample_rate", "steps")}
        if "epsilon" in extra:  # the engine's running epsilon at the last step: what the trial spent
            extra[M.EPSILON_SPENT] = extra.pop("epsilon")
        state["outcome"] = {"stage_info": {str(k): v for k, v in stage_info.items()},
                            "stage_pairs": {str(k): len(p) for k, p in used_pairs.items()},
                            "win": win.as_dict(), "label_accuracy": acc, "stage_label_accuracy": stage_acc,
                            "extra": extra, "eval_seconds": eval_seconds, "started": started,
                            "finished": time.time()}
        state_path.write_text(json.dumps(state, indent=1))
        return state["outcome"]

    def _track_trial(self, run_id: str, name: str, method: MethodConfig, epsilon: float | None,
                     outcome: dict) -> TrialResult:
        """Log a computed trial to MLflow (driver side) and mark it complete."""
        cfg = self.cfg
        _, _, state_path = self._trial_paths(method, epsilon)
        state = json.loads(state_path.read_text())
        checkpoints = state["stages"]
        for k in range(1, cfg.stages + 1):
            self._log_stage(run_id, name, k, checkpoints[str(k)], outcome["stage_info"].get(str(k), {}),
                            outcome["stage_pairs"][str(k)], method)
        final = checkpoints[str(cfg.stages)]
        win, acc, stage_acc, extra = (WinRate(**outcome["win"]), outcome["label_accuracy"],
                                      outcome["stage_label_accuracy"], outcome["extra"])
        if method.method == "dpsgd":
            m = final.get("metrics", {})
            self.tracker.params(run_id, {"noise_multiplier": m.get("noise_multiplier"),
                                         "sample_rate": m.get("sample_rate"), "steps": m.get("steps"),
                                         "max_grad_norm": cfg.privacy.dpsgd.max_grad_norm,
                                         "delta": m.get("delta"), "accountant": cfg.privacy.dpsgd.accountant})
            self.tracker.metrics(run_id, {M.EPSILON_SPENT: extra.get(M.EPSILON_SPENT)})
        self.tracker.metrics(run_id, {M.WIN_RATE: win.win_rate, M.WIN_RATE_CI_LOW: win.ci_low,
                                      M.WIN_RATE_CI_HIGH: win.ci_high, "wins": win.wins, "ties": win.ties,
                                      "losses": win.losses, M.LABEL_ACCURACY: acc,
                                      "eval_seconds": outcome["eval_seconds"]})
        for k, a in enumerate(stage_acc, start=1):
            self.tracker.metrics(run_id, {M.STAGE_LABEL_ACCURACY: a}, step=k)
        self.tracker.artifact(run_id, final["model_path"], "adapter")
        state["result"] = {"trial": name, "method": method.method, "epsilon": epsilon, "stages": cfg.stages,
                           "win": win.as_dict(), "label_accuracy": acc, "stage_label_accuracy": stage_acc,
                           "extra": extra}
        state_path.write_text(json.dumps(state, indent=1))
        self.tracker.finish(run_id)
        self.say(f"[{name}] win rate {win.win_rate:.3f} [{win.ci_low:.3f}, {win.ci_high:.3f}]"
                 + (f", label accuracy {acc:.3f}" if acc is not None else ""))
        return self._result_from_state(state["result"])

    # -- pieces -------------------------------------------------------------------
    def _add_time(self, key: str, seconds: float) -> None:
        """Wall time of a part of the job (logged as ``seconds_*`` metrics of the job run)."""
        self.timings[key] = self.timings.get(key, 0.0) + seconds

    def _stage_inputs(self, method: MethodConfig, epsilon: float | None) -> dict[int, pd.DataFrame]:
        cfg = self.cfg
        out = {}
        for k in range(1, cfg.stages + 1):
            raw = self.data.partition(k)
            if method.method in ("nonprivate", "dpsgd"):
                out[k] = raw[["id", "prompt", "chosen", "rejected"]]
            else:  # the ledger's draw, derived down to this epsilon (post-processing)
                out[k] = self.data.ledger.labels(raw, epsilon)
        return out

    def _stage_loss(self, method: MethodConfig, stage: int) -> str:
        if method.method == "props" and stage > 1:  # combined labels: hard (sigmoid) or confidences (soft)
            if method.loss in ("sigmoid", "soft"):
                return method.loss
            return "soft" if method.rule == "posterior" else "sigmoid"
        if method.loss == "soft":
            return "sigmoid"
        return method.loss or "sigmoid"

    def _fit(self, method: MethodConfig, name: str, stages: list[int], pairs: dict[int, pd.DataFrame],
             epsilon: float | None, init_adapter: str | None) -> list[dict]:
        from props_ray.train.trainer import fit_stages

        cfg = self.cfg
        tok = self.base_path if cfg.model.tokenizer is None else cfg.model.tokenizer
        datasets = {k: to_training_dataset(p, tok, cfg.data.max_prompt_length, cfg.data.max_response_length)
                    for k, p in pairs.items()}
        if self.in_task:  # trials running at once: tokenize before the trainer reserves its workers' CPUs,
            # or every trainer could hold CPUs while its datasets wait for one to tokenize
            datasets = {k: ds.materialize() for k, ds in datasets.items()}
        loss = self._stage_loss(method, stages[0])
        flip = flip_probability(epsilon) if (epsilon is not None and loss == "robust") else None
        t = time.time()
        cks = fit_stages(cfg, run_name=f"{name}-stages-{'-'.join(map(str, stages))}", trial=name,
                         method=method.method, stages=stages, datasets=datasets, base_path=self.base_path,
                         init_adapter=init_adapter, loss=loss, flip_rate=flip,
                         num_pairs=sum(len(p) for p in pairs.values()),
                         extra={"epsilon": epsilon, "total_pairs": self.data.num_pairs})
        self._add_time(f"{name}:train", time.time() - t)
        self.say(f"[{name}] trained stage(s) {stages} in {time.time() - t:.1f}s")
        return [{"stage": c.stage, "path": c.path, "model_path": c.model_path,
                 "metrics": {k: v for k, v in c.metrics.items() if isinstance(v, (int, float, str, bool))}}
                for c in cks]

    def _relabel(self, k: int, privatized: pd.DataFrame, prev: dict, epsilon: float, method: MethodConfig,
                 labels_path: Path) -> tuple[pd.DataFrame, dict]:
        from props_ray.relabel import apply_combination, score_partition

        cfg = self.cfg
        t = time.time()
        tok = self.base_path if cfg.model.tokenizer is None else cfg.model.tokenizer
        ds = to_training_dataset(privatized, tok, cfg.data.max_prompt_length, cfg.data.max_response_length,
                                 keep_id=True)
        margins = score_partition(ds, base_path=self.base_path, adapter_path=prev["model_path"],
                                  model_cfg=cfg.model, beta=cfg.train.beta, use_gpu=cfg.train.use_gpu)
        options = {"model_error_confidence": method.model_error_confidence} if method.rule == "mle" else {}
        combined, comb = apply_combination(privatized, margins, epsilon, method.rule, **options)
        combined.to_parquet(labels_path, index=False)  # derived from privatized labels only
        self._add_time(f"{self._trial}:relabel", time.time() - t)
        info = {"disagreement": comb.disagreement, "model_error": comb.model_error,
                "model_error_bound": comb.model_error_bound,
                "calibration_scale": comb.calibration_scale, "flipped_fraction": float(comb.flipped.mean()),
                "relabel_seconds": time.time() - t}
        self.say(f"[relabel stage {k}] model disagrees with RR on {comb.disagreement:.1%} of pairs; "
                 + (f"gamma_M={comb.model_error:.3f}; " if comb.model_error is not None else "")
                 + (f"upper bound {comb.model_error_bound:.3f}; " if comb.model_error_bound is not None else "")
                 + f"{comb.flipped.mean():.1%} of labels flipped ({info['relabel_seconds']:.1f}s)")
        return combined, info

    def _log_stage(self, trial_run: str, trial: str, k: int, ck: dict, info: dict, num_pairs: int,
                   method: MethodConfig) -> None:
        stage_run = self.tracker.run(f"{self.job_cfg.name}/{trial}/stage-{k}", f"{trial}/stage-{k}", parent=trial_run,
                                     tags={"props_ray.kind": "stage"})
        if self.tracker.is_finished(stage_run):
            return
        mech = {key: ck["metrics"][key] for key in ("noise_multiplier", "sample_rate", "steps")
                if key in ck.get("metrics", {}) and method.method == "dpsgd"}
        self.tracker.params(stage_run, {"stage": k, "pairs": num_pairs, "loss": self._stage_loss(method, k), **mech})
        path = Path(ck["path"]) / "metrics.jsonl"
        rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
        self.tracker.metric_history(stage_run, [r for r in rows if r.get("stage") == k], STAGE_METRIC_KEYS)
        self.tracker.metrics(stage_run, {k2: v for k2, v in info.items() if v is not None})
        self.tracker.finish(stage_run)

    def _judge(self):
        from props_ray.judge import OracleJudge, RewardModelJudge
        from props_ray.reference import embedded_task

        if self.cfg.eval.judge == "oracle":
            return OracleJudge(embedded_task(self.cfg))
        return RewardModelJudge(self.cfg.eval.judge, use_gpu=self.cfg.train.use_gpu)

    def _generate(self, adapter_path: str | None) -> pd.DataFrame:
        from props_ray.generation import generate

        cfg = self.cfg
        return generate(self.data.eval_prompts, base_path=self.base_path, adapter_path=adapter_path,
                        model_cfg=cfg.model, samples_per_prompt=cfg.eval.samples_per_prompt,
                        max_new_tokens=cfg.eval.max_new_tokens or cfg.task.response_length,
                        temperature=cfg.eval.temperature, seed=cfg.seed + (0 if adapter_path is None else 1),
                        max_prompt_length=cfg.data.max_prompt_length, fixed_length=cfg.is_embedded,
                        use_gpu=cfg.train.use_gpu, num_actors=1)

    def _reference_scores(self):
        path = self.job_dir / "eval" / f"reference-generations-seed{self.cfg.seed}.parquet"
        if path.exists():
            gens = pd.read_parquet(path)
        else:
            gens = self._generate(None)
            path.parent.mkdir(parents=True, exist_ok=True)
            gens.to_parquet(path, index=False)
        return self.judge.score(gens)

    def _policy_scores(self, adapter_path: str):
        return self.judge.score(self._generate(adapter_path))

    def _result_from_state(self, r: dict) -> TrialResult:
        return TrialResult(r["trial"], r["method"], r["epsilon"], r["stages"], WinRate(**r["win"]),
                           r["label_accuracy"], r["stage_label_accuracy"], r.get("extra", {}))

    def _log_summary(self, results: list[TrialResult]) -> None:
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


def summary_table(results: list[TrialResult]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in results])


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """method, epsilon, stages, label accuracy, win rate +- CI as aligned text or Markdown."""
    rows = []
    for r in table.to_dict("records"):
        acc = "-" if r["label_accuracy"] is None or pd.isna(r["label_accuracy"]) else f"{r['label_accuracy']:.3f}"
        half = (r["win_rate_ci_high"] - r["win_rate_ci_low"]) / 2
        eps = r["epsilon"]
        spent = r.get(M.EPSILON_SPENT)
        if spent is not None and not pd.isna(spent):
            eps = f"{eps} (spent {spent:.4g})"
        rows.append([r["trial"], r["method"], str(eps), str(r["stages"]), acc,
                     f"{r['win_rate']:.3f} ± {half:.3f}"])
    head = ["trial", "method", "epsilon", "stages", "label accuracy", "win rate ± 95% CI"]
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(h), *(len(row[i]) for row in rows)) if rows else len(h) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head), fmt.format(*("-" * w for w in widths)), *(fmt.format(*r) for r in rows)])


def _execute_trial_task(job_cfg: dict, variant_cfg: dict, suffix: str, base_path: str, method: dict,
                        epsilon: float | None) -> tuple[dict, dict]:
    """A Ray task: one trial's training, relabels and evaluation (see :meth:`Job.execute_trial`).
    It reads the persisted RR labels and reference generations; it never draws labels or logs to MLflow."""
    from props_ray.ray_runtime import quiet_ray_libraries

    quiet_ray_libraries()
    job = Job(JobConfig.model_validate(job_cfg), progress=lambda m: print(m, flush=True))
    job.cfg = JobConfig.model_validate(variant_cfg)
    job.suffix, job.base_path, job.in_task = suffix, base_path, True
    job._load_data()
    outcome = job.execute_trial(MethodConfig.model_validate(method), epsilon)
    return outcome, job.timings
