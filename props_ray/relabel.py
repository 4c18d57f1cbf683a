"""Relabel a partition with the previous stage's model, by Ray Data batch inference.

``StageScorer`` is a callable class for ``Dataset.map_batches`` (run by
:func:`props_ray.batch_inference.map_with_model`): each actor, or each pooled
worker process on CPUs, loads the stage checkpoint once and scores batches of pairs with the DPO
implicit reward margin

    beta * [(log pi - log pi_ref)(chosen) - (log pi - log pi_ref)(rejected)],

in the pair's privatized orientation. The margins of the whole partition then
go to :func:`props_ray.privacy.label_combination.combine_labels`, which needs a
partition-wide statistic (the model's disagreement rate), and the combined
labels are applied by :func:`apply_combination`.
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from props_ray.config import ModelConfig
from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import implicit_reward_margin
from props_ray.data.records import orient
from props_ray.dpo.tokenize import PAIR_TENSORS
from props_ray.privacy.label_combination import Combination, combine_labels


class StageScorer:
    def __init__(self, base_path: str, adapter_path: str, model_cfg: dict, beta: float, use_gpu: bool = False,
                 timing: bool = False):
        from props_ray.modeling import Reference, build_policy

        self.timing, self.created = timing, time.time()
        torch.set_num_threads(1)
        cfg = ModelConfig.model_validate(model_cfg)
        self.device = torch.device("cuda" if use_gpu and torch.cuda.is_available() else "cpu")
        self.policy = build_policy(base_path, cfg, adapter_path=adapter_path, device=self.device,
                                   trainable=False).eval()
        self.reference = Reference.for_policy(self.policy, cfg, base_path, self.device)
        self.beta = beta
        self.init_seconds = time.time() - self.created

    @torch.no_grad()
    def __call__(self, batch: dict) -> dict:
        start = time.time()
        tensors = {k: torch.as_tensor(np.require(batch[k], requirements="W"), device=self.device) for k in PAIR_TENSORS}
        pol_c, pol_r = pair_logprobs(self.policy, tensors, share_prompt=True)
        ref_c, ref_r = self.reference.pair_logprobs(tensors)
        margin = self.beta * implicit_reward_margin(pol_c, pol_r, ref_c, ref_r)
        out = {"id": batch["id"], "margin": margin.float().cpu().numpy()}
        if self.timing:  # for the bench: when this actor started, took to load, and scored this batch
            n = len(out["margin"])
            out.update(actor_created=np.full(n, self.created), actor_init_seconds=np.full(n, self.init_seconds),
                       batch_start=np.full(n, start), batch_end=np.full(n, time.time()))
        return out


def score_partition(tokenized, *, base_path: str, adapter_path: str, model_cfg: ModelConfig, beta: float,
                    num_actors: int = 1, use_gpu: bool = False, batch_size: int = 128,
                    timing: bool = False, compute: str = "auto") -> pd.DataFrame:
    """Margins {id, margin} of every pair of a tokenized Ray Dataset (which must keep ``id``);
    ``timing`` adds each batch's timestamps (see :class:`StageScorer`). ``compute``: see
    :mod:`props_ray.batch_inference` (``auto``: an actor pool on GPUs, model-caching tasks on CPUs)."""
    from props_ray.batch_inference import map_with_model

    return map_with_model(tokenized, StageScorer,
                          {"base_path": base_path, "adapter_path": adapter_path, "model_cfg": model_cfg.model_dump(),
                           "beta": beta, "use_gpu": use_gpu, "timing": timing},
                          batch_size=batch_size, workers=num_actors, use_gpu=use_gpu, compute=compute).to_pandas()


def apply_combination(privatized: pd.DataFrame, margins: pd.DataFrame, epsilon: float,
                      rule: str, **options) -> tuple[pd.DataFrame, Combination]:
    """Combined labels for a privatized partition.

    Returns {id, prompt, chosen, rejected, confidence} where ``chosen`` is the
    response the combination prefers and ``confidence`` the probability it is
    truly preferred (at least 1/2; the hard loss ignores it).
    """
    merged = privatized.merge(margins[["id", "margin"]], on="id", how="left", validate="one_to_one")
    if merged["margin"].isna().any():
        missing = merged.loc[merged["margin"].isna(), "id"].head(3).tolist()
        raise RuntimeError(f"relabel produced no margin for pairs {missing}")
    comb = combine_labels(merged["margin"].to_numpy(), epsilon, rule, **options)
    flip = comb.flipped
    out = orient(merged, ~flip)
    conf = np.where(flip, 1.0 - comb.confidence, comb.confidence)
    out["confidence"] = conf.astype(np.float32)
    return out, comb
