"""DP synthetic instructions (arXiv 2402.13659): private prompts replaced by DP synthetic ones before
anyone annotates or trains.

1. A generator (the reference plus LoRA) is DP fine-tuned on the private prompts: DP-SGD through the
   project's engine with the prompt as the unit, its noise calibrated (by the engine, on the stage's
   actual size) so that it and the histogram below together spend the trial's epsilon (one
   accountant, sequential composition).
2. It samples M = ``synthetic_per_private`` x N synthetic prompts (Ray Data batch inference).
3. ``filter: dp_histogram``: the synthetic prompts are embedded (feature hashing, nothing fitted on
   real data), projected by a PCA fitted on them and clustered by k-means on them alone; each private
   prompt votes for its nearest centre and the counts are released with Gaussian noise (sensitivity
   1 under add/remove-one); N synthetic prompts are resampled to the noisy cluster shares.
   ``filter: none`` takes N of them at random.
4. Annotators label two reference responses to each (the embedded task's simulated labeller, or the
   judge on real data) and DPO trains on those pairs without noise: post-processing.

The private prompts never leave the trial: the released histogram and the synthetic prompts are DP.
"""

from __future__ import annotations

import hashlib

import numpy as np
import pandas as pd

from props_ray import metrics as M
from props_ray.errors import UserError
from props_ray.methods.registry import Method
from props_ray.methods.trial import Trial
from props_ray.privacy import accounting
from props_ray.privacy.histogram import (gaussian_histogram, histogram_alone_epsilon, histogram_mechanism,
                                         resample_to_histogram, total_variation, vote_counts)
from props_ray.sections import SyntheticInstructionsSection


def synthetic_instructions(trial: Trial) -> dict:
    m: SyntheticInstructionsSection = trial.method
    cfg, dp = trial.cfg, trial.cfg.privacy.dpsgd
    private = trial.private_prompts()
    n = len(private)

    # -- 1. the generator, DP fine-tuned: it and the histogram compose to the trial's epsilon ------
    released = [histogram_mechanism(m.histogram_sigma)] if m.histogram_sigma else []
    delta = trial.delta()
    # the data step refused this job if the histogram alone spends the epsilon; checked again before spending
    histogram_alone_epsilon(m.display_name, m.histogram_sigma, trial.epsilon, delta, dp.accountant)
    generator = trial.train_generator(1, private, trial.epsilon, released, m.generator_epochs, m.generator_lr)

    # -- 2. synthetic prompts; 3. the DP histogram filter; 4. annotation ----------------------------
    pairs_path = trial.dir / "synthetic-pairs.parquet"
    if not pairs_path.exists():
        rng = _rng(trial, "resample")
        pool = _sample(trial, generator, m.synthetic_count(n))
        if m.filter == "dp_histogram":
            from props_ray.synthetic.embedding import Filter

            if m.clusters > len(pool):
                raise UserError(f"methods: {m.display_name}'s clusters ({m.clusters}) is more than the "
                                f"{len(pool)} usable synthetic prompts; lower clusters or raise synthetic_per_private")
            fitted = Filter.fit(pool, m.clusters, rng, m.explained_variance)  # synthetic prompts only
            noisy = gaussian_histogram(vote_counts(fitted.assign(private), m.clusters), m.histogram_sigma,
                                       _normal(trial))
            chosen = [pool[i] for i in resample_to_histogram(fitted.assign(pool), noisy, n, rng)]
            trial.state["released_histogram"] = noisy.tolist()  # DP: may be kept and logged
        else:
            chosen = [pool[i] for i in rng.choice(len(pool), size=n, replace=len(pool) < n)]
        trial.state["synthetic"] = {"sampled": m.synthetic_count(n), "usable": len(pool), **_tv(trial, pool, chosen)}
        from props_ray.synthetic.annotate import annotate

        pairs = annotate(chosen, cfg=cfg, base_path=trial.base_path, judge=trial.judge, seed=cfg.seed + 7)
        pairs.to_parquet(pairs_path)
        trial.save()
    pairs = pd.read_parquet(pairs_path)

    # -- 5. DPO on the annotated synthetic pairs (post-processing: no noise) ---------------------------
    final = trial.train([2], {2: pairs}, loss="sigmoid")[-1]
    win, seconds = trial.evaluate(final)
    g = generator["metrics"]
    history = [(g["noise_multiplier"], g["sample_rate"], int(g["steps"])), *released]
    extra = {M.EPSILON_SPENT: accounting.composed_epsilon(history, g["delta"], dp.accountant), M.DELTA: g["delta"],
             "generator_epsilon": g["epsilon"], **{f"synthetic_{k}": v for k, v in trial.state["synthetic"].items()}}
    if released:
        extra["histogram_epsilon"] = accounting.composed_epsilon(released, g["delta"], dp.accountant)
    return trial.outcome({1: pd.DataFrame({"prompt": private}), 2: pairs}, win, seconds, extra=extra)


def _sample(trial: Trial, generator: dict, count: int) -> list[str]:
    """The generator's samples that the annotator can label (on the embedded task: well-formed prompts)."""
    from props_ray.synthetic.generator import sample_instructions

    out = sample_instructions(count, base_path=trial.base_path, adapter_path=generator["model_path"],
                              cfg=trial.cfg, seed=trial.cfg.seed + 5)
    if trial.cfg.is_embedded:
        from props_ray.reference import embedded_task

        task = embedded_task(trial.cfg)
        out = [p for p in out if task.parse_topic(p) is not None]
    out = [p for p in out if p.strip()]
    if not out:
        raise UserError(f"{trial.name}: the generator produced no usable prompt in {count} samples "
                        "(more epsilon, generator_epochs or generator_lr may help)")
    return out


def _tv(trial: Trial, pool: list[str], chosen: list[str]) -> dict:
    """On the embedded task, the total variation between the synthetic topic mixture and the task's true
    prompt mixture (known to the simulation, not read from the private prompts), before and after."""
    if not trial.cfg.is_embedded:
        return {}
    from props_ray.reference import embedded_task

    task = embedded_task(trial.cfg)
    return {"tv_before": total_variation(task.topic_mixture(pool), task.topic_shares),
            "tv_after": total_variation(task.topic_mixture(chosen), task.topic_shares)}


def _rng(trial: Trial, purpose: str) -> np.random.Generator:
    """Post-processing randomness (k-means seeding, resampling): seeded from the trial, private or not."""
    digest = hashlib.sha256(f"{trial.name}|{trial.epsilon!r}|{purpose}".encode()).digest()
    return np.random.default_rng([trial.cfg.seed, int.from_bytes(digest[:8], "big")])


def _normal(trial: Trial):
    """The histogram's noise: the OS CSPRNG in private runs, a seeded stream in simulations."""
    if trial.cfg.secure_randomness:
        from props_ray.privacy.randomness import csprng_normal

        return csprng_normal
    return _rng(trial, "histogram noise").standard_normal


METHOD = Method("synthetic_instructions", SyntheticInstructionsSection, synthetic_instructions,
                protects="each private prompt (instruction): its generator and histogram are (epsilon, delta)-DP; "
                         "labels come from annotators on synthetic prompts")
