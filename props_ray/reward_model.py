"""The reward model: a scalar head on the base model, trained with the Bradley--Terry loss on preference pairs.

r(prompt, response) is the head's output at the response's last token. For a pair,
P(chosen preferred) = sigmoid(r_chosen - r_rejected), so the per-pair loss is
-log sigmoid(r_chosen - r_rejected) (:func:`bradley_terry_loss`). A batch of B pairs is one forward of
2B rows (chosen rows first: DPO's fallback layout), so DP-SGD's per-pair gradient samples and clipping
(:mod:`props_ray.dpsgd`) apply unchanged with the pair as the privacy unit: the DP reward model of
DP-RLHF (arXiv 2310.16960) is this model trained through the DP-SGD engine.

Non-private, the same model is a judge for real data: :func:`export_reward_model` writes a directory
that ``eval.judge`` (``AutoModelForSequenceClassification``) loads. It scores ``prompt response`` text,
so the training rows drop the trailing end-of-sequence token the pair tokenizer appends: the model is
trained on exactly what the judge will read.
"""

from __future__ import annotations

from pathlib import Path

import torch

from props_ray.config import ModelConfig
from props_ray.modeling import load_tokenizer, lora_targets

#: The scalar head's module name in transformers' sequence-classification models (GPT-NeoX, GPT-2, Llama).
HEAD = "score"


def build_reward_model(base_path: str, cfg: ModelConfig, adapter_path: str | None = None,
                       device: torch.device | str = "cpu", trainable: bool = True):
    """The base with a new scalar head and a (new or loaded) LoRA adapter; the head is trained in full."""
    from transformers import AutoModelForSequenceClassification

    tok = load_tokenizer(cfg.tokenizer or base_path)
    source = adapter_path if (adapter_path and not cfg.lora.enabled) else base_path
    model = AutoModelForSequenceClassification.from_pretrained(source, num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    if cfg.lora.enabled:
        from peft import LoraConfig, PeftModel, get_peft_model

        if adapter_path:
            model = PeftModel.from_pretrained(model, adapter_path, is_trainable=trainable)
        else:
            targets = [t for t in lora_targets(model, cfg) if t != "lm_head"]  # no LM head here
            model = get_peft_model(model, LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                                     lora_dropout=cfg.lora.dropout, target_modules=targets,
                                                     modules_to_save=[HEAD], task_type="SEQ_CLS"))
    return model.to(device).train(trainable)


def _without_final_eos(ids: torch.Tensor, att: torch.Tensor, eos: int | None, pad: int):
    """Drop each row's trailing end-of-sequence token (the judge scores text without it)."""
    if eos is None or eos == pad:
        return ids, att
    rows = torch.arange(ids.shape[0], device=ids.device)
    last = att.sum(1) - 1
    ends = ids[rows, last] == eos
    ids, att = ids.clone(), att.clone()
    ids[rows, last] = torch.where(ends, torch.full_like(last, pad), ids[rows, last])
    att[rows, last] = torch.where(ends, torch.zeros_like(last), att[rows, last])
    return ids, att


def _config(model):
    """The transformers config under any wrapper (DDP's ``module``, Opacus's ``_module``)."""
    while not hasattr(model, "config") or not hasattr(model.config, "pad_token_id"):
        model = getattr(model, "module", None) or getattr(model, "_module")
    return model.config


def pair_rewards(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Rewards of the chosen and rejected responses of a batch of pairs, in one forward of 2B rows."""
    config = _config(model)
    n = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    ids, att = _without_final_eos(ids, att, config.eos_token_id, config.pad_token_id)
    rewards = model(input_ids=ids, attention_mask=att).logits[:, 0].float()
    return rewards[:n], rewards[n:]


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> torch.Tensor:
    """Per-pair -log P(chosen preferred) = -log sigmoid(r_chosen - r_rejected)."""
    return -torch.nn.functional.logsigmoid(chosen - rejected)


def export_reward_model(base_path: str, cfg: ModelConfig, adapter_path: str, out: str | Path) -> Path:
    """A full model directory (adapter merged, tokenizer beside it) that ``eval.judge`` accepts."""
    model = build_reward_model(base_path, cfg, adapter_path, trainable=False)
    if cfg.lora.enabled:
        model = model.merge_and_unload()
    out = Path(out)
    model.save_pretrained(str(out))
    load_tokenizer(cfg.tokenizer or base_path).save_pretrained(str(out))
    return out

