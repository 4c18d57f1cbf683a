"""The data step of a job: load, validate, hold out evaluation prompts, partition.

Raw labels exist only here and in memory: :class:`PreparedData` holds the raw
partitions (for the non-private baseline and the label-accuracy diagnostic)
and is never written to disk; what gets persisted is the privatized output of
:mod:`props_ray.data.privatize`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from props_ray.config import JobConfig
from props_ray.data.partition import hold_out, split_partitions

log = logging.getLogger(__name__)

DEFAULT_EMBEDDED_PAIRS = 3000


@dataclass
class PreparedData:
    partitions: list[pd.DataFrame]  # raw, stage 1..K (index 0 is stage 1)
    eval_prompts: list[str]
    skipped: list[dict]
    source: str

    @property
    def num_pairs(self) -> int:
        return sum(len(p) for p in self.partitions)

    def partition(self, stage: int) -> pd.DataFrame:
        return self.partitions[stage - 1]

    def truth(self) -> pd.DataFrame:
        return pd.concat(self.partitions, ignore_index=True)[["id", "chosen"]]


def prepare_data(cfg: JobConfig) -> PreparedData:
    skipped: list[dict] = []
    if cfg.is_embedded:
        from props_ray.reference import embedded_task

        task = embedded_task(cfg)
        pairs = task.preference_pairs(cfg.data.num_pairs or DEFAULT_EMBEDDED_PAIRS, cfg.seed)
        eval_prompts = task.eval_prompts(cfg.data.eval_prompts, cfg.seed)
        source = "embedded"
    else:
        from props_ray.data.loaders import load_preferences

        loaded = load_preferences(cfg.data.source, format=cfg.data.format, split=cfg.data.split,
                                  limit=cfg.data.num_pairs, on_bad_row=cfg.data.on_bad_row)
        skipped = loaded.skipped
        for s in skipped[:20]:
            log.warning("skipped row %s (id %s): %s", s.get("row"), s.get("id"), s.get("reason"))
        pairs, eval_prompts = hold_out(loaded.pairs, cfg.data.eval_prompts, cfg.seed)
        source = f"{loaded.source} ({loaded.format})"
    partitions = split_partitions(pairs, cfg.stages, cfg.seed, cfg.data.stage_proportions)
    return PreparedData(partitions, eval_prompts, skipped, source)
