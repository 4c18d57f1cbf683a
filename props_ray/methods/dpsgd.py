"""DP-SGD DPO through Opacus: the pair as the privacy unit, Poisson sampling, PRV/RDP accounting.

Trains on the raw labels of every partition; the guarantee is central (epsilon, delta)-DP per pair
for what the training releases (the model). The engine (:mod:`props_ray.dpsgd.engine`) clips per
pair, adds noise once per logical step across workers, and accounts per disjoint stage; the job's
``privacy.dpsgd`` section sets delta, C, the batch sizes and the accountant.
"""

from __future__ import annotations

from props_ray import metrics as M
from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.sections import DPSGD_MECHANISM, DPSGDSection


def dpsgd(trial: Trial) -> dict:
    pairs = trial.raw_partitions()
    stages = list(pairs)
    final = trial.train(stages, pairs, loss=trial.method.stage_loss(1))[-1]
    win, seconds = trial.evaluate(final)
    m = final["metrics"]  # the accountant at the last step: epsilon = max over the disjoint stages
    extra = {M.EPSILON_SPENT: m.get("epsilon"), **{k: m.get(k) for k in (M.DELTA, *DPSGD_MECHANISM)}}
    return trial.outcome(pairs, win, seconds, extra=extra)


METHOD = Method("dpsgd", DPSGDSection, dpsgd,
                protects="the whole pair: prompt, responses and label ((epsilon, delta)-DP, central)")
