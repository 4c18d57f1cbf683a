"""The GPU section's arithmetic (FLOPs, MFU) and plumbing, run on the CPU with the tiny model."""

import pytest
import torch

from props_ray.bench import gpu
from props_ray.bench.dp_overhead import PYTHIA, pythia_config


def test_matmul_weights_equal_the_linear_weights_of_a_built_model():
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    cfg = GPTNeoXConfig(vocab_size=97, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=80, rotary_pct=0.25, tie_word_embeddings=False)
    model = GPTNeoXForCausalLM(cfg)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert gpu.matmul_weights(cfg) == linear


def test_pythia_1b_architecture_has_pythia_1b_size():
    cfg = pythia_config("pythia-1b-arch")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.intermediate_size) == PYTHIA[
        "pythia-1b-arch"]
    # 16 x (4 d^2 + 2 d * 4d) + d * vocab with d = 2048: about 0.91 B matmul weights (+ 0.10 B embeddings)
    assert gpu.matmul_weights(cfg) == 16 * (4 * 2048 ** 2 + 2 * 2048 * 8192) + 2048 * 50304
    blocks, head = 16 * (4 * 2048 ** 2 + 2 * 2048 * 8192), 2048 * 50304
    # 2B rows of 512 tokens, the head over the 257 positions that predict the 256 response tokens
    rows = 16 * 512 * (2 * blocks + 4 * 16 * 512 * 2048) + 2 * head * 16 * 257
    # one row per pair: 256 prompt + 2 x 256 response tokens, the head over 2 x 256 + 1 positions
    shared = 8 * 768 * (2 * blocks + 4 * 16 * 768 * 2048) + 2 * head * 8 * 513
    assert gpu.layout_forward_flops(cfg, 8, 512, shared_prompt=False) == rows
    assert gpu.layout_forward_flops(cfg, 8, 512, shared_prompt=True) == shared
    assert gpu.step_flops(cfg, pairs=8, length=512, mode="nonprivate") == 3 * shared
    assert gpu.step_flops(cfg, pairs=8, length=512, mode="dpsgd") == 3 * shared  # DP-SGD shares the prompt too
    with pytest.raises(ValueError, match="mode"):
        gpu.step_flops(cfg, pairs=8, length=512, mode="dp")
    assert 0.75 < shared / rows < 0.80  # a quarter of the block tokens saved; attention over longer rows


def test_peak_lookup_prefers_the_specific_variant():
    assert gpu.peak_tflops("NVIDIA H100 80GB HBM3") == pytest.approx(989.4)
    assert gpu.peak_tflops("NVIDIA H100 PCIe") == pytest.approx(756.0)
    assert gpu.peak_tflops("NVIDIA H200") == pytest.approx(989.4)
    assert gpu.peak_tflops("Some Other GPU") is None


def test_without_cuda_the_section_says_it_is_skipped(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    out = gpu.measure()
    assert out == {"skipped": "no CUDA device"}
    assert "skipped" in gpu.format_lines(out)[0]


def test_figures_are_consistent_on_the_tiny_model_on_cpu():
    g = gpu.measure("tiny", batch=4, length=16, steps=2, warmup=1, dtype="float32", peak=1.0, require_cuda=False)
    for m in ("nonprivate", "dpsgd"):
        r = g[m]
        assert r["step_ms"] > 0 and r["peak_memory_mib"] > 0
        assert r["pairs_per_s"] == pytest.approx(4 / (r["step_ms"] / 1e3))
        assert r["tokens_per_s"] == pytest.approx(r["pairs_per_s"] * 2 * 16)
        assert r["mfu"] == pytest.approx(g["flops_per_step"][m] / (r["step_ms"] / 1e3) / 1e12)
    assert g["time_ratio"] == pytest.approx(g["dpsgd"]["step_ms"] / g["nonprivate"]["step_ms"])
    assert len(gpu.format_lines(g)) == 4
