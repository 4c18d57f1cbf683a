"""Loading the base (reference) model, the tokenizer, LoRA adapters and stage checkpoints.

The DPO reference is the base model itself: with LoRA it is the policy with its
adapters disabled; with full fine-tuning it is a frozen copy.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from props_ray.config import ModelConfig
from props_ray.dpo.logprobs import pair_logprobs

# LoRA target modules per architecture (``config.model_type``).
LORA_TARGETS: dict[str, list[str]] = {
    "gpt_neox": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "mistral": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    "qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}

#: ``model.dtype`` -> the CUDA autocast dtype (float32 runs without autocast; weights stay float32).
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}


def lora_targets(model, cfg: ModelConfig) -> list[str]:
    if cfg.lora.target_modules:
        return list(cfg.lora.target_modules)
    if cfg.name == "embedded":
        # The embedded model is tiny: without adapting the output head too, DPO mostly moves
        # probability to tokens no response contains (measured: win rate 0.52 vs 1.0 with it).
        return LORA_TARGETS["gpt_neox"] + ["lm_head"]
    model_type = getattr(model.config, "model_type", None)
    if model_type not in LORA_TARGETS:
        raise ValueError(f"no default LoRA targets for architecture {model_type!r}; "
                         f"set model.lora.target_modules (known: {sorted(LORA_TARGETS)})")
    return LORA_TARGETS[model_type]


def load_tokenizer(path: str):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    return tok


def load_base_model(path: str, cfg: ModelConfig, device: torch.device | str = "cpu"):
    from transformers import AutoModelForCausalLM

    # Weights stay float32 (what DP-SGD and the optimizer want); bf16/fp16 is autocast on CUDA.
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if cfg.gradient_checkpointing:
        # transformers 5.23 renamed gradient_checkpointing_enable (kept, with a FutureWarning)
        getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
        model.config.use_cache = False
    return model.to(device)


def build_policy(base_path: str, cfg: ModelConfig, adapter_path: str | None = None,
                 device: torch.device | str = "cpu", trainable: bool = True):
    """The policy: the base model with a (new or loaded) LoRA adapter, or a full copy.

    ``adapter_path`` is a stage checkpoint's ``model`` directory: a PEFT
    adapter (loaded with ``PeftModel.from_pretrained``) or, with full
    fine-tuning, a whole model.
    """
    if not cfg.lora.enabled:
        return load_base_model(adapter_path or base_path, cfg, device).train(trainable)
    from peft import LoraConfig, PeftModel, get_peft_model

    base = load_base_model(base_path, cfg, device)
    if adapter_path:
        model = PeftModel.from_pretrained(base, adapter_path, is_trainable=trainable)
    else:
        lora = LoraConfig(r=cfg.lora.r, lora_alpha=cfg.lora.alpha, lora_dropout=cfg.lora.dropout,
                          target_modules=lora_targets(base, cfg), task_type="CAUSAL_LM")
        model = get_peft_model(base, lora)
    return model.train(trainable)


class Reference:
    """Computes reference log-probs: adapters disabled (LoRA) or a frozen copy (full fine-tuning)."""

    def __init__(self, policy, frozen=None):
        self.policy = policy
        self.frozen = frozen

    @classmethod
    def for_policy(cls, policy, cfg: ModelConfig, base_path: str, device="cpu") -> "Reference":
        if cfg.lora.enabled:
            return cls(policy)
        frozen = load_base_model(base_path, cfg, device).eval()
        for p in frozen.parameters():
            p.requires_grad_(False)
        return cls(policy, frozen)

    @torch.no_grad()
    def pair_logprobs(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        if self.frozen is not None:
            return pair_logprobs(self.frozen, batch, share_prompt=True)
        # The tuner's own switch, not ``PeftModel.disable_adapter()``, which first builds a status
        # report of every adapter layer (string reprs included): about 1 ms of a ~9.6 ms reference pass
        # on the embedded model (fastest of 600 passes: 9.6 -> 8.6 ms).
        with adapters_off(self.policy):
            return pair_logprobs(self.policy, batch, share_prompt=True)

    @torch.no_grad()
    def logits(self, input_ids, attention_mask) -> torch.Tensor:
        """The reference's next-token logits for a batch of sequences (PPO's KL penalty)."""
        if self.frozen is not None:
            return self.frozen(input_ids=input_ids, attention_mask=attention_mask).logits
        with adapters_off(self.policy):
            return self.policy(input_ids=input_ids, attention_mask=attention_mask).logits


@contextlib.contextmanager
def torch_threads(n: int):
    """torch's intra-op threads set to ``n`` within the block, restored after it."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@contextlib.contextmanager
def adapters_off(policy):
    """The LoRA policy as its reference for the block: adapters disabled (the tuner's own switch) and in
    eval mode; both restored after."""
    tuner = policy.base_model
    was_training = policy.training
    policy.eval()
    tuner.disable_adapter_layers()
    try:
        yield policy
    finally:
        tuner.enable_adapter_layers()
        policy.train(was_training)


def save_policy(policy, path: str | Path) -> None:
    """Adapters only for LoRA (``PeftModel.save_pretrained``), else the whole model."""
    policy = getattr(policy, "module", policy)
    if hasattr(policy, "peft_config"):  # LoRA on lm_head adds adapters; the base embeddings never change
        policy.save_pretrained(str(path), save_embedding_layers=False)
    else:
        policy.save_pretrained(str(path))


