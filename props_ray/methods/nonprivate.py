"""Non-private DPO on the raw labels of every partition: the ceiling every private method is measured against."""

from __future__ import annotations

from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.sections import NonprivateSection


def nonprivate(trial: Trial) -> dict:
    pairs = trial.raw_partitions()
    stages = list(pairs)
    final = trial.train(stages, pairs, loss=trial.method.stage_loss(1))[-1]
    win, seconds = trial.evaluate(final)
    return trial.outcome(pairs, win, seconds, label_acc=trial.label_accuracy(pairs))


METHOD = Method("nonprivate", NonprivateSection, nonprivate, protects="nothing")
