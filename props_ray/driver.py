"""A job, start to finish: the data step, the reference, every (method, epsilon) trial, the summary.

The driver runs the job's variants (seeds x K of a sweep; one variant otherwise). For each:

- the data step (done for every variant before Ray starts, so a refused job spends nothing):
  load, the dataset's privacy ledger, held-out prompts, per-record partitions, N-dependent checks;
- the reference model and its generations on the held-out prompts;
- the ledger's one RR draw at the largest epsilon, written before any trial starts;
- each trial, through its method's recipe (:mod:`props_ray.methods`): in this process, or at once
  as Ray tasks that launch their own trainers (:func:`_execute_trial_task`). Only this process
  draws labels and logs to MLflow (:mod:`props_ray.run_tree`).

A trial's progress is kept under ``JOB_DIR/trials/TRIAL``; a re-run of the same job skips what is
complete and resumes the rest.
"""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import pandas as pd

from props_ray import progress
from props_ray.config import JobConfig, parse_method
from props_ray.data.ledger import LedgerError
from props_ray.data.prepare import PreparedData, label_epsilon_max, prepare_data
from props_ray.errors import UserError
from props_ray.methods import method as registered
from props_ray.methods.trial import Trial, generate, trial_name
from props_ray.results import TrialResult
from props_ray.sections import MethodSection
from props_ray.trial_identity import trial_identity


@dataclass
class Variant:
    """What every trial of one (seed, K) variant shares: its config, data, reference and judge."""

    cfg: JobConfig
    data: PreparedData
    suffix: str = ""
    base_path: str = ""
    judge: object = None
    reference_scores: object = None

    def identity(self, method: MethodSection, epsilon: float | None) -> dict:
        return trial_identity(self.cfg, method, epsilon, self.data.ledger.fingerprint)

    def check_identity(self, method: MethodSection, epsilon: float | None, job_dir) -> None:
        """Refuse a job whose trial directory holds another configuration's trial (another seed, K,
        dataset or setting): resuming it would report that trial's results as this one's."""
        name = trial_name(method, epsilon) + self.suffix
        path = job_dir / "trials" / name / "state.json"
        stored = json.loads(path.read_text()).get("identity") if path.exists() else None
        want = self.identity(method, epsilon)
        if stored is None or stored == want:
            return
        differ = [k for k in want if stored.get(k) != want[k]]
        shown = ", ".join(f"{k} {stored.get(k)} (now {want[k]})" if k in ("seed", "stages", "epsilon") else k
                          for k in differ)
        raise UserError(f"trial {name} in {path.parent} was run with another configuration ({shown}): its "
                        f"results are not this job's. Give the job another name or output_dir, or remove "
                        f"{path.parent} to run it again")

    def complete(self, job_dir) -> bool:
        """Whether every trial of the variant has its result already (a re-run has nothing to train)."""
        for method, epsilon in self.cfg.trials():
            path = job_dir / "trials" / (trial_name(method, epsilon) + self.suffix) / "state.json"
            if not path.exists() or "result" not in json.loads(path.read_text()):
                return False
        return True

    def trial(self, method: MethodSection, epsilon: float | None, job_dir, say, timings, in_task=False) -> Trial:
        name = trial_name(method, epsilon) + self.suffix
        trial_dir = job_dir / "trials" / name
        trial_dir.mkdir(parents=True, exist_ok=True)
        return Trial(self.cfg, method, epsilon, name, trial_dir, self.data, self.base_path, self.judge,
                     self.reference_scores, say=say, in_task=in_task, timings=timings)


def judge_for(cfg: JobConfig):
    from props_ray.judge import OracleJudge, RewardModelJudge
    from props_ray.reference import embedded_task

    if cfg.eval.judge == "oracle":
        return OracleJudge(embedded_task(cfg))
    return RewardModelJudge(cfg.eval.judge, use_gpu=cfg.train.use_gpu)


def reference_scores(cfg: JobConfig, data: PreparedData, base_path: str, judge, job_dir):
    """The judge's scores of the reference's generations (generated once per seed, then read back)."""
    path = job_dir / "eval" / f"reference-generations-seed{cfg.seed}.parquet"
    if path.exists():
        gens = pd.read_parquet(path)
    else:
        gens = generate(cfg, data, base_path, None)
        path.parent.mkdir(parents=True, exist_ok=True)
        gens.to_parquet(path, index=False)
    return judge.score(gens)


