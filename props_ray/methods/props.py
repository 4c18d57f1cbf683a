"""PROPS (arXiv 2508.06783): K disjoint stages; each stage's model relabels the next partition.

Stage 1 trains DPO on partition 1's RR labels. At stage k the stage k-1 model scores partition k
(Ray Data batch inference), its label is combined with the RR label by the ``mle`` or ``posterior``
rule (:mod:`props_ray.privacy.label_combination`), and DPO continues from the stage k-1 model. Every
quantity is a function of RR outputs, so each label stays epsilon-label-DP whatever K is.
"""

from __future__ import annotations

from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.sections import PropsSection


def props(trial: Trial) -> dict:
    m: PropsSection = trial.method
    rr_labels = trial.randomized_response_partitions()
    options = {"model_error_confidence": m.model_error_confidence} if m.rule == "mle" else {}
    used, stage_info, previous = {}, {}, None
    for k in rr_labels:
        pairs = rr_labels[k]
        if previous is not None:  # the stage k-1 model relabels partition k
            pairs, stage_info[k] = trial.relabel(k, pairs, previous, m.rule, **options)
        used[k] = pairs
        previous = trial.train([k], {k: pairs}, loss=m.stage_loss(k),
                               init_adapter=previous["model_path"] if previous else None)[0]
    win, seconds = trial.evaluate(previous)
    return trial.outcome(used, win, seconds, label_acc=trial.label_accuracy(used), stage_info=stage_info)


METHOD = Method("props", PropsSection, props,
                protects="each preference label (epsilon-label-DP, local; relabels are post-processing)")
