"""MLflow glue: the run tree of a job, resumable and never holding raw labels.

Run tree::

    job run (tag props_ray.key = JOB)
    └── trial run per (method, epsilon): params method, epsilon, ...; metrics win_rate, label_accuracy
        └── stage run per stage: param stage; per-step loss, reward_accuracy, margin

Every run carries a ``props_ray.key`` tag; a re-run of the same job finds its
runs by that tag and continues them instead of creating duplicates.

Only privatized quantities and aggregates are logged. Params are checked
against a deny-list of label-bearing names as a last line of defence.

If the tracking server goes away mid-run, logging calls are written to a
local journal (``JOB_DIR/tracking-journal.jsonl``) and replayed by
:meth:`Tracker.flush` once it answers again, so no metric is lost.
"""

from __future__ import annotations

import json
import logging
import os
import time
from contextlib import suppress
from pathlib import Path

from props_ray.errors import UserError

log = logging.getLogger(__name__)

KEY_TAG = "props_ray.key"
PARENT_TAG = "mlflow.parentRunId"
FORBIDDEN_PARAM_WORDS = ("raw_label", "true_label", "raw_chosen")


#: the experiment tag MLflow 3's UI reads to choose its mode, and the model-training value
EXPERIMENT_KIND_TAG, EXPERIMENT_KIND = "mlflow.experimentKind", "custom_model_development"

#: A saved view of the runs table (MLflow 3 reads an experiment tag ``mlflow.sharedViewState.KEY`` when the
#: page is opened with ``?viewStateShareKey=KEY``): the trials alone (the runs with a win rate), flat rather
#: than collapsed under their job run (MLflow nests children only when sorting by date), best reward first,
#: with their method, epsilon and results as columns. ``props-ray ui`` prints its URL.
TRIALS_VIEW = "props-ray-trials"
TRIALS_VIEW_TAG = f"mlflow.sharedViewState.{TRIALS_VIEW}"
_TRIAL_COLUMNS = ["params.`method_name`", "params.`epsilon`", "params.`seed`", "metrics.`win_rate`",
                  "metrics.`reward_mean`", "metrics.`label_accuracy`", "metrics.`epsilon_spent`",
                  "params.`privacy_unit`"]
TRIALS_VIEW_STATE = {
    "searchFilter": "metrics.win_rate >= 0",
    "orderByKey": "metrics.`reward_mean`",
    "orderByAsc": False,
    "selectedColumns": _TRIAL_COLUMNS,
    "columnOrder": _TRIAL_COLUMNS,  # the method and epsilon first, then the results
    "runsHiddenMode": "SHOW_ALL",
}


class TrackingUnavailable(UserError, RuntimeError):
    pass


