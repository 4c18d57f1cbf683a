"""What the training loop minimises per pair: DPO against the reference, or the reward model's Bradley--Terry loss.

Both see a batch of pairs as one forward of 2B rows (chosen rows first), so both run through either
engine (DDP or DP-SGD with the pair as the privacy unit). Each returns the per-pair loss and the
per-pair margin the loop logs (DPO: beta times the implicit reward margin; Bradley--Terry: the
reward difference); its sign is the pair's accuracy.
"""

from __future__ import annotations

import torch

from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import dpo_loss, implicit_reward_margin

OBJECTIVES = ("dpo", "bradley_terry")


class DPO:
    def __init__(self, reference, loss: str, beta: float, flip_rate: float | None):
        self.reference, self.loss, self.beta, self.flip_rate = reference, loss, beta, flip_rate

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ref_c, ref_r = self.reference.pair_logprobs(batch)
        pol_c, pol_r = pair_logprobs(model, batch)
        margin = implicit_reward_margin(pol_c, pol_r, ref_c, ref_r)
        per_pair = dpo_loss(self.loss, margin, self.beta, flip_rate=self.flip_rate, confidence=batch.get("confidence"))
        return per_pair, self.beta * margin


class BradleyTerry:
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
    if objective != "dpo":
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    policy = build_policy(base_path, cfg.model, adapter_path=adapter, device=device)
    reference = Reference.for_policy(policy, cfg.model, base_path, device)
    return policy, DPO(reference, loop_config["loss"], cfg.train.beta, loop_config.get("flip_rate"))