class Job:
    def __init__(self, cfg: JobConfig, say: Callable[[str], None] = progress.say):
        self.cfg = cfg
        self.say = say
        self.job_dir = cfg.job_dir.resolve()
        self.timings: dict[str, float] = {}

    # -- the whole job ------------------------------------------------------------------------
    def run(self) -> list[TrialResult]:
        import ray

        from props_ray.ray_runtime import check_gpus, cluster_address, ensure_ray
        from props_ray.run_tree import RunTree
        from props_ray.storage import check_shared_storage
        from props_ray.tracking import Tracker

        cfg = self.cfg
        t = time.time()
        variants = self.preflight()  # every data-dependent refusal comes before anything is spent
        self.timings["data_step"] = time.time() - t
        self.job_dir.mkdir(parents=True, exist_ok=True)
        t = time.time()
        # Ray starts while the tracking store opens (a new sqlite store migrates its schema, ~3 s here):
        # the Ray processes start on the other cores meanwhile.
        with ThreadPoolExecutor(1) as pool:
            tracker = pool.submit(Tracker, cfg.tracking.resolved_uri(), cfg.tracking.experiment,
                                  journal=self.job_dir / "tracking-journal.jsonl")
            ensure_ray(cfg.train.num_workers, cfg.train.cpus_per_worker)
            tracker = tracker.result()
        self.timings["ray_start"] = time.time() - t
        # Too few GPUs on a local instance is refused here, before the job's run opens or anything trains.
        gpus = check_gpus(cfg.train.num_workers, ray.cluster_resources(),
                          local=cluster_address() is None) if cfg.train.use_gpu else None
        tracker.flush()
        self.runs = RunTree(tracker, cfg, self.job_dir)
        self.runs.open_job()
        with progress.Console():  # workers' progress lines, drawn here (Ray's own output stays off)
            self.say(f"job {cfg.name}: tracking at {cfg.tracking.resolved_uri()}, output in {self.job_dir}")
            if gpus:
                self.say(gpus)
            try:
                check_shared_storage(cfg.output_dir)  # multi-node: checkpoints and the ledger need shared storage
            except ValueError:
                self.runs.finish_job(self.timings, status="FAILED")
                raise

            results = []
            for v in variants:
                if cfg.is_sweep:
                    self.say(f"sweep variant: seed {v.cfg.seed}, K = {v.cfg.stages}")
                results.extend(self._run_variant(v))
        self.runs.log_summary(results)
        self.runs.finish_job(self.timings)
        return results

    def preflight(self) -> list[Variant]:
        """The data step of every variant: load, ledger checks, hold-out, partitions, N-dependent checks.
        Raises a :class:`~props_ray.errors.UserError` before any draw, training or Ray start. Writes only
        a new ledger's keys (stage assignment depends on them), never a draw."""
        cfg = self.cfg
        seeds, ks = cfg.sweep.seeds or [cfg.seed], cfg.sweep.stages or [cfg.stages]
        out = []
        for variant in cfg.variants():
            data = prepare_data(variant)
            data.ledger.save()  # a later variant on the same data must see the same keys
            # a seed or K other than the job's own is in the trials' names, so one seed at a time
            # (sweep.seeds: [1]) never lands in the directories of the job's seed
            suffix = ((f"-seed{variant.seed}" if len(seeds) > 1 or variant.seed != cfg.seed else "")
                      + (f"-K{variant.stages}" if len(ks) > 1 or variant.stages != cfg.stages else ""))
            v = Variant(variant, data, suffix)
            for method, eps in variant.trials():
                v.check_identity(method, eps, self.job_dir)
            out.append(v)
        return out

    def _run_variant(self, v: Variant) -> list[TrialResult]:
        import ray

        from props_ray.train.worker_group import shared_group_fits, shared_worker_group

        cfg = v.cfg
        limit = self._concurrency(cfg, len(cfg.trials()))
        # One trial at a time: on CPUs their trainings share one Ray Train worker group, which starts
        # now, beside the reference model and the data step, if anything is left to train.
        shared = (limit <= 1 and shared_group_fits(cfg, ray.cluster_resources().get("CPU", 0))
                  and not v.complete(self.job_dir))
        with shared_worker_group(cfg, f"worker-group{v.suffix}", enabled=shared) as group:
            group.start()
            return self._run_variant_trials(v, limit)

    def _run_variant_trials(self, v: Variant, limit: int) -> list[TrialResult]:
        from props_ray.reference import resolve_reference

        cfg = v.cfg
        t = time.time()
        v.base_path = resolve_reference(cfg)
        self.timings[f"reference{v.suffix}"] = time.time() - t
        self.say(f"reference model: {v.base_path} ({time.time() - t:.1f}s)")

        t = time.time()
        v.judge = judge_for(cfg)
        v.reference_scores = reference_scores(cfg, v.data, v.base_path, v.judge, self.job_dir)
        self.say(f"data: {v.data.num_pairs} pairs from {v.data.source} in {cfg.stages} partitions "
                 f"{[len(p) for p in v.data.partitions]}, {len(v.data.eval_prompts)} held-out prompts"
                 + v.data.skipped_summary())
        self.timings[f"data_and_reference_eval{v.suffix}"] = time.time() - t

        # RR labels: the ledger's one draw, made here in the driver and persisted before any trial starts
        # (trials running at once all read the same draw; a trial task never draws).
        ledger = v.data.ledger
        draw = ledger.ensure_draw(v.data.dataset, label_epsilon_max(cfg),
                                  accept_new_draw=cfg.privacy.accept_new_draw, seed=cfg.seed, job=self.cfg.name)
        if draw is not None:
            self.say(f"privacy ledger: {ledger.describe()}")
            self.runs.log_draw(ledger, v.suffix)

        trials = cfg.trials()
        if limit <= 1:
            return [self.run_trial(v, method, eps) for method, eps in trials]
        return self._run_concurrently(v, trials, limit)

    def _concurrency(self, cfg: JobConfig, n_trials: int) -> int:
        import ray

        return trial_concurrency(cfg, n_trials, ray.cluster_resources())

    # -- one (method, epsilon) ----------------------------------------------------------------
    def _open_trial(self, v: Variant, method: MethodSection, epsilon: float | None):
        """The trial (its state read back) and its MLflow run (driver side); its stored result if complete."""
        trial = v.trial(method, epsilon, self.job_dir, self.say, self.timings)
        state = trial.state
        if "identity" not in state:  # checked against the job's in the data step (Variant.check_identity)
            state["identity"] = v.identity(method, epsilon)
            trial.save()
        if method.labels == "randomized_response":  # a trial trains on one draw of the ledger, start to end
            ledger = v.data.ledger
            used = state.get("ledger_draw")
            if used is not None and used != ledger.current.number and "result" not in state:
                raise LedgerError(f"trial {trial.name} started on the ledger's draw {used}, and the ledger now "
                                  f"serves draw {ledger.current.number}: its checkpoints hold draw {used}'s labels. "
                                  f"Give the job a new name to train on draw {ledger.current.number}")
            if used is None:
                state["ledger_draw"] = ledger.current.number
                trial.save()
        run_id = self.runs.open_trial(v.cfg, method, epsilon, trial.name, state, v.data.ledger)
        if "result" in state:
            self.say(f"[{trial.name}] already complete; reusing its results")
            return trial, run_id, TrialResult.from_state(state["result"])
        return trial, run_id, None

    def _log_trial(self, v: Variant, trial: Trial, run_id: str, outcome: dict) -> TrialResult:
        state = json.loads(trial.state_path.read_text())  # what the recipe wrote, here or in a task
        result = self.runs.log_trial(run_id, v.cfg, trial.method, trial.epsilon, trial.name, state, outcome,
                                     trial.dir)
        trial.state = state
        trial.save()
        win, acc, reward = result.win, result.label_accuracy, result.extra.get("reward_mean")
        self.say(f"[{trial.name}] "
                 + (f"reward {reward:.3f} (reference {result.extra['reference_reward_mean']:.3f}), "
                    if reward is not None and "reference_reward_mean" in result.extra else "")
                 + f"win rate {win.win_rate:.3f} [{win.ci_low:.3f}, {win.ci_high:.3f}]"
                 + (f", label accuracy {acc:.3f}" if acc is not None else ""))
        return result

    def run_trial(self, v: Variant, method: MethodSection, epsilon: float | None) -> TrialResult:
        t = time.time()
        trial, run_id, done = self._open_trial(v, method, epsilon)
        if done is not None:
            return done
        result = self._log_trial(v, trial, run_id, execute(trial))
        self.timings[f"trial:{trial.name}"] = time.time() - t
        return result

    def _run_concurrently(self, v: Variant, trials, limit: int) -> list[TrialResult]:
        """Each trial's training, relabels and evaluation run in a Ray task (which launches the
        trial's TorchTrainers and Ray Data jobs; Ray places them as resources free up); at most
        ``limit`` at a time. MLflow logging stays here in the driver."""
        import ray

        self.say(f"running {len(trials)} trials, up to {limit} at a time")
        task = ray.remote(num_cpus=0, max_retries=0)(_execute_trial_task)
        results: dict[int, TrialResult] = {}
        todo = sorted(enumerate(trials), key=lambda it: not it[1][0].long_running)  # the longest start first
        running: dict = {}
        while todo or running:
            while todo and len(running) < limit:
                i, (method, eps) = todo.pop(0)
                trial, run_id, done = self._open_trial(v, method, eps)
                if done is not None:  # already complete (a resumed job)
                    results[i] = done
                    continue
                ref = task.remote(v.cfg.model_dump(mode="json"), v.suffix, v.base_path,
                                  method.model_dump(mode="json"), eps, str(self.job_dir))
                running[ref] = (i, trial, run_id, time.time())
            if not running:
                continue
            ready, _ = ray.wait(list(running), num_returns=1)
            i, trial, run_id, t = running.pop(ready[0])
            outcome, timings = ray.get(ready[0])  # a failed trial raises here, with its worker's error
            for k, s in timings.items():
                self.timings[k] = self.timings.get(k, 0.0) + s
            results[i] = self._log_trial(v, trial, run_id, outcome)
            self.timings[f"trial:{trial.name}"] = time.time() - t
        return [results[i] for i in range(len(trials))]


