"""Randomized response: DPO on the epsilon-RR labels of every partition (epsilon-label-DP, local).

Every label passes RR once, in the ledger's one draw for the dataset; this trial's epsilon is derived
from it by post-processing. ``loss: robust`` corrects the DPO loss for the known flip rate gamma_eps.
"""

from __future__ import annotations

from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.sections import RRSection


def rr(trial: Trial) -> dict:
    pairs = trial.randomized_response_partitions()
    stages = list(pairs)
    final = trial.train(stages, pairs, loss=trial.method.stage_loss(1))[-1]
    win, seconds = trial.evaluate(final)
    return trial.outcome(pairs, win, seconds, label_acc=trial.label_accuracy(pairs))


METHOD = Method("rr", RRSection, rr, protects="each preference label (epsilon-label-DP, local)")
