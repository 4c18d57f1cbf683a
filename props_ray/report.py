"""Privacy-utility reports from the MLflow run tree of a job (no Ray needed).

A job writes one job run (tag ``props_ray.kind = job``) whose children are trial
runs (tag ``props_ray.kind = trial``), one per (method, epsilon, seed[, K]); see
:mod:`props_ray.run_tree` and :mod:`props_ray.driver`. This module reads them
back and aggregates over seeds::

    trials = trials_from_mlflow(MlflowClient(uri), "my-sweep-experiment")  # one row per trial run
    summary = summarize(trials)                                           # per (method, epsilon)
    print(format_summary(summary, markdown=False))
    write_summary(summary, "report/")                                     # summary.csv, summary.md

Plots are in :mod:`props_ray.plots`; :func:`report_command` is the CLI entry.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import numpy as np
import pandas as pd

from props_ray import metrics as M
from props_ray.ranking import (RANKING_COLUMNS, REWARD_METRICS, SYNTHETIC_METRICS, against_nonprivate,
                               ranking_cells, synthetic_table)
from props_ray.tables import format_epsilon, method_label, method_sort_key, render_table
from props_ray.tracking import KEY_TAG, PARENT_TAG

KIND_TAG = "props_ray.kind"

TRIAL_COLUMNS = ["run_id", "trial", "method_label", "method", "rule", "epsilon", "seed", "stages",
                 "win_rate", "win_rate_ci_low", "win_rate_ci_high", "label_accuracy",
                 "stage_label_accuracy", M.EPSILON_SPENT, "privacy", "privacy_unit", *SYNTHETIC_METRICS,
                 *REWARD_METRICS, "normalised_gain", "win_rate_vs_nonprivate", "audit_epsilon_lower_bound"]

SUMMARY_COLUMNS = ["method_label", "epsilon", "stages", "n_seeds", "win_rate_mean", "win_rate_ci",
                   "win_rate_trial_ci", "label_accuracy_mean", "label_accuracy_ci", f"{M.EPSILON_SPENT}_mean",
                   "privacy", "privacy_unit", *(f"{k}_mean" for k in SYNTHETIC_METRICS),
                   *(x for k in RANKING_COLUMNS for x in (f"{k}_mean", f"{k}_ci")), "reward_trial_ci"]

# -- reading the run tree -------------------------------------------------------------------------------------
def _search_all(client, experiment_ids: list[str], filter_string: str, order_by: list[str] | None = None,
                max_results: int | None = None) -> list:
    runs, token = [], None
    while True:
        page = client.search_runs(experiment_ids, filter_string=filter_string, order_by=order_by,
                                  max_results=max_results or 1000, page_token=token)
        runs.extend(page)
        token = getattr(page, "token", None)
        if not token or (max_results is not None and len(runs) >= max_results):
            return runs[:max_results] if max_results else runs


def _get_run(client, run_id: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_run(run_id)
    except MlflowException:
        return None


def _get_experiment(client, name_or_id: str):
    from mlflow.exceptions import MlflowException

    try:
        exp = client.get_experiment_by_name(name_or_id)
    except MlflowException:
        exp = None
    if exp is None:
        try:
            exp = client.get_experiment(name_or_id)
        except MlflowException:
            exp = None
    return exp


def resolve_job_run(client, run_or_experiment: str):
    """The job run named by ``run_or_experiment``.

    Tried in order: a job run id; an experiment name or id (its most recently started job run);
    a job name (the ``props_ray.key`` tag of a job run, most recent first).
    """
    target = str(run_or_experiment).strip()
    run = _get_run(client, target)
    if run is not None:
        kind = run.data.tags.get(KIND_TAG)
        if kind != "job":
            raise ValueError(f"run {target!r} is a {kind or 'non-props_ray'} run, not a props_ray job run "
                             f"(tag {KIND_TAG} = 'job')")
        return run
    job_filter = f"tags.`{KIND_TAG}` = 'job'"
    exp = _get_experiment(client, target)
    if exp is not None:
        found = _search_all(client, [exp.experiment_id], job_filter, order_by=["attributes.start_time DESC"],
                            max_results=1)
        if not found:
            raise ValueError(f"experiment {exp.name!r} (id {exp.experiment_id}) named by {target!r} has no "
                             f"props_ray job run (tag {KIND_TAG} = 'job')")
        return found[0]
    # A job name: look in every experiment.
    if "'" not in target:
        exps = [e.experiment_id for e in client.search_experiments()]
        if exps:
            found = _search_all(client, exps, f"{job_filter} and tags.`{KEY_TAG}` = '{target}'",
                                order_by=["attributes.start_time DESC"], max_results=1)
            if found:
                return found[0]
    raise ValueError(f"{target!r} is neither a run id, an experiment name or id, nor a job name in the "
                     f"MLflow store at {getattr(client, 'tracking_uri', '?')}")


def _float(v) -> float:
    if v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _history(client, run_id: str, key: str) -> list[float]:
    """The metric's values ordered by step (the latest value where a step was logged twice)."""
    by_step: dict[int, tuple[int, float]] = {}
    for m in client.get_metric_history(run_id, key):
        if m.step not in by_step or m.timestamp >= by_step[m.step][0]:
            by_step[m.step] = (m.timestamp, m.value)
    return [by_step[s][1] for s in sorted(by_step)]


