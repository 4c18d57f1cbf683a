"""The data step of a job: load, validate, open the dataset's ledger, hold out prompts, partition.

Everything that needs the data is checked here, before any draw, any training or any Ray
process: held-out prompts, stage partitions (per record, from the ledger's key), DP-SGD's delta
against N, and what the ledger would do with the job's epsilons (reuse, draw, or refuse).

Raw labels exist only here and in memory: :class:`PreparedData` holds the raw pairs (for the
draw, the non-private baseline and the label-accuracy diagnostic) and is never written to disk;
what is persisted is the ledger's privatized draw (:mod:`props_ray.data.ledger`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import pandas as pd

from props_ray.config import JobConfig
from props_ray.data.ledger import Ledger
from props_ray.data.partition import hold_out, split_partitions

log = logging.getLogger(__name__)

DEFAULT_EMBEDDED_PAIRS = 3000
CANARY_PREFIX = "canary-"


@dataclass
class PreparedData:
    dataset: pd.DataFrame  # every valid pair of the source, raw (what the ledger fingerprints and draws for)
    partitions: list[pd.DataFrame]  # raw, stage 1..K (index 0 is stage 1)
    eval_prompts: list[str]
    skipped: list[dict]
    source: str
    ledger: Ledger
    ledger_action: str  # what the driver's draw step will do: 'none', 'reuse' or 'draw'

    def canaries(self) -> pd.DataFrame:
        """The audit's canary pairs as trained on, raw ("chosen" is the secret coin's pick)."""
        every = pd.concat(self.partitions, ignore_index=True)
        return every[every["id"].astype(str).str.startswith(CANARY_PREFIX)].reset_index(drop=True)

    def skipped_summary(self) -> str:
        """', N ties skipped, M bad rows skipped' (what the data summary lines add), or ''."""
        ties = sum(1 for s in self.skipped if s.get("tie"))
        bad = len(self.skipped) - ties
        return (f", {ties} ties skipped" if ties else "") + (f", {bad} bad rows skipped" if bad else "")

    @property
    def num_pairs(self) -> int:
        return sum(len(p) for p in self.partitions)

    def partition(self, stage: int) -> pd.DataFrame:
        return self.partitions[stage - 1]

    def truth(self) -> pd.DataFrame:
        return pd.concat(self.partitions, ignore_index=True)[["id", "chosen"]]


def label_epsilon_max(cfg: JobConfig) -> float | None:
    """The largest epsilon of the job's label-DP trials: the one draw serves them all."""
    eps = [e for m, e in cfg.trials() if m.labels == "randomized_response" and e is not None]
    return max(eps) if eps else None


def load_dataset(cfg: JobConfig) -> tuple[pd.DataFrame, list[dict], str]:
    """Every valid pair of the job's source (before ``data.num_pairs`` and the hold-out), the
    skipped rows, and a description of the source."""
    if cfg.is_embedded:
        from props_ray.reference import embedded_task

        task = embedded_task(cfg)
        pairs = task.preference_pairs(cfg.data.num_pairs or DEFAULT_EMBEDDED_PAIRS, cfg.seed)
        if cfg.audit.canaries:  # the audit's canaries are training data like any other pair
            canaries = task.canary_pairs(cfg.audit.canaries, cfg.seed, set(pairs["prompt"]))
            pairs = pd.concat([pairs, canaries], ignore_index=True)
        return pairs, [], "embedded"
    from props_ray.data.loaders import load_preferences

    loaded = load_preferences(cfg.data.source, format=cfg.data.format, split=cfg.data.split,
                              on_bad_row=cfg.data.on_bad_row)
    for s in [s for s in loaded.skipped if not s.get("tie")][:20]:
        log.warning("skipped row %s (id %s): %s", s.get("row"), s.get("id"), s.get("reason"))
    return loaded.pairs, loaded.skipped, f"{loaded.source} ({loaded.format})"


def prepare_data(cfg: JobConfig) -> PreparedData:
    dataset, skipped, source = load_dataset(cfg)
    ledger = Ledger.open(cfg.output_dir, dataset, source=source, secure=cfg.secure_randomness, seed=cfg.seed)
    pairs = dataset
    if not cfg.is_embedded and cfg.data.num_pairs is not None:
        pairs = pairs.head(cfg.data.num_pairs).reset_index(drop=True)
    canary_prompts = (set(pairs.loc[pairs["id"].astype(str).str.startswith(CANARY_PREFIX), "prompt"])
                      if cfg.audit.canaries else set())
    pairs, eval_prompts = hold_out(pairs, cfg.data.eval_prompts, ledger.partition_key, cfg.seed, canary_prompts)
    partitions = split_partitions(pairs, cfg.stages, ledger.partition_key, cfg.seed, cfg.data.stage_proportions)
    n = sum(len(p) for p in partitions)
    from props_ray.privacy.accounting import resolve_delta
    from props_ray.privacy.histogram import histogram_alone_epsilon

    if any(m.method == "dpsgd" for m in cfg.methods):
        resolve_delta(cfg.privacy.dpsgd.delta, n)  # delta >= 1/N is refused here, before anything is spent
    synthetic = [(m, eps) for m, eps in cfg.trials() if m.method == "synthetic_instructions" and eps is not None]
    if synthetic:  # a histogram that alone spends a trial's epsilon: refused before any trial runs
        delta = resolve_delta(cfg.privacy.dpsgd.delta, n)
        for m, eps in synthetic:
            histogram_alone_epsilon(m.display_name, m.histogram_sigma, eps, delta, cfg.privacy.dpsgd.accountant)
    action = ledger.plan(label_epsilon_max(cfg), cfg.privacy.accept_new_draw)
    return PreparedData(dataset, partitions, eval_prompts, skipped, source, ledger, action)
