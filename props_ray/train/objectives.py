"""What the training loop minimises per privacy unit: DPO against the reference, the reward model's
Bradley--Terry loss, or a language model's next-token loss.

DPO sees a batch of pairs as one row per pair (the prompt shared) where it can, and Bradley--Terry as
one forward of 2B rows (chosen rows first); both run through either engine (DDP or DP-SGD with the pair as the privacy unit); each returns the per-pair
loss and the per-pair margin the loop logs (DPO: beta times the implicit reward margin;
Bradley--Terry: the reward difference), whose sign is the pair's accuracy. The language model
(the synthetic-instruction generator) sees one row per example, the example as the unit, and returns
the per-example loss and no margin.
"""

from __future__ import annotations

import torch

from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import dpo_loss, implicit_reward_margin

OBJECTIVES = ("dpo", "bradley_terry", "language_model")
#: the DP-SGD unit of each objective (one clipped gradient sample) and the shard columns it reads
UNITS = {"dpo": ("pair", None), "bradley_terry": ("pair", None),
         "language_model": ("row", ("input_ids", "attention_mask", "loss_mask"))}


class DPO:
    has_margin = True

    def __init__(self, reference, loss: str, beta: float, flip_rate: float | None):
        self.reference, self.loss, self.beta, self.flip_rate = reference, loss, beta, flip_rate

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ref_c, ref_r = self.reference.pair_logprobs(batch)
        pol_c, pol_r = pair_logprobs(model, batch, share_prompt=True)  # one row per pair
        margin = implicit_reward_margin(pol_c, pol_r, ref_c, ref_r)
        per_pair = dpo_loss(self.loss, margin, self.beta, flip_rate=self.flip_rate, confidence=batch.get("confidence"))
        return per_pair, self.beta * margin


class LanguageModel:
    """The mean next-token loss of each row over its ``loss_mask`` tokens."""

    has_margin = False

    def __call__(self, model, batch) -> tuple[torch.Tensor, None]:
        ids = batch["input_ids"]
        logits = model(input_ids=ids, attention_mask=batch["attention_mask"]).logits[:, :-1].float()
        mask = batch["loss_mask"][:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), ids[:, 1:], reduction="none")
        return (nll * mask).sum(1) / mask.sum(1).clamp(min=1.0), None


class BradleyTerry:
    has_margin = True

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        from props_ray.reward_model import bradley_terry_loss, pair_rewards

        chosen, rejected = pair_rewards(model, batch)
        return bradley_terry_loss(chosen, rejected), chosen - rejected


def build(objective: str, cfg, base_path: str, adapter: str | None, device, loop_config: dict):
    """(the trained model, its objective) for the loop; ``objective`` is one of :data:`OBJECTIVES`."""
    from props_ray.modeling import Reference, build_policy

    if objective == "bradley_terry":
        from props_ray.reward_model import build_reward_model

        return build_reward_model(base_path, cfg.model, adapter_path=adapter, device=device), BradleyTerry()
    if objective == "language_model":
        return build_policy(base_path, cfg.model, adapter_path=adapter, device=device), LanguageModel()
    if objective != "dpo":
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    policy = build_policy(base_path, cfg.model, adapter_path=adapter, device=device)
    reference = Reference.for_policy(policy, cfg.model, base_path, device)
    return policy, DPO(reference, loop_config["loss"], cfg.train.beta, loop_config.get("flip_rate"))
