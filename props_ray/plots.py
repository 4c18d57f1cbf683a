"""Privacy-utility plots of a sweep (see :mod:`props_ray.report` for the tables they are drawn from).

- ``win_rate_vs_epsilon.png``: win rate against ε per method, 95% CI bands; the non-private
  baseline (ε = ∞) as a dashed horizontal line;
- ``label_accuracy_vs_epsilon.png``: accuracy of the labels each method trained on, with the
  randomized-response reference 1 − γ_ε = 1 − 1/(1 + e^ε);
- ``props_stage_label_accuracy.png``: PROPS label accuracy per stage, one line per (rule, ε);
- ``audit_epsilon_vs_claim.png`` (audited jobs): the canary audit's lower bound on ε against the
  claimed ε, with the line bound = claim above which a mechanism is broken.

Rendering uses the non-interactive Agg backend, so it works on headless machines.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from props_ray.tables import format_epsilon, method_sort_key  # noqa: E402

FILES = ("win_rate_vs_epsilon.png", "label_accuracy_vs_epsilon.png", "props_stage_label_accuracy.png")
REWARD_FILE = "reward_vs_epsilon.png"
AUDIT_FILE = "audit_epsilon_vs_claim.png"
DPI = 120


def _colors(labels) -> dict[str, tuple]:
    cmap = plt.get_cmap("tab10")
    return {lab: cmap(i % 10) for i, lab in enumerate(sorted(set(labels), key=method_sort_key))}


def _series(summary: pd.DataFrame):
    """(label, rows) per method (and per K when the summary mixes several numbers of stages)."""
    mixed_k = "stages" in summary and summary["stages"].dropna().nunique() > 1
    keys = ["method_label", "stages"] if mixed_k else ["method_label"]
    out = []
    for key, g in summary.groupby(keys, sort=False, dropna=False):
        key = key if isinstance(key, tuple) else (key,)
        label = key[0] if not mixed_k or pd.isna(key[1]) else f"{key[0]} (K={int(key[1])})"
        out.append((key[0], label, g.sort_values("epsilon")))
    return sorted(out, key=lambda s: (method_sort_key(s[0]), s[1]))


def _finite_range(summary: pd.DataFrame) -> tuple[float, float]:
    eps = summary["epsilon"].astype(float)
    eps = eps[np.isfinite(eps) & (eps > 0)]
    if eps.empty:
        return 0.1, 10.0
    lo, hi = float(eps.min()), float(eps.max())
    return lo / 1.5, hi * 1.5


def _save(fig, path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _band(g: pd.DataFrame, mean: str, ci: str, fallback_ci: str | None = None) -> np.ndarray:
    half = g[ci].astype(float).to_numpy(copy=True)
    if fallback_ci is not None and fallback_ci in g:
        single = g["n_seeds"].to_numpy() <= 1
        half[single] = g[fallback_ci].astype(float).to_numpy()[single]
    return np.nan_to_num(half, nan=0.0)


def _draw_vs_epsilon(ax, summary: pd.DataFrame, mean: str, ci: str, fallback_ci: str | None = None,
                     proportion: bool = True) -> int:
    """Lines over finite ε with CI bands (clipped to [0, 1] for a ``proportion``), dashed horizontal lines
    for ε = ∞; returns the series drawn."""
    colors = _colors(summary["method_label"])
    drawn = 0
    for method, label, g in _series(summary):
        g = g[g[mean].notna()]
        if g.empty:
            continue
        drawn += 1
        color = colors[method]
        eps = g["epsilon"].astype(float).to_numpy()
        y = g[mean].astype(float).to_numpy()
        half = _band(g, mean, ci, fallback_ci)
        fin = np.isfinite(eps)
        lo, hi = y - half, y + half
        if proportion:
            lo, hi = np.clip(lo, 0, 1), np.clip(hi, 0, 1)
        if fin.any():
            ax.plot(eps[fin], y[fin], marker="o", color=color, label=label)
            ax.fill_between(eps[fin], lo[fin], hi[fin], color=color, alpha=0.15, linewidth=0)
        for yi, l_, h_ in zip(y[~fin], lo[~fin], hi[~fin]):
            ax.axhline(yi, linestyle="--", color=color, label=f"{label} (ε = ∞)" if fin.any() else label)
            if h_ > l_:
                ax.axhspan(l_, h_, color=color, alpha=0.08, linewidth=0)
    return drawn


def _epsilon_axis(ax, summary: pd.DataFrame) -> None:
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    ax.set_xscale("log")
    ax.set_xlim(*_finite_range(summary))
    eps = sorted({float(e) for e in summary["epsilon"] if math.isfinite(float(e)) and float(e) > 0})
    if eps:  # ticks at the swept values, written plainly (0.5, 2, 8)
        ax.xaxis.set_major_locator(FixedLocator(eps))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("privacy budget ε (log scale)")
    ax.grid(True, which="both", alpha=0.3)


def plot_win_rate_vs_epsilon(summary: pd.DataFrame, path) -> Path:
    """Win rate against ε, one line per method with its 95% CI band (over seeds; the trials' own CI
    where a point has one seed); the non-private baseline as a dashed horizontal line."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_vs_epsilon(ax, summary, "win_rate_mean", "win_rate_ci", fallback_ci="win_rate_trial_ci")
    _epsilon_axis(ax, summary)
    ax.set_ylim(0, 1)
    ax.set_ylabel("win rate against the reference")
    seeds = sorted(set(int(n) for n in summary["n_seeds"])) if len(summary) else []
    ax.set_title("Win rate vs. privacy budget" + (f" (mean ± 95% CI, {'/'.join(map(str, seeds))} seed(s))"
                                                    if seeds else ""))
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_reward_vs_epsilon(summary: pd.DataFrame, path) -> Path:
    """The judge's mean reward of each method's generations against epsilon (95% CI over seeds; the
    trials' prompt-clustered CI with one seed); the non-private ceiling as a dashed line. It keeps
    ranking methods where win rates against the reference saturate."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    _draw_vs_epsilon(ax, summary, "reward_mean_mean", "reward_mean_ci", fallback_ci="reward_trial_ci",
                     proportion=False)
    _epsilon_axis(ax, summary)
    ax.set_ylabel("mean reward of the generations (judge)")
    ax.set_title("Reward vs. privacy budget (mean ± 95% CI)")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def rr_label_accuracy(eps) -> np.ndarray:
    """1 − γ_ε: the probability a randomized-response label is right, γ_ε = 1/(1 + e^ε)."""
    eps = np.asarray(eps, dtype=float)
    return 1.0 - 1.0 / (1.0 + np.exp(eps))


def plot_label_accuracy_vs_epsilon(summary: pd.DataFrame, path) -> Path:
    """Accuracy of the training labels against ε per method (methods without it, e.g. dpsgd, are
    skipped), with the randomized-response reference curve 1 − γ_ε."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    with_acc = summary[summary["label_accuracy_mean"].notna()]
    _draw_vs_epsilon(ax, with_acc, "label_accuracy_mean", "label_accuracy_ci")
    lo, hi = _finite_range(summary)
    grid = np.geomspace(lo, hi, 200)
    ax.plot(grid, rr_label_accuracy(grid), linestyle=":", color="black", label="RR labels (1 − γ_ε)")
    _epsilon_axis(ax, summary)
    ys = np.concatenate([with_acc["label_accuracy_mean"].astype(float).to_numpy(), rr_label_accuracy(grid)])
    ax.set_ylim(min(0.45, float(np.nanmin(ys)) - 0.05), 1.02)
    ax.set_ylabel("label accuracy (vs. the true labels)")
    ax.set_title("Training-label accuracy vs. privacy budget")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _props_stage_table(trials: pd.DataFrame) -> pd.DataFrame:
    t = trials[(trials["method"] == "props")]
    t = t[t["stage_label_accuracy"].map(lambda v: isinstance(v, (list, tuple, np.ndarray)) and len(v) > 0)]
    if t.empty:
        return pd.DataFrame(columns=["rule", "epsilon", "stages", "stage", "accuracy"])
    rows = []
    for r in t.to_dict("records"):
        for k, a in enumerate(r["stage_label_accuracy"], start=1):
            rows.append({"rule": r.get("rule") or "?", "epsilon": float(r["epsilon"]),
                         "stages": len(r["stage_label_accuracy"]), "stage": k, "accuracy": float(a)})
    return (pd.DataFrame(rows).groupby(["rule", "epsilon", "stages", "stage"], as_index=False)["accuracy"].mean()
            .sort_values(["rule", "epsilon", "stages", "stage"]))