class Tracker:
    def __init__(self, uri: str, experiment: str, journal: Path | None = None, check_timeout: float = 15.0):
        import mlflow
        from mlflow.tracking import MlflowClient

        self.uri = uri
        # Bounded retries: an outage is journaled (see module docstring) rather than waited out.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")
        mlflow.set_tracking_uri(uri)
        self.client = MlflowClient(tracking_uri=uri)
        self.journal = journal
        self._check(check_timeout)
        exp = self.client.get_experiment_by_name(experiment)
        self.experiment_id = exp.experiment_id if exp else self.client.create_experiment(experiment)
        tags = exp.tags if exp else {}
        if tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # MLflow 3's UI opens a training experiment on its runs table, not on the GenAI traces view
            self.client.set_experiment_tag(self.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        view = json.dumps(TRIALS_VIEW_STATE)
        if tags.get(TRIALS_VIEW_TAG) != view:
            self.client.set_experiment_tag(self.experiment_id, TRIALS_VIEW_TAG, view)

    def _check(self, timeout: float) -> None:
        """Fail fast with a clear message when the tracking server does not answer."""
        if not self.uri.startswith(("http://", "https://")):
            return
        import urllib.request

        url = self.uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(url, timeout=timeout) as r:
                if r.status != 200:
                    raise OSError(f"HTTP {r.status}")
        except Exception as err:  # noqa: BLE001 - any failure means "not reachable"
            raise TrackingUnavailable(
                f"the MLflow tracking server at {self.uri} is not reachable ({err}); start it, or set "
                f"MLFLOW_TRACKING_URI / tracking.tracking_uri to a reachable store") from None

    # -- runs -------------------------------------------------------------------
    def run(self, key: str, name: str, parent: str | None = None, tags: dict | None = None) -> str:
        """The run with this key: an existing one (resumed) or a new one."""
        found = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{KEY_TAG}` = '{key}'",
                                        max_results=1)
        if found:
            run_id = found[0].info.run_id
            if found[0].info.status != "FINISHED":
                self.client.update_run(run_id, status="RUNNING")
            return run_id
        all_tags = {KEY_TAG: key, **(tags or {})}
        if parent:
            all_tags[PARENT_TAG] = parent
        return self.client.create_run(self.experiment_id, run_name=name, tags=all_tags).info.run_id

    def is_finished(self, run_id: str) -> bool:
        return self.client.get_run(run_id).info.status == "FINISHED"

    def finish(self, run_id: str, status: str = "FINISHED") -> None:
        self._call("set_terminated", run_id, status=status)

    # -- logging ----------------------------------------------------------------
    def params(self, run_id: str, params: dict) -> None:
        for k in params:
            if any(w in k.lower() for w in FORBIDDEN_PARAM_WORDS):
                raise ValueError(f"refusing to log param {k!r}: raw labels never go to MLflow")
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        new = [Param(k, str(v)) for k, v in params.items() if k not in existing]
        if new:
            self._call("log_batch", run_id, params=new)

    def metrics(self, run_id: str, metrics: dict, step: int = 0) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        rows = [Metric(k, float(v), ts, step) for k, v in metrics.items() if v is not None]
        if rows:
            self._call("log_batch", run_id, metrics=rows)

    def metric_history(self, run_id: str, rows: list[dict], keys: tuple[str, ...]) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        batch = [Metric(k, float(r[k]), ts, int(r["step"])) for r in rows for k in keys if k in r]
        for i in range(0, len(batch), 900):
            self._call("log_batch", run_id, metrics=batch[i:i + 900])

    def artifact(self, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
        p = Path(path)
        if p.is_dir():
            self._call("log_artifacts", run_id, str(p), artifact_path)
        else:
            self._call("log_artifact", run_id, str(p), artifact_path)

    # -- resilience --------------------------------------------------------------
    def _call(self, method: str, *args, **kwargs) -> None:
        try:
            getattr(self.client, method)(*args, **kwargs)
        except Exception as err:  # noqa: BLE001
            if self.journal is None:
                raise
            log.warning("MLflow call %s failed (%s); journaled to %s for later", method, err, self.journal)
            self._journal(method, args, kwargs)

    def _journal(self, method: str, args, kwargs) -> None:
        def enc(v):
            if hasattr(v, "to_dictionary"):
                return {"__entity__": type(v).__name__, **v.to_dictionary()}
            if isinstance(v, list):
                return [enc(x) for x in v]
            return v
        self.journal.parent.mkdir(parents=True, exist_ok=True)
        with open(self.journal, "a") as f:
            f.write(json.dumps({"method": method, "args": [enc(a) for a in args],
                                "kwargs": {k: enc(v) for k, v in kwargs.items()}}) + "\n")

    def flush(self) -> int:
        """Replay journaled calls; returns how many were replayed. Keeps those that still fail."""
        if self.journal is None or not self.journal.exists():
            return 0
        from mlflow.entities import Metric, Param

        def dec(v):
            if isinstance(v, dict) and "__entity__" in v:
                d = dict(v)
                kind = d.pop("__entity__")
                return Metric(d["key"], d["value"], d["timestamp"], d["step"]) if kind == "Metric" else Param(d["key"], d["value"])
            if isinstance(v, list):
                return [dec(x) for x in v]
            return v
        lines = self.journal.read_text().splitlines()
        left, done = [], 0
        for line in lines:
            rec = json.loads(line)
            try:
                getattr(self.client, rec["method"])(*[dec(a) for a in rec["args"]],
                                                    **{k: dec(v) for k, v in rec["kwargs"].items()})
                done += 1
            except Exception:  # noqa: BLE001
                left.append(line)
        if left:
            self.journal.write_text("\n".join(left) + "\n")
        else:
            with suppress(FileNotFoundError):
                os.unlink(self.journal)
        return done
