"""A trial's identity: what its results depend on.

A trial directory records the identity it was made under; the data step refuses to resume it under
another (another seed, K, epsilon, dataset or setting), so one configuration never reuses another's
finished trials as its own.
"""

from __future__ import annotations

import hashlib
import json

from props_ray.config import JobConfig
from props_ray.sections import MethodSection

#: Settings that change how a trial runs but not what it computes: a trial resumed under other values
#: of these keeps its checkpoints and results. Every other setting is part of the trial's identity.
EXECUTION_ONLY = {"data": {"source"}, "model": {"cache_dir"},
                  "train": {"max_failures", "cpus_per_worker", "use_gpu", "log_every"},
                  "privacy": {"epsilons", "accept_new_draw", "acknowledge_seeded_randomness"}}


def trial_identity(cfg: JobConfig, method: MethodSection, epsilon: float | None, dataset: str) -> dict:
    """What a trial's results depend on: its seed, K, epsilon, the dataset's fingerprint, and a short hash of
    each section that shapes it (its own method section, not the job's other methods). A trial directory
    made under another identity holds another configuration's results."""
    def digest(section: str, value) -> str:
        if isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in EXECUTION_ONLY.get(section, ())}
        return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]

    dumped = cfg.model_dump(mode="json")
    return {"seed": cfg.seed, "stages": cfg.stages, "epsilon": epsilon, "dataset": dataset,
            "method": digest("method", method.model_dump(mode="json")),
            **{k: digest(k, dumped[k]) for k in ("data", "task", "model", "train", "privacy", "eval", "audit")}}