def trials_from_mlflow(client, run_or_experiment: str) -> pd.DataFrame:
    """One row per trial run of a job run (or of the most recent job run of an experiment).

    Columns: run_id, trial (run name), method_label (the method's ``name``; by default ``props-<rule>``
    or the method), method, rule,
    epsilon (float, ``inf`` for the non-private baseline), seed (int; the job's seed when the trial
    has none), stages, win_rate, win_rate_ci_low, win_rate_ci_high, label_accuracy (NaN when not
    logged, e.g. dpsgd), stage_label_accuracy (list ordered by step), epsilon_spent (dpsgd's spent
    epsilon, else NaN), privacy (the run's ``props_ray.privacy`` tag: private, simulation or not
    private). Raises ValueError naming ``run_or_experiment`` when nothing matches.
    """
    job = resolve_job_run(client, run_or_experiment)
    job_id = job.info.run_id
    runs = _search_all(client, [job.info.experiment_id],
                       f"tags.`{KIND_TAG}` = 'trial' and tags.`{PARENT_TAG}` = '{job_id}'")
    if not runs:
        raise ValueError(f"job run {job_id} ({job.info.run_name!r}, from {run_or_experiment!r}) has no trial runs")
    job_seed = job.data.params.get("seed")
    job_stages = job.data.params.get("stages")
    rows = []
    for r in runs:
        p, m = r.data.params, r.data.metrics
        method = p.get("method") or r.data.tags.get("props_ray.method") or "unknown"
        rule = p.get("rule")
        eps = p.get("epsilon")
        epsilon = math.inf if (eps is None and method == "nonprivate") else _float(eps)
        seed = p.get("seed", job_seed)
        stages = p.get("stages", job_stages)
        rows.append({
            "run_id": r.info.run_id,
            "trial": r.info.run_name,
            "method_label": p.get("method_name") or method_label(method, rule),
            "method": method,
            "rule": rule,
            "epsilon": epsilon,
            "seed": int(seed) if seed is not None else pd.NA,
            "stages": int(stages) if stages is not None else pd.NA,
            "win_rate": _float(m.get(M.WIN_RATE)),
            "win_rate_ci_low": _float(m.get(M.WIN_RATE_CI_LOW)),
            "win_rate_ci_high": _float(m.get(M.WIN_RATE_CI_HIGH)),
            "label_accuracy": _float(m.get(M.LABEL_ACCURACY)),
            "stage_label_accuracy": _history(client, r.info.run_id, M.STAGE_LABEL_ACCURACY),
            M.EPSILON_SPENT: _float(m.get(M.EPSILON_SPENT)),
            "privacy": r.data.tags.get(M.PRIVACY_TAG, "unknown"),
            "privacy_unit": p.get("privacy_unit", "unknown"),
            **{k: _float(m.get(k)) for k in (*SYNTHETIC_METRICS, *REWARD_METRICS, "audit_epsilon_lower_bound")},
        })
    df = pd.DataFrame([{**r, "normalised_gain": math.nan, "win_rate_vs_nonprivate": math.nan} for r in rows],
                      columns=TRIAL_COLUMNS)
    against_nonprivate(client, df)
    df["seed"] = df["seed"].astype("Int64")
    df["stages"] = df["stages"].astype("Int64")
    df["_m"] = df["method_label"].map(method_sort_key)
    df = df.sort_values(["_m", "epsilon", "stages", "seed", "trial"]).drop(columns="_m")
    df.attrs["job_run_id"] = job_id
    df.attrs["job_name"] = job.info.run_name
    return df.reset_index(drop=True)


# -- aggregation ----------------------------------------------------------------------------------------------
def t_ci_half_width(values, confidence: float = 0.95) -> float:
    """Half-width of the t-interval for the mean of ``values`` (NaNs ignored): 0 for one value, NaN for none."""
    from scipy import stats

    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    n = len(x)
    if n == 0:
        return math.nan
    if n == 1:
        return 0.0
    return float(stats.t.ppf(0.5 + confidence / 2, n - 1) * x.std(ddof=1) / math.sqrt(n))


