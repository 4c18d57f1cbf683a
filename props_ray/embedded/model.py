"""A tiny Pythia-architecture (GPT-NeoX) model and a word-level tokenizer, built locally.

Nothing here touches a model hub: the tokenizer is built from the embedded
task's vocabulary with the ``tokenizers`` library and the model from a
``GPTNeoXConfig``, so both save and load with the usual
``from_pretrained`` calls.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import GPTNeoXConfig, GPTNeoXForCausalLM, PreTrainedTokenizerFast

from props_ray.embedded.task import EmbeddedTask


def build_tokenizer(task: EmbeddedTask) -> PreTrainedTokenizerFast:
    vocab = {tok: i for i, tok in enumerate(task.vocabulary)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="<eos>",
                                  unk_token="<unk>", clean_up_tokenization_spaces=False)
    tok.padding_side = "right"
    return tok


def build_tiny_model(vocab_size: int, hidden_size: int = 64, num_layers: int = 2, num_heads: int = 4,
                     max_positions: int = 64, seed: int = 0) -> GPTNeoXForCausalLM:
    """A randomly initialised GPT-NeoX model of the given (tiny) size."""
    import torch

    config = GPTNeoXConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=4 * hidden_size,
        max_position_embeddings=max_positions,
        rotary_pct=0.25,
        use_parallel_residual=True,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=1,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return GPTNeoXForCausalLM(config)
