"""The names a trial's results carry, from the writer (:mod:`props_ray.run_tree`) to MLflow to the
reader (:mod:`props_ray.report`): defined once here, so writer and reader cannot drift apart."""

from __future__ import annotations

WIN_RATE = "win_rate"
WIN_RATE_CI_LOW = "win_rate_ci_low"
WIN_RATE_CI_HIGH = "win_rate_ci_high"
LABEL_ACCURACY = "label_accuracy"
STAGE_LABEL_ACCURACY = "stage_label_accuracy"  # one value per stage (MLflow step = stage)
#: DP-SGD's spent epsilon: the maximum over the disjoint stages, from the accountant's history.
EPSILON_SPENT = "epsilon_spent"
DELTA = "delta"
#: The dataset's cumulative label-epsilon (the ledger's sum over its RR draws), on label-DP trials.
LABEL_EPSILON_CUMULATIVE = "label_epsilon_cumulative"

#: Tag on job and trial runs: 'private', 'simulation' (embedded task, seeded) or 'not private'.
PRIVACY_TAG = "props_ray.privacy"
