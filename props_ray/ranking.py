"""The figures that keep ranking methods once win rates saturate, as ``report`` reads and prints them.

Each trial logs its judged reward and its per-comparison scores (``eval/eval-scores.json``); here they
are set against the non-private trial of the same (seed, K) variant: the normalised gain and the
head-to-head win rate. Also the table cells of those figures and DP synthetic instructions' own table.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from props_ray.tables import format_epsilon, render_table

#: What keeps ranking methods once win rates saturate: the judged reward (and the reference's), the
#: normalised gain (R - R_ref) / (R_nonprivate - R_ref) and the head-to-head win rate against the
#: non-private policy of the same seed (from the trials' per-comparison scores).
REWARD_METRICS = ("reward_mean", "reward_ci_low", "reward_ci_high", "reference_reward_mean")
RANKING_COLUMNS = ("reward_mean", "normalised_gain", "win_rate_vs_nonprivate", "audit_epsilon_lower_bound")

#: DP synthetic instructions' own figures: each part's epsilon and the topic TV before and after the filter.
SYNTHETIC_METRICS = ("generator_epsilon", "histogram_epsilon", "synthetic_tv_before", "synthetic_tv_after")


def _eval_scores(client, run_id: str) -> dict | None:
    import json
    import tempfile

    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # one per trial otherwise
    try:
        with tempfile.TemporaryDirectory() as tmp:
            return json.loads(Path(client.download_artifacts(run_id, "eval/eval-scores.json", tmp)).read_text())
    except (MlflowException, OSError, ValueError):
        return None


def against_nonprivate(client, df: pd.DataFrame) -> None:
    """Fill ``normalised_gain`` and ``win_rate_vs_nonprivate`` from the non-private trial of the same
    (seed, K) variant: same held-out prompts, same judge."""
    from props_ray.win_rate import normalised_gain, win_rate

    for _, g in df.groupby([df["seed"].astype("Int64").fillna(-1), df["stages"].astype("Int64").fillna(-1)]):
        ceiling = g[g["method"] == "nonprivate"]
        if ceiling.empty:
            continue
        top = ceiling.iloc[0]
        top_scores = _eval_scores(client, top["run_id"])
        for i, r in g.iterrows():
            df.loc[i, "normalised_gain"] = normalised_gain(r["reward_mean"], r["reference_reward_mean"],
                                                           top["reward_mean"])
            if not top_scores:
                continue
            mine = top_scores if r["run_id"] == top["run_id"] else _eval_scores(client, r["run_id"])
            if mine and len(mine["policy"]) == len(top_scores["policy"]):
                groups = np.arange(len(mine["policy"])) // int(mine["samples_per_prompt"])
                df.loc[i, "win_rate_vs_nonprivate"] = win_rate(mine["policy"], top_scores["policy"],
                                                               groups=groups).win_rate


def ranking_cells(r: dict) -> list[str]:
    """reward ± CI (over seeds; the trial's prompt-clustered CI with one seed), normalised gain and the
    head-to-head win rate against the non-private policy, '-' where not measured."""
    def num(v, spec=".3f"):
        return "-" if v is None or pd.isna(v) else format(v, spec)

    ci = r["reward_mean_ci"] if r["n_seeds"] > 1 else r.get("reward_trial_ci")
    reward = "-" if pd.isna(r["reward_mean_mean"]) else f"{r['reward_mean_mean']:.3f} ± {num(ci)}"
    return [reward, num(r["normalised_gain_mean"], ".2f"), num(r["win_rate_vs_nonprivate_mean"])]


def synthetic_table(summary: pd.DataFrame, markdown: bool) -> str:
    """DP synthetic instructions: the epsilon of each part and the TV of the synthetic topic mixture to
    the real one before and after the filter (means over seeds)."""
    col = "synthetic_tv_before_mean"
    if col not in summary or summary[col].isna().all():
        return ""
    rows = []
    for r in summary[summary[col].notna()].to_dict("records"):
        f = lambda v, spec: "-" if v is None or pd.isna(v) else format(v, spec)  # noqa: E731
        rows.append([str(r["method_label"]), format_epsilon(float(r["epsilon"])), f(r["generator_epsilon_mean"], ".4g"),
                     f(r["histogram_epsilon_mean"], ".4g"), f(r["synthetic_tv_before_mean"], ".3f"),
                     f(r["synthetic_tv_after_mean"], ".3f")])
    return ("DP synthetic instructions (the unit is one private prompt): each part's epsilon and the total "
            "variation of the synthetic topic mixture to the real one\n\n" if markdown else
            "DP synthetic instructions: each part's epsilon, topic TV to the real mixture\n") + render_table(
        ["method", "ε", "generator ε", "histogram ε", "TV before filter", "TV after filter"], rows, markdown)