def _mean(values) -> float:
    x = np.asarray(values, dtype=float)
    x = x[~np.isnan(x)]
    return float(x.mean()) if len(x) else math.nan


def summarize(trials: pd.DataFrame) -> pd.DataFrame:
    """Aggregate trials over seeds, per (method_label, epsilon) — and per K when trials differ in stages.

    Columns: method_label, epsilon, stages, n_seeds, win_rate_mean, win_rate_ci (95% t-interval
    half-width over seeds; 0 with one seed), win_rate_trial_ci (mean of the trials' own 95% CI
    half-widths, the evaluation noise within a trial: the uncertainty to quote with one seed),
    label_accuracy_mean, label_accuracy_ci (NaN where no trial logged label accuracy),
    epsilon_spent_mean (dpsgd), privacy (the trials' privacy tags), privacy_unit; the means (and
    t-intervals over seeds, ``_ci``) of the reward, normalised gain, head-to-head win rate against
    non-private and audit bound, with ``reward_trial_ci`` (the trials' own prompt-clustered CI); DP
    synthetic instructions' figures. Sorted by method (the registry's order) then epsilon.
    """
    if trials.empty:
        return pd.DataFrame(columns=SUMMARY_COLUMNS)
    t = trials.copy()
    if "stages" not in t:
        t["stages"] = pd.NA
    t["_stages"] = t["stages"].astype("Int64").fillna(-1)
    rows = []
    for (label, eps, k), g in t.groupby(["method_label", "epsilon", "_stages"], sort=False, dropna=False):
        half = (g["win_rate_ci_high"].astype(float) - g["win_rate_ci_low"].astype(float)) / 2
        rows.append({
            "method_label": label,
            "epsilon": float(eps),
            "stages": pd.NA if k == -1 else int(k),
            "n_seeds": int(len(g)),
            "win_rate_mean": _mean(g["win_rate"]),
            "win_rate_ci": t_ci_half_width(g["win_rate"]),
            "win_rate_trial_ci": _mean(half),
            "label_accuracy_mean": _mean(g["label_accuracy"]) if "label_accuracy" in g else math.nan,
            "label_accuracy_ci": t_ci_half_width(g["label_accuracy"]) if "label_accuracy" in g else math.nan,
            f"{M.EPSILON_SPENT}_mean": _mean(g[M.EPSILON_SPENT]) if M.EPSILON_SPENT in g else math.nan,
            "privacy": ", ".join(sorted(set(g["privacy"].dropna()))) if "privacy" in g else "unknown",
            "privacy_unit": ", ".join(sorted(set(g["privacy_unit"].dropna()))) if "privacy_unit" in g else "unknown",
            **{f"{k}_mean": _mean(g[k]) if k in g else math.nan for k in SYNTHETIC_METRICS},
            **{x: v for k in RANKING_COLUMNS for x, v in ((f"{k}_mean", _mean(g[k]) if k in g else math.nan),
                                                           (f"{k}_ci", t_ci_half_width(g[k]) if k in g else math.nan))},
            "reward_trial_ci": _mean((g["reward_ci_high"] - g["reward_ci_low"]) / 2) if "reward_ci_high" in g
            else math.nan,
        })
    s = pd.DataFrame(rows, columns=SUMMARY_COLUMNS)
    s["stages"] = s["stages"].astype("Int64")
    s["_m"] = s["method_label"].map(method_sort_key)
    return s.sort_values(["_m", "epsilon", "stages"]).drop(columns="_m").reset_index(drop=True)


