"""A finished trial's result and the per-trial table a job prints and logs."""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd

from props_ray import metrics as M
from props_ray.tables import render_table
from props_ray.win_rate import WinRate


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

    @classmethod
    def from_state(cls, r: dict) -> "TrialResult":
        return cls(r["trial"], r["method"], r["epsilon"], r["stages"], WinRate(**r["win"]), r["label_accuracy"],
                   r["stage_label_accuracy"], r.get("extra", {}))

    def row(self) -> dict:
        return {"trial": self.trial, "method": self.method,
                "epsilon": "inf" if self.epsilon is None else self.epsilon, "stages": self.stages,
                "label_accuracy": self.label_accuracy, "win_rate": self.win.win_rate,
                "win_rate_ci_low": self.win.ci_low, "win_rate_ci_high": self.win.ci_high,
                **{k: v for k, v in self.extra.items()
                   if k in (M.EPSILON_SPENT, M.DELTA, "reward_mean", "reward_ci_low", "reward_ci_high",
                            "reference_reward_mean")}}


def summary_table(results: list[TrialResult]) -> pd.DataFrame:
    return pd.DataFrame([r.row() for r in results])


def format_table(table: pd.DataFrame, markdown: bool = False) -> str:
    """trial, method, epsilon (with DP-SGD's spent epsilon), stages, label accuracy, the generations' mean
    oracle/judge reward +- CI, win rate +- CI."""
    rows = []
    with_reward = "reward_mean" in table.columns
    for r in table.to_dict("records"):
        acc = "-" if r["label_accuracy"] is None or pd.isna(r["label_accuracy"]) else f"{r['label_accuracy']:.3f}"
        half = (r["win_rate_ci_high"] - r["win_rate_ci_low"]) / 2
        eps = r["epsilon"]
        spent = r.get(M.EPSILON_SPENT)
        if spent is not None and not pd.isna(spent):
            eps = f"{eps} (spent {spent:.4g})"
        reward = []
        if with_reward:
            mean = r.get("reward_mean")
            reward = ["-" if mean is None or pd.isna(mean) else
                      f"{mean:.3f} ± {(r['reward_ci_high'] - r['reward_ci_low']) / 2:.3f}"]
        rows.append([r["trial"], r["method"], str(eps), str(r["stages"]), acc, *reward,
                     f"{r['win_rate']:.3f} ± {half:.3f}"])
    head = ["trial", "method", "epsilon", "stages", "label accuracy", *(["reward ± 95% CI"] if with_reward else []),
            "win rate ± 95% CI"]
    return render_table(head, rows, markdown)