def plot_props_stage_accuracy(trials: pd.DataFrame, path) -> Path:
    """PROPS label accuracy per stage (mean over seeds), one line per (rule, ε); the RR accuracy
    1 − γ_ε of each ε as a dotted line of the same color (stage 1 trains on RR labels alone)."""
    table = _props_stage_table(trials)
    if table.empty:
        raise ValueError("no PROPS trials with per-stage label accuracy to plot")
    fig, ax = plt.subplots(figsize=(7, 4.5))
    groups = list(table.groupby(["rule", "epsilon", "stages"], sort=True))
    mixed_k = table["stages"].nunique() > 1
    cmap = plt.get_cmap("tab10")
    markers = {rule: m for rule, m in zip(sorted(table["rule"].unique()), "osD^v")}
    eps_values = sorted(table["epsilon"].unique())
    eps_color = {e: cmap(i % 10) for i, e in enumerate(eps_values)}
    for (rule, eps, k), g in groups:
        label = f"props-{rule}, ε = {format_epsilon(eps)}" + (f", K={k}" if mixed_k else "")
        linestyle = "-" if rule == "mle" else "--"
        ax.plot(g["stage"], g["accuracy"], marker=markers.get(rule, "o"), linestyle=linestyle,
                color=eps_color[eps], label=label)
    finite = [e for e in eps_values if math.isfinite(e)]
    for eps in finite:
        ax.axhline(float(rr_label_accuracy(eps)), linestyle=":", color=eps_color[eps], linewidth=1)
    if finite:  # one neutral legend entry for the per-ε reference lines
        ax.plot([], [], linestyle=":", color="gray", linewidth=1, label="RR labels (1 − γ_ε), per ε")
    max_stage = int(table["stage"].max())
    ax.set_xticks(range(1, max_stage + 1))
    ax.set_xlim(0.8, max_stage + 0.2)
    ax.set_ylim(min(0.45, float(table["accuracy"].min()) - 0.05), 1.02)
    ax.set_xlabel("stage k")
    ax.set_ylabel("label accuracy of stage k's training labels")
    ax.set_title("PROPS: label accuracy per stage (mean over seeds)")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def plot_audit_vs_claim(summary: pd.DataFrame, path) -> Path:
    """The audit's lower bound on ε against the claimed ε, one line per method (the non-private bound as
    a dashed line), and the claim itself as the diagonal: a point above it is a broken mechanism."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    mean, ci = "audit_epsilon_lower_bound_mean", "audit_epsilon_lower_bound_ci"
    _draw_vs_epsilon(ax, summary, mean, ci, proportion=False)
    _epsilon_axis(ax, summary)
    lo, hi = ax.get_xlim()
    grid = np.geomspace(lo, hi, 100)
    ax.plot(grid, grid, linestyle=":", color="black", label="claimed ε (above it: a broken mechanism)")
    top = max(float(np.nanmax(summary[mean].astype(float))), hi)
    ax.set_ylim(0, top * 1.05)
    ax.set_ylabel("audit: lower bound on ε (95%)")
    ax.set_title("Empirical privacy audit: proved lower bound vs. claimed ε")
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8)
    return _save(fig, path)


def make_plots(trials: pd.DataFrame, summary: pd.DataFrame, out_dir) -> list[Path]:
    """Write the plots into ``out_dir``; the PROPS stage plot only when there are PROPS trials, the reward
    plot only when trials logged rewards, the audit plot only when they were audited."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [plot_win_rate_vs_epsilon(summary, out / FILES[0]),
             plot_label_accuracy_vs_epsilon(summary, out / FILES[1])]
    if not _props_stage_table(trials).empty:
        paths.append(plot_props_stage_accuracy(trials, out / FILES[2]))
    if "reward_mean_mean" in summary and summary["reward_mean_mean"].notna().any():
        paths.append(plot_reward_vs_epsilon(summary, out / REWARD_FILE))
    if "audit_epsilon_lower_bound_mean" in summary and summary["audit_epsilon_lower_bound_mean"].notna().any():
        paths.append(plot_audit_vs_claim(summary, out / AUDIT_FILE))
    return paths