def trial_concurrency(cfg: JobConfig, n_trials: int, resources: dict) -> int:
    """How many trials run at once on a cluster of ``resources``: ``sweep.max_concurrent_trials``, else
    as many as its CPUs hold, each trial needing its training workers plus one inference actor, and
    with ``train.use_gpu`` as many as its GPUs hold, one a worker (a trial beyond that would hold CPUs
    while its training waited for a card)."""
    if cfg.sweep.max_concurrent_trials:
        return min(n_trials, cfg.sweep.max_concurrent_trials)
    limit = int(resources.get("CPU", 0) // (cfg.train.num_workers * cfg.train.cpus_per_worker + 1))
    if cfg.train.use_gpu:
        limit = min(limit, int(resources.get("GPU", 0) // cfg.train.num_workers))
    return max(1, min(n_trials, limit))


def execute(trial: Trial) -> dict:
    """Run the trial's recipe, unless its outcome was computed before (the driver stopped before logging it)."""
    if "outcome" in trial.state:
        return trial.state["outcome"]
    progress.status(f"[{trial.name}] starting ({trial.cfg.stages} stage partitions)")
    return registered(trial.method.method).recipe(trial)


def _execute_trial_task(variant_cfg: dict, suffix: str, base_path: str, method: dict, epsilon: float | None,
                        job_dir: str) -> tuple[dict, dict]:
    """A Ray task: one trial's training, relabels and evaluation. It reads the ledger's draw and the
    reference generations the driver wrote; it never draws labels or logs to MLflow."""
    from pathlib import Path

    from props_ray.ray_runtime import quiet_ray_libraries

    quiet_ray_libraries()
    cfg = JobConfig.model_validate(variant_cfg)
    data = prepare_data(cfg)  # reads the ledger the driver wrote
    judge = judge_for(cfg)
    v = Variant(cfg, data, suffix, base_path, judge, reference_scores(cfg, data, base_path, judge, Path(job_dir)))
    timings: dict[str, float] = {}
    trial = v.trial(parse_method(method), epsilon, Path(job_dir), progress.say, timings, in_task=True)
    return execute(trial), timings
