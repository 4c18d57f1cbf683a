"""A model to start from with no model hub: a BPE tokenizer built on text and a small, randomly
initialised model of a named architecture (GPT-NeoX, GPT-2 or Llama), saved as a directory that every
``from_pretrained`` call (``model.name``, ``eval.judge``, ``props-ray sft``) loads.

Privacy: a tokenizer's vocabulary is a statistic of the text it is built from, and a rare word that
becomes a token is in the released model. :func:`build_tokenizer` therefore keeps only pieces seen at
least ``min_frequency`` times, and ``props-ray init-model`` builds it on the split that is kept apart
from the private preference partitions (the SFT split, or public text the user names), never on the
labels. It is not differentially private; the README says so.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path

ARCHITECTURES = ("gpt_neox", "gpt2", "llama")
SPECIAL_TOKENS = ("<pad>", "<eos>", "<unk>")


def build_tokenizer(texts: Iterable[str], vocab_size: int = 4096, min_frequency: int = 5):
    """A byte-level BPE tokenizer (GPT-2 style: any text encodes, nothing is unknown) trained on ``texts``,
    with <pad> and <eos> tokens, as a ``PreTrainedTokenizerFast``."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    core.train_from_iterator(texts, trainer=trainer)
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>",
                                  bos_token="<eos>", clean_up_tokenization_spaces=False)
    tok.padding_side = "right"
    return tok


def model_config(architecture: str, vocab_size: int, hidden_size: int = 128, num_layers: int = 2,
                 num_heads: int = 4, max_positions: int = 1024, pad_id: int = 0, eos_id: int = 1):
    """A transformers config of ``architecture`` at the given size (intermediate size 4x hidden)."""
    if architecture not in ARCHITECTURES:
        raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {architecture!r}")
    if hidden_size % num_heads:
        raise ValueError(f"hidden size {hidden_size} is not a multiple of the {num_heads} heads")
    common = {"vocab_size": vocab_size, "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": eos_id,
              "tie_word_embeddings": False}
    if architecture == "gpt_neox":
        from transformers import GPTNeoXConfig

        return GPTNeoXConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                             intermediate_size=4 * hidden_size, max_position_embeddings=max_positions,
                             rotary_pct=0.25, use_parallel_residual=True, **common)
    if architecture == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(n_embd=hidden_size, n_layer=num_layers, n_head=num_heads, n_positions=max_positions,
                          n_inner=4 * hidden_size, **common)
    from transformers import LlamaConfig

    return LlamaConfig(hidden_size=hidden_size, num_hidden_layers=num_layers, num_attention_heads=num_heads,
                       num_key_value_heads=num_heads, intermediate_size=4 * hidden_size,
                       max_position_embeddings=max_positions, **common)


def init_model(out: str | Path, texts: Iterable[str], architecture: str = "gpt_neox", vocab_size: int = 4096,
               min_frequency: int = 5, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
               max_positions: int = 1024, seed: int = 0) -> dict:
    """Build the tokenizer on ``texts`` and a random ``architecture`` model on it; save both to ``out``.
    Returns what was built (also written to ``out/init-model.json``)."""
    import torch
    from transformers import AutoModelForCausalLM

    tok = build_tokenizer(texts, vocab_size, min_frequency)
    config = model_config(architecture, len(tok), hidden_size, num_layers, num_heads, max_positions,
                          tok.pad_token_id, tok.eos_token_id)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    info = {"architecture": architecture, "vocab_size": len(tok), "hidden_size": hidden_size,
            "num_layers": num_layers, "num_heads": num_heads, "max_positions": max_positions,
            "parameters": sum(p.numel() for p in model.parameters()), "min_frequency": min_frequency,
            "seed": seed}
    (out / "init-model.json").write_text(json.dumps(info, indent=1))
    return info
