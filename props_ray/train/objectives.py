"""What the training loop minimises per privacy unit: DPO against the reference, the reward model's
Bradley--Terry loss, or a language model's next-token loss.

DPO sees a batch of pairs as one row per pair (the prompt shared) where it can, and Bradley--Terry as
one forward of 2B rows (chosen rows first); both run through either engine (data-parallel or DP-SGD with the
pair as the privacy unit), and each returns the per-pair loss and the per-pair margin the loop logs
(DPO: beta times the implicit reward margin; Bradley--Terry: the reward difference), whose sign is the
pair's accuracy. The language model (the synthetic-instruction generator) sees one row per example,
the example as the unit, and returns the per-example loss and no margin.
"""

from __future__ import annotations

import torch

from props_ray.dpo.logprobs import pair_logprobs
from props_ray.dpo.losses import dpo_loss, implicit_reward_margin

OBJECTIVES = ("dpo", "bradley_terry", "language_model")
#: the DP-SGD unit of each objective (one clipped gradient sample) and the shard columns it reads
UNITS = {"dpo": ("pair", None), "bradley_terry": ("pair", None),
         "language_model": ("row", ("input_ids", "attention_mask", "loss_mask"))}


class ReferenceLogprobs:
    """The reference's log-probs of each pair, computed the first time a batch brings the pair and
    reused on its later passes: the reference is frozen for the whole training run, so from the second
    epoch on a batch whose pairs have all been seen skips the reference forward (TRL's
    ``precompute_ref_log_probs``, without a pass of its own). Kept in this worker's memory only.

    A pair's key digests its tokens and masks up to its last real token, so the same pair padded to a
    different width is the same key, and a different prompt/response split is not."""

    def __init__(self, reference):
        self.reference = reference
        self.values: dict[bytes, tuple[float, float]] = {}
        self.dtype: torch.dtype | None = None  # the reference's log-prob dtype (float32, or float64)

    def __call__(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        keys = pair_keys(batch)
        known = [self.values.get(k) for k in keys]
        if keys and self.dtype is not None and all(v is not None for v in known):
            both = torch.tensor(known, dtype=self.dtype, device=batch["chosen_input_ids"].device)
            return both[:, 0], both[:, 1]
        ref_c, ref_r = self.reference.pair_logprobs(batch)
        self.dtype = ref_c.dtype
        for k, c, r in zip(keys, ref_c.tolist(), ref_r.tolist()):
            self.values[k] = (c, r)
        return ref_c, ref_r


def pair_keys(batch) -> list[bytes]:
    """One 16-byte digest per pair: of its chosen row, then its rejected row, each's length, token ids,
    loss mask and attention mask up to its last real token."""
    import hashlib

    digests = [hashlib.blake2b(digest_size=16) for _ in range(batch["chosen_input_ids"].shape[0])]
    for side in ("chosen", "rejected"):
        att = batch[f"{side}_attention_mask"].cpu()
        ids = batch[f"{side}_input_ids"].cpu().numpy()
        masks = torch.stack([batch[f"{side}_loss_mask"].cpu(), att], 1).to(torch.uint8).numpy()
        lengths = ((att.cumsum(1) * att).argmax(1) + 1).tolist()  # past the last real token
        for h, row, mask, n in zip(digests, ids, masks, lengths):
            h.update(n.to_bytes(8, "little"))
            h.update(row[:n].tobytes())
            h.update(mask[:, :n].tobytes())
    return [h.digest() for h in digests]


class DPO:
    has_margin = True

    def __init__(self, reference, loss: str, beta: float, flip_rate: float | None):
        self.reference, self.loss, self.beta, self.flip_rate = reference, loss, beta, flip_rate
        self.reference_logprobs = ReferenceLogprobs(reference)

    def __call__(self, model, batch) -> tuple[torch.Tensor, torch.Tensor]:
        ref_c, ref_r = self.reference_logprobs(batch)
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
