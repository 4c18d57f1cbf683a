"""The sweep report: a real MLflow store (sqlite) with a job -> trial -> stage run tree, read back,
aggregated over seeds, formatted and plotted."""

from __future__ import annotations

import math
import re

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from props_ray import plots
from props_ray import metrics as M
from props_ray.report import (format_summary, report_command, summarize, trials_from_mlflow, write_summary)

EXPERIMENT = "props-sweep-test"
EPSILONS = (0.5, 2.0)
SEEDS = (1, 2)
STAGES = 3
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _rr(eps):
    return 1 - 1 / (1 + math.exp(eps))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A sqlite MLflow store written with MlflowClient the way props_ray.tracking writes it.

    Experiment EXPERIMENT holds an older job run (one trial) and the sweep job run: nonprivate x 2
    seeds and rr, props (mle), dpsgd x 2 epsilons x 2 seeds, each trial with 3 stage runs. Returns the
    URI, the client, the run ids and the expected trial rows keyed by run id.
    """
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    base = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{base}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment(EXPERIMENT, artifact_location=str(base / "artifacts"))
    other = client.create_experiment("no-jobs-here", artifact_location=str(base / "artifacts2"))
    client.create_run(other, run_name="unrelated", tags={"props_ray.kind": "stage"})
    rng = np.random.default_rng(7)

    def job(name, start):
        run = client.create_run(exp, run_name=name, start_time=start,
                                tags={"props_ray.kind": "job", "props_ray.key": name})
        client.log_batch(run.info.run_id, params=[Param("stages", str(STAGES)), Param("seed", "0")])
        return run.info.run_id

    def trial(job_id, job_name, method, eps, seed, rule=None):
        label = f"props-{rule}" if method == "props" else method
        name = label + ("" if eps is None else f"-eps{eps:g}") + f"-seed{seed}"
        run_id = client.create_run(exp, run_name=name, tags={
            "props_ray.kind": "trial", "props_ray.key": f"{job_name}/{name}", "mlflow.parentRunId": job_id,
            "props_ray.method": method, M.PRIVACY_TAG: "simulation"}).info.run_id
        params = {"method": method, "epsilon": "inf" if eps is None else str(eps), "stages": str(STAGES),
                  "seed": str(seed), "loss": "sigmoid", "beta": "0.1",
                  "privacy_unit": {"nonprivate": "none", "dpsgd": "pair"}.get(method, "label")}
        if rule:
            params["rule"] = rule
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()])
        win = float(rng.uniform(0.55, 0.99))
        half = float(rng.uniform(0.01, 0.05))
        metrics = {"win_rate": win, "win_rate_ci_low": win - half, "win_rate_ci_high": min(1.0, win + half),
                   "wins": 150.0, "ties": 10.0, "losses": 40.0}
        stage_acc: list[float] = []
        acc = math.nan
        final_eps = math.nan
        if method == "dpsgd":
            final_eps = float(eps * rng.uniform(0.9, 1.0))
            metrics[M.EPSILON_SPENT] = final_eps
        else:
            if method == "nonprivate":
                stage_acc = [1.0] * STAGES
            elif method == "rr":
                stage_acc = [float(_rr(eps) + rng.normal(0, 0.01)) for _ in range(STAGES)]
            else:  # props improves on RR after stage 1
                stage_acc = [float(_rr(eps) + 0.03 * k + rng.normal(0, 0.01)) for k in range(STAGES)]
            acc = float(np.mean(stage_acc))
            metrics["label_accuracy"] = acc
        ts = 1_700_000_000_000
        client.log_batch(run_id, metrics=[Metric(k, v, ts, 0) for k, v in metrics.items()])
        # Steps logged out of order (and step 2 re-logged later with its final value): read back by step.
        for k in sorted(range(1, len(stage_acc) + 1), key=lambda s: -s):
            client.log_metric(run_id, "stage_label_accuracy", stage_acc[k - 1] - 0.2 if k == 2 else stage_acc[k - 1],
                              timestamp=ts, step=k)
        if len(stage_acc) >= 2:
            client.log_metric(run_id, "stage_label_accuracy", stage_acc[1], timestamp=ts + 5, step=2)
        for k in range(1, STAGES + 1):  # stage runs: must not be mistaken for trials
            st = client.create_run(exp, run_name=f"{name}/stage-{k}", tags={
                "props_ray.kind": "stage", "mlflow.parentRunId": run_id}).info.run_id
            client.log_batch(st, params=[Param("stage", str(k)), Param("method", method)],
                             metrics=[Metric("loss", 0.6, ts, 1), Metric("win_rate", 0.0, ts, 0)])
        return run_id, {"trial": name, "method_label": label, "method": method, "rule": rule,
                        "epsilon": math.inf if eps is None else eps, "seed": seed, "stages": STAGES,
                        "win_rate": metrics["win_rate"], "win_rate_ci_low": metrics["win_rate_ci_low"],
                        "win_rate_ci_high": metrics["win_rate_ci_high"], "label_accuracy": acc,
                        "stage_label_accuracy": stage_acc, M.EPSILON_SPENT: final_eps,
                        "privacy": "simulation", "privacy_unit": params["privacy_unit"]}

    old_job = job("old-sweep", 1_600_000_000_000)
    trial(old_job, "old-sweep", "rr", 8.0, 0)
    job_id = job("sweep", 1_700_000_000_000)
    expected = {}
    for seed in SEEDS:
        rid, row = trial(job_id, "sweep", "nonprivate", None, seed)
        expected[rid] = row
        for method, rule in (("rr", None), ("props", "mle"), ("dpsgd", None)):
            for eps in EPSILONS:
                rid, row = trial(job_id, "sweep", method, eps, seed, rule)
                expected[rid] = row
    return {"uri": uri, "client": client, "experiment_id": exp, "other_experiment_id": other,
            "job_id": job_id, "old_job_id": old_job, "expected": expected}


@pytest.fixture(scope="module")
def trials(store):
    return trials_from_mlflow(store["client"], store["job_id"])


@pytest.fixture(scope="module")
def summary(trials):
    return summarize(trials)


# -- reading ---------------------------------------------------------------------------------------------------
def _same(a, b):
    if isinstance(b, float) and math.isnan(b):
        return isinstance(a, float) and math.isnan(a)
    if isinstance(b, float):
        return a == pytest.approx(b, abs=1e-12)
    return a == b


def test_trials_from_mlflow_returns_exactly_the_logged_trials(store, trials):
    expected = store["expected"]
    assert len(trials) == 2 + 3 * 2 * 2 == len(expected)
    assert set(trials["run_id"]) == set(expected)
    for row in trials.to_dict("records"):
        exp = expected[row["run_id"]]
        for key, value in exp.items():
            got = row[key]
            if key == "stage_label_accuracy":
                assert list(got) == pytest.approx(value, abs=1e-12), row["trial"]
            elif key == "rule" and value is None:
                assert got is None or pd.isna(got)
            else:
                assert _same(got, value), (row["trial"], key, got, value)
    assert trials["epsilon"].dtype == float
    assert np.isinf(trials.loc[trials["method"] == "nonprivate", "epsilon"]).all()
    assert trials.loc[trials["method"] == "dpsgd", "label_accuracy"].isna().all()
    assert sorted(set(trials["method_label"])) == ["dpsgd", "nonprivate", "props-mle", "rr"]
    assert trials.attrs["job_run_id"] == store["job_id"]


def test_experiment_name_or_id_or_job_name_resolve_to_the_most_recent_job(store, trials):
    client = store["client"]
    for target in (EXPERIMENT, store["experiment_id"], "sweep"):
        again = trials_from_mlflow(client, target)
        assert again.attrs["job_run_id"] == store["job_id"], target
        assert list(again["run_id"]) == list(trials["run_id"])
    old = trials_from_mlflow(client, store["old_job_id"])
    assert list(old["trial"]) == ["rr-eps8-seed0"] and old["epsilon"].tolist() == [8.0]


def test_unknown_targets_are_clear_errors(store):
    client = store["client"]
    with pytest.raises(ValueError, match="0123456789abcdef0123456789abcdef"):
        trials_from_mlflow(client, "0123456789abcdef0123456789abcdef")
    with pytest.raises(ValueError, match="no-such-experiment"):
        trials_from_mlflow(client, "no-such-experiment")
    with pytest.raises(ValueError, match="no props_ray job run"):
        trials_from_mlflow(client, "no-jobs-here")
    a_trial = next(iter(store["expected"]))
    with pytest.raises(ValueError, match=f"{a_trial}.*not a props_ray job run"):
        trials_from_mlflow(client, a_trial)


# -- aggregation -----------------------------------------------------------------------------------------------
def _groups(store):
    out: dict[tuple, list[dict]] = {}
    for row in store["expected"].values():
        out.setdefault((row["method_label"], row["epsilon"]), []).append(row)
    return out


def _t_half(values):
    x = np.asarray(values, dtype=float)
    lo, hi = stats.t.interval(0.95, len(x) - 1, loc=x.mean(), scale=stats.sem(x))
    return (hi - lo) / 2


def test_summarize_means_and_t_intervals_over_seeds(store, summary):
    groups = _groups(store)
    assert len(summary) == len(groups) == 1 + 3 * 2
    assert list(summary["method_label"]) == ["nonprivate", "rr", "rr", "props-mle", "props-mle", "dpsgd", "dpsgd"]
    assert list(summary["epsilon"]) == [math.inf, 0.5, 2.0, 0.5, 2.0, 0.5, 2.0]
    for r in summary.to_dict("records"):
        rows = groups[(r["method_label"], r["epsilon"])]
        wins = [x["win_rate"] for x in rows]
        assert r["n_seeds"] == len(rows) == 2
        assert r["win_rate_mean"] == pytest.approx(np.mean(wins), abs=1e-12)
        assert r["win_rate_ci"] == pytest.approx(_t_half(wins), rel=1e-9)
        assert r["win_rate_ci"] > 0
        assert r["win_rate_trial_ci"] == pytest.approx(
            np.mean([(x["win_rate_ci_high"] - x["win_rate_ci_low"]) / 2 for x in rows]), abs=1e-12)
        accs = [x["label_accuracy"] for x in rows]
        if r["method_label"] == "dpsgd":
            assert math.isnan(r["label_accuracy_mean"]) and math.isnan(r["label_accuracy_ci"])
            assert r[f"{M.EPSILON_SPENT}_mean"] == pytest.approx(np.mean([x[M.EPSILON_SPENT] for x in rows]))
        elif r["method_label"] == "nonprivate":
            assert r["label_accuracy_mean"] == 1.0 and r["label_accuracy_ci"] == 0.0
        else:
            assert r["label_accuracy_mean"] == pytest.approx(np.mean(accs), abs=1e-12)
            assert r["label_accuracy_ci"] == pytest.approx(_t_half(accs), rel=1e-9)


def test_summarize_one_seed_has_zero_seed_ci_and_the_trial_ci(store, trials):
    one = summarize(trials[trials["seed"] == 1])
    assert (one["n_seeds"] == 1).all()
    assert (one["win_rate_ci"] == 0).all()
    by_key = {(r["method_label"], r["epsilon"]): r for r in store["expected"].values() if r["seed"] == 1}
    for r in one.to_dict("records"):
        t = by_key[(r["method_label"], r["epsilon"])]
        assert r["win_rate_mean"] == pytest.approx(t["win_rate"], abs=1e-12)
        assert r["win_rate_trial_ci"] == pytest.approx((t["win_rate_ci_high"] - t["win_rate_ci_low"]) / 2, abs=1e-12)
    text = format_summary(one, markdown=False)
    r = one.iloc[1]
    assert f"{r['win_rate_mean']:.3f} ± {r['win_rate_trial_ci']:.3f}†" in text
    assert "† one seed" in text


# -- text ------------------------------------------------------------------------------------------------------
def _markdown_rows(text):
    lines = [x for x in text.splitlines() if x.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    assert re.fullmatch(r"\|(---\|)+", lines[1])
    return head, [dict(zip(head, (c.strip() for c in x.strip("|").split("|")))) for x in lines[2:]]


def test_format_summary_markdown_and_text_show_the_numbers(summary):
    md = format_summary(summary, markdown=True)
    head, rows = _markdown_rows(md)
    assert head == ["method", "ε", "seeds", "win rate ± 95% CI", "label accuracy ± 95% CI", "unit", "privacy"]
    assert len(rows) == len(summary)
    for row, r in zip(rows, summary.to_dict("records")):
        assert row["method"] == r["method_label"]
        eps = "∞" if math.isinf(r["epsilon"]) else f"{r['epsilon']:g}"
        if r["method_label"] == "dpsgd":
            eps += f" (spent {r[f'{M.EPSILON_SPENT}_mean']:.4g})"
        assert row["ε"] == eps
        assert row["privacy"] == "simulation"
        assert row["unit"] == {"nonprivate": "none", "dpsgd": "pair"}.get(r["method_label"], "label")
        assert row["seeds"] == "2"
        assert row["win rate ± 95% CI"] == f"{r['win_rate_mean']:.3f} ± {r['win_rate_ci']:.3f}"
        if r["method_label"] == "dpsgd":
            assert row["label accuracy ± 95% CI"] == "-"
        else:
            assert row["label accuracy ± 95% CI"] == f"{r['label_accuracy_mean']:.3f} ± {r['label_accuracy_ci']:.3f}"
    assert "†" not in md

    text = format_summary(summary, markdown=False)
    lines = text.splitlines()
    assert len(lines) == 4 + len(summary) and "|" not in text
    assert lines[-2].startswith("privacy: seeded randomness can be replayed")  # the fixture's runs are seeded
    assert lines[-1].startswith("unit: what neighbouring datasets differ in")
    assert "DP synthetic instructions" not in text  # no such trial in the fixture
    assert set(lines[1]) <= {"-", " "}
    for line, r in zip(lines[2:], summary.to_dict("records")):
        assert line.split()[0] == r["method_label"]
        assert f"{r['win_rate_mean']:.3f} ± {r['win_rate_ci']:.3f}" in line
    starts = {ln.index(f"{r['win_rate_mean']:.3f}") for ln, r in zip(lines[2:], summary.to_dict("records"))}
    assert len(starts) == 1  # aligned column


def test_write_summary_round_trips(summary, tmp_path):
    paths = write_summary(summary, tmp_path / "out")
    assert [p.name for p in paths] == ["summary.csv", "summary.md"]
    back = pd.read_csv(paths[0])
    assert list(back.columns) == list(summary.columns)
    np.testing.assert_allclose(back["win_rate_ci"], summary["win_rate_ci"], rtol=1e-12)
    np.testing.assert_allclose(back["epsilon"], summary["epsilon"])
    assert paths[1].read_text() == format_summary(summary, markdown=True) + "\n"


# -- plots -----------------------------------------------------------------------------------------------------
def _check_png(path, min_px=200):
    import matplotlib.image as mpimg

    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE, path
    img = mpimg.imread(path)
    assert img.shape[0] > min_px and img.shape[1] > min_px, img.shape
    assert float(np.std(img[..., :3])) > 0.02  # not a blank canvas


@pytest.fixture
def captured(monkeypatch):
    """The figures the plot functions save (they are still written to disk)."""
    figs = {}
    save = plots._save

    def keep(fig, path):
        figs[path.name] = {"lines": [(ln.get_label(), ln.get_xdata(), ln.get_ydata(), ln.get_linestyle())
                                     for ln in fig.axes[0].get_lines()],
                           "collections": len(fig.axes[0].collections), "xscale": fig.axes[0].get_xscale(),
                           "ylim": fig.axes[0].get_ylim(), "title": fig.axes[0].get_title(),
                           "xlabel": fig.axes[0].get_xlabel(), "ylabel": fig.axes[0].get_ylabel()}
        return save(fig, path)

    monkeypatch.setattr(plots, "_save", keep)
    return figs


def test_make_plots_writes_valid_pngs_with_the_right_content(trials, summary, tmp_path, captured, store):
    paths = plots.make_plots(trials, summary, tmp_path / "plots")
    assert [p.name for p in paths] == list(plots.FILES)
    for p in paths:
        _check_png(p)

    win = captured["win_rate_vs_epsilon.png"]
    assert win["xscale"] == "log" and win["ylim"] == (0, 1)
    assert win["title"] and win["xlabel"] and win["ylabel"]
    lines = {label: (x, y, ls) for label, x, y, ls in win["lines"]}
    for method in ("rr", "props-mle", "dpsgd"):
        x, y, ls = lines[method]
        g = summary[summary["method_label"] == method]
        np.testing.assert_allclose(x, EPSILONS)
        np.testing.assert_allclose(y, g["win_rate_mean"])
        assert ls == "-"
    x, y, ls = lines["nonprivate"]
    assert ls == "--"
    np.testing.assert_allclose(y, [summary.iloc[0]["win_rate_mean"]] * 2)
    assert win["collections"] >= 3  # CI bands

    acc = captured["label_accuracy_vs_epsilon.png"]
    labels = [label for label, *_ in acc["lines"]]
    assert "dpsgd" not in labels and {"rr", "props-mle", "nonprivate"} <= set(labels)
    _, gx, gy, ls = next(line for line in acc["lines"] if line[0] == "RR labels (1 − γ_ε)")
    assert ls == ":" and len(gx) >= 50
    np.testing.assert_allclose(gy, 1 - 1 / (1 + np.exp(np.asarray(gx))))

    stage = captured["props_stage_label_accuracy.png"]
    props_rows = [r for r in store["expected"].values() if r["method"] == "props"]
    for eps in EPSILONS:
        _, x, y, _ = next(line for line in stage["lines"] if line[0] == f"props-mle, ε = {eps:g}")
        want = np.mean([r["stage_label_accuracy"] for r in props_rows if r["epsilon"] == eps], axis=0)
        np.testing.assert_allclose(x, [1, 2, 3])
        np.testing.assert_allclose(y, want, atol=1e-12)


def test_make_plots_skips_the_stage_plot_without_props(trials, tmp_path):
    no_props = trials[trials["method"] != "props"]
    paths = plots.make_plots(no_props, summarize(no_props), tmp_path)
    assert [p.name for p in paths] == list(plots.FILES[:2])
    for p in paths:
        _check_png(p)
    assert not (tmp_path / plots.FILES[2]).exists()
    with pytest.raises(ValueError, match="no PROPS trials"):
        plots.plot_props_stage_accuracy(no_props, tmp_path / "x.png")


def test_audited_summaries_get_the_audit_plot_with_the_claim_as_its_diagonal(trials, summary, tmp_path, captured):
    audited = summary.copy()
    eps = audited["epsilon"].astype(float)
    audited["audit_epsilon_lower_bound_mean"] = np.where(np.isfinite(eps), eps / 2, 3.0)  # non-private: 3
    audited["audit_epsilon_lower_bound_ci"] = 0.0
    paths = plots.make_plots(trials, audited, tmp_path)
    assert paths[-1].name == plots.AUDIT_FILE
    _check_png(paths[-1])
    fig = captured[plots.AUDIT_FILE]
    lines = {label: (x, y, ls) for label, x, y, ls in fig["lines"]}
    x, y, ls = lines["rr"]
    np.testing.assert_allclose(x, EPSILONS)
    np.testing.assert_allclose(y, np.asarray(EPSILONS) / 2)
    _, y, ls = lines["nonprivate"]
    assert ls == "--" and np.allclose(y, 3.0)
    x, y, ls = next(v for k, v in lines.items() if k.startswith("claimed ε"))
    assert ls == ":"
    np.testing.assert_allclose(y, x)  # bound = claim
    assert fig["ylim"][1] >= 3.0
    assert plots.AUDIT_FILE not in [p.name for p in plots.make_plots(trials, summary, tmp_path / "plain")]


# -- command ---------------------------------------------------------------------------------------------------
def test_report_command_prints_and_writes(store, summary, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store["uri"])
    assert report_command(EXPERIMENT, None, markdown=True, plots_dir=str(tmp_path / "rep")) == 0
    out = capsys.readouterr().out
    assert format_summary(summary, markdown=True) in out
    assert store["job_id"] in out
    for name in ("summary.csv", "summary.md", *plots.FILES):
        assert (tmp_path / "rep" / name).exists(), name
    _check_png(tmp_path / "rep" / plots.FILES[0])


def test_report_command_errors(store, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert report_command("nope-not-here", store["uri"], markdown=False, plots_dir=None) == 2
    assert "nope-not-here" in capsys.readouterr().err
    monkeypatch.chdir(tmp_path)  # default store sqlite:///mlflow.db: absent here, and not created
    assert report_command(EXPERIMENT, None, markdown=False, plots_dir=None) == 2
    assert "no MLflow store" in capsys.readouterr().err
    assert not (tmp_path / "mlflow.db").exists()


def test_named_variants_of_a_method_are_summarized_apart(tmp_path):
    """Two PROPS mle variants in one job (one with a ``name``) stay separate rows, each after its method."""
    from mlflow.entities import Metric, Param
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(tracking_uri=uri)
    exp = client.create_experiment("variants", artifact_location=str(tmp_path / "artifacts"))
    job_id = client.create_run(exp, run_name="v", tags={"props_ray.kind": "job", "props_ray.key": "v"}).info.run_id
    wins = {("rr", None, None): 0.6, ("props", "mle", "props-mle"): 0.8, ("props", "mle", "props-mle-bounded"): 0.7,
            ("dpsgd", None, None): 0.5}
    for (method, rule, name), win in wins.items():
        run_id = client.create_run(exp, run_name=f"{name or method}-eps1", tags={
            "props_ray.kind": "trial", "mlflow.parentRunId": job_id}).info.run_id
        params = {"method": method, "epsilon": "1.0", "stages": "3", "seed": "0"}
        params.update({"rule": rule} if rule else {})
        params.update({"method_name": name} if name else {})  # runs from before method_name fall back
        client.log_batch(run_id, params=[Param(k, v) for k, v in params.items()],
                         metrics=[Metric("win_rate", win, 0, 0)])
    s = summarize(trials_from_mlflow(client, job_id))
    assert list(s["method_label"]) == ["rr", "props-mle", "props-mle-bounded", "dpsgd"]
    assert list(s["win_rate_mean"]) == [0.6, 0.8, 0.7, 0.5]