# -- text -----------------------------------------------------------------------------------------------------
def format_summary(summary: pd.DataFrame, markdown: bool = False) -> str:
    """method, ε (with DP-SGD's spent ε), [K,] seeds, win rate mean ± 95% CI, label accuracy mean ± 95% CI,
    and the privacy of the runs (``private``; ``simulation`` or ``not private`` for seeded randomness).

    The win-rate CI is over seeds; for a single seed it is the trial's own CI (marked †, with a note).
    Label accuracy with one seed is shown without a CI; ``-`` where it was not measured (dpsgd).
    """
    show_k = "stages" in summary and summary["stages"].dropna().nunique() > 1
    ranks = "reward_mean_mean" in summary and summary["reward_mean_mean"].notna().any()
    audited = "audit_epsilon_lower_bound_mean" in summary and summary["audit_epsilon_lower_bound_mean"].notna().any()
    head = ["method", "ε", *(["audit ε ≥"] if audited else []), *(["K"] if show_k else []), "seeds",
            "win rate ± 95% CI",
            *(["reward ± 95% CI", "gain", "vs non-private"] if ranks else []), "label accuracy ± 95% CI",
            "unit", "privacy"]
    rows, single = [], False
    for r in summary.to_dict("records"):
        if r["n_seeds"] > 1:
            win = f"{r['win_rate_mean']:.3f} ± {r['win_rate_ci']:.3f}"
        else:
            single = True
            win = f"{r['win_rate_mean']:.3f} ± {r['win_rate_trial_ci']:.3f}†"
        acc, acc_ci = r["label_accuracy_mean"], r["label_accuracy_ci"]
        if acc is None or pd.isna(acc):
            acc_s = "-"
        elif acc_ci is None or pd.isna(acc_ci) or r["n_seeds"] <= 1:
            acc_s = f"{acc:.3f}"
        else:
            acc_s = f"{acc:.3f} ± {acc_ci:.3f}"
        k = [] if not show_k else ["-" if pd.isna(r["stages"]) else str(int(r["stages"]))]
        eps = format_epsilon(float(r["epsilon"]))
        spent = r.get(f"{M.EPSILON_SPENT}_mean")
        if spent is not None and not pd.isna(spent):
            eps += f" (spent {spent:.4g})"
        privacy = r.get("privacy")
        privacy = "unknown" if privacy is None or (isinstance(privacy, float) and pd.isna(privacy)) else str(privacy)
        unit = r.get("privacy_unit")
        unit = "unknown" if unit is None or (isinstance(unit, float) and pd.isna(unit)) else str(unit)
        rank = ranking_cells(r) if ranks else []
        audit = [] if not audited else ["-" if pd.isna(r["audit_epsilon_lower_bound_mean"]) else
                                        f"{r['audit_epsilon_lower_bound_mean']:.3g}"]
        rows.append([str(r["method_label"]), eps, *audit, *k, str(int(r["n_seeds"])), win, *rank, acc_s, unit,
                     privacy])
    notes = ["† one seed: the trial's own 95% CI over evaluation comparisons, not over seeds"] if single else []
    seen = {row[-1] for row in rows}
    if seen & {"simulation", "not private"}:
        notes.append("privacy: seeded randomness can be replayed from the seed, so such runs are not private "
                     "(simulation: the embedded task)")
    if audited:
        notes.append("audit ε ≥: the lower bound on ε that the canary audit proves at 95% (Clopper-Pearson on "
                     "its guesses of the canaries' secret labels); above the claimed ε means a broken mechanism")
    notes.append("unit: what neighbouring datasets differ in (a label, a pair, a prompt, ...); a method with "
                 "a larger unit protects more at the same epsilon")
    table = render_table(head, rows, markdown)
    if notes:
        table += ("\n\n" if markdown else "\n") + "\n".join(notes)
    synthetic = synthetic_table(summary, markdown)
    return table + (("\n\n" + synthetic) if synthetic else "")


def write_summary(summary: pd.DataFrame, out_dir) -> list[Path]:
    """``summary.csv`` (every column, ε = inf for the baseline) and ``summary.md`` (the Markdown table)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    csv, md = out / "summary.csv", out / "summary.md"
    summary.to_csv(csv, index=False)
    md.write_text(format_summary(summary, markdown=True) + "\n")
    return [csv, md]


# -- command line ---------------------------------------------------------------------------------------------
def resolve_tracking_uri(tracking_uri: str | None) -> str:
    """As :meth:`props_ray.config.TrackingConfig.resolved_uri`: explicit, $MLFLOW_TRACKING_URI, sqlite:///mlflow.db."""
    return tracking_uri or os.environ.get("MLFLOW_TRACKING_URI") or "sqlite:///mlflow.db"


def report_command(target: str, tracking_uri: str | None, markdown: bool, plots_dir: str | None) -> int:
    """Print the summary of ``target`` (a job run id, an experiment name/id, or a job name).

    With ``plots_dir``, also write the plots and summary.csv/summary.md there. Returns the exit
    status: 0, or 2 (with a message on stderr) when the store or the target is not found.
    """
    uri = resolve_tracking_uri(tracking_uri)
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):])
        if not db.exists():  # opening it would create an empty store
            print(f"error: no MLflow store at {uri} ({db.resolve()} does not exist); pass --tracking-uri "
                  f"or set MLFLOW_TRACKING_URI", file=sys.stderr)
            return 2
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    try:
        trials = trials_from_mlflow(client, target)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    summary = summarize(trials)
    print(f"job {trials.attrs.get('job_name')} (run {trials.attrs.get('job_run_id')}): "
          f"{len(trials)} trial(s) in {uri}\n")
    print(format_summary(summary, markdown=markdown))
    if plots_dir:
        from props_ray.plots import make_plots

        written = write_summary(summary, plots_dir) + make_plots(trials, summary, plots_dir)
        print()
        for p in written:
            print(f"wrote {p}")
    return 0
