"""`props-ray bench --quick` end to end (CI prints its figures; timings are never pass/fail), and the
arithmetic its figures rest on."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from props_ray.bench.relabel import _busy, _steady
from props_ray.bench.throughput import steady_state

REPO = Path(__file__).resolve().parents[1]


def test_steady_state_skips_the_warmup_epoch():
    epochs = [{"epoch": 0, "epoch_seconds": 10.0}, {"epoch": 1, "epoch_seconds": 2.0},
              {"epoch": 2, "epoch_seconds": 3.0}]
    out = steady_state(epochs, pairs=100)
    assert out["pairs_per_s"] == pytest.approx(200 / 5.0)
    assert out["warmup_epoch_seconds"] == 10.0 and out["timed_epochs"] == 2
    with pytest.raises(ValueError, match="at least 2 epochs"):
        steady_state(epochs[:1], pairs=100)


def test_relabel_steady_rate_excludes_the_first_batch():
    starts = np.array([5.0, 0.0, 2.0])  # out of order, as Ray Data may return them
    ends = np.array([6.0, 1.0, 3.0])
    sizes = np.array([10, 10, 30])  # sizes by batch: the first batch (start 0) is 10 pairs
    assert _steady(starts, ends, sizes) == pytest.approx((30 + 10) / (6.0 - 1.0))


def test_relabel_busy_share_counts_the_scoring_after_the_first_batch():
    starts = np.array([5.0, 0.0, 2.0])  # the scorer ran 0-1 (first, not counted), 2-3 and 5-6
    ends = np.array([6.0, 1.0, 3.0])
    assert _busy(starts, ends) == pytest.approx((1.0 + 1.0) / (6.0 - 1.0))
    assert _busy(np.array([0.0, 1.0]), np.array([1.0, 2.0])) == pytest.approx(1.0)  # back to back: no hand-over


def test_bench_quick_runs_and_reports_every_figure(tmp_path, capsys):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "props_ray.cli", "bench", "--quick", "--json", str(out),
                           "--output-dir", str(tmp_path / "bench")], cwd=REPO, capture_output=True, text=True,
                          timeout=1800)
    table = proc.stdout[proc.stdout.find("props-ray bench"):]
    with capsys.disabled():  # the figures go to the CI log
        print("\n" + table)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    s = report["sections"]
    assert set(s) == {"demo", "throughput", "dp_overhead", "relabel", "ppo", "synthetic", "gpu"}
    if s["gpu"].get("skipped"):  # CI has no GPU: the section says so instead of pretending
        assert "gpu: skipped (no CUDA device)" in table

    assert s["throughput"]["props_ray"]["pairs_per_s"] > 0
    if "missing" in s["throughput"]["trl"]:
        assert "TRL is not installed" in proc.stdout
    else:
        assert s["throughput"]["ratio"] == pytest.approx(
            s["throughput"]["props_ray"]["pairs_per_s"] / s["throughput"]["trl"]["pairs_per_s"])
        assert s["throughput"]["ratio_precomputed"] == pytest.approx(
            s["throughput"]["props_ray"]["pairs_per_s"] / s["throughput"]["trl_precomputed"]["pairs_per_s"])
        assert "against TRL with precompute_ref_log_probs" in table
    d = s["dp_overhead"]
    assert d["dpsgd_step_ms"] > 0 and d["nonprivate_step_ms"] > 0 and d["memory_ratio"] > 0
    r = s["relabel"]
    assert r["max_margin_difference"] < 1e-5  # both paths computed the same scores
    assert r["ray_data_pairs_per_s"] > 0 and r["plain_loop_pairs_per_s"] > 0 and r["actor_startup_s"] > 0
    # loops and pools alternate; the table's round is the median one, its loop figure the mean of its brackets
    loops, pools = r["plain_loop_runs_pairs_per_s"], r["ray_data_runs_pairs_per_s"]
    assert len(loops) == len(pools) + 1 == r["rounds"] + 1 and r["rounds"] >= 3
    assert r["round_ratios"] == pytest.approx([p / ((a + b) / 2) for p, a, b in zip(pools, loops, loops[1:])])
    i = pools.index(r["ray_data_pairs_per_s"])
    assert r["plain_loop_pairs_per_s"] == pytest.approx((loops[i] + loops[i + 1]) / 2)
    assert r["ratio"] == pytest.approx(r["ray_data_pairs_per_s"] / r["plain_loop_pairs_per_s"])
    assert r["ratio"] == sorted(r["round_ratios"])[(r["rounds"] - 1) // 2]
    assert 0 < r["actor_busy_share"] <= 1
    assert 0 < r["tasks_startup_next_s"] < r["tasks_wall_next_s"]
    p = s["ppo"]
    assert p["worker_sequences_per_s"] > 0 and p["ray_data_sequences_per_s"] > 0
    assert p["ratio"] == pytest.approx(p["ray_data_step_s"] / p["worker_step_s"])
    y = s["synthetic"]
    assert y["samples_per_s"] == pytest.approx(y["samples"] / y["steady_s"]) and y["nonempty"] > 0
    demo = s["demo"]
    assert set(demo["trials"]) == {"props-mle-eps0.5"}  # --quick: PROPS alone, K = 2
    assert demo["trials"]["props-mle-eps0.5"]["relabel"] > 0 and demo["trials"]["props-mle-eps0.5"]["train"] > 0
    assert all(0.0 <= v["win_rate"] <= 1.0 for v in demo["results"].values())
    for line in ("DPO training throughput", "DP-SGD step time", "Relabel throughput", "PPO rollouts", "Generator samples/s", "Demo wall time"):
        assert line in table


def test_long_pairs_are_the_same_token_rows_in_both_trainers(tmp_path):
    """The 160M throughput comparison's fairness: every row is exactly prompt + response tokens in
    props-ray's tokenization, and TRL's (prompt, then prompt + completion + eos, no special tokens added)
    gives the same ids, so neither trainer pads, truncates or sees other tokens."""
    from props_ray.bench.throughput import _as_completions, long_pairs
    from props_ray.config import JobConfig
    from props_ray.dpo.tokenize import tokenize_pairs
    from props_ray.embedded.model import build_tokenizer
    from props_ray.modeling import load_tokenizer
    from props_ray.reference import embedded_task

    build_tokenizer(embedded_task(JobConfig(name="t", methods=[{"method": "rr"}]))).save_pretrained(tmp_path)
    pairs = long_pairs(str(tmp_path), 6, 64, 64)
    tok = load_tokenizer(str(tmp_path))
    arr = tokenize_pairs(tok, pairs.prompt, pairs.chosen, pairs.rejected, 64, 64)
    trl = _as_completions(pairs)
    for side in ("chosen", "rejected"):
        assert (arr[f"{side}_attention_mask"].sum(1) == 128).all()
        assert (arr[f"{side}_loss_mask"].sum(1) == 64).all()
        for i in range(len(pairs)):
            prompt = tok(trl.prompt[i], add_special_tokens=False).input_ids
            full = tok(trl.prompt[i] + trl[side][i] + tok.eos_token, add_special_tokens=False).input_ids
            assert full[:len(prompt)] == prompt and len(prompt) == 64
            assert full == arr[f"{side}_input_ids"][i].tolist()


def test_trl_trains_in_the_precision_and_checkpointing_props_ray_uses(tmp_path):
    """TRL's DPOConfig turns on bf16 autocast and activation checkpointing unless told otherwise; the
    comparison gives TRL props-ray's settings (float32 on the CPU, checkpointing only when configured),
    as its trainer applies them: the accelerator's mixed precision and the model's checkpointing."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from peft import LoraConfig
    from trl import DPOTrainer

    from props_ray.bench.throughput import bench_job, trl_args
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.modeling import load_base_model, load_tokenizer
    from props_ray.reference import embedded_task

    cfg = bench_job(str(tmp_path), 4, 2, 2, num_workers=1, cpus_per_worker=1)
    build_tokenizer(embedded_task(cfg)).save_pretrained(tmp_path / "base")
    tok = load_tokenizer(str(tmp_path / "base"))
    build_tiny_model(len(tok), hidden_size=16, num_layers=1, num_heads=2).save_pretrained(tmp_path / "base")
    data = Dataset.from_dict({"prompt": ["a"], "chosen": [" b"], "rejected": [" c"]})
    for checkpointing in (False, True):
        cfg.model.gradient_checkpointing = checkpointing
        args = trl_args(cfg, str(tmp_path / "trl"))
        assert (args.bf16, args.fp16, args.gradient_checkpointing) == (False, False, checkpointing)
        model = load_base_model(str(tmp_path / "base"), cfg.model)
        assert _checkpointing(model) is checkpointing  # props-ray's side, as configured
        trainer = DPOTrainer(model=model, args=args, processing_class=tok, train_dataset=data,
                             peft_config=LoraConfig(r=2, target_modules=["query_key_value"], task_type="CAUSAL_LM"))
        assert trainer.accelerator.mixed_precision == "no"
        assert _checkpointing(trainer.model.base_model.model) is checkpointing


def _checkpointing(model) -> bool:
    if hasattr(model, "activation_checkpointing_enable"):
        return model.is_activation_checkpointing
    return model.is_gradient_checkpointing  # transformers < 5.23's name


def test_the_dp_sgd_step_timed_by_the_bench_adds_its_noise(monkeypatch):
    """The overhead bench times the whole DP-SGD step: per-pair clipping and the Gaussian noise, at the
    fixed sigma = 1 (std sigma * C over every trainable parameter, once a step)."""
    import torch

    from props_ray.bench import dp_overhead
    from props_ray.dpsgd import engine

    draws = []
    real = engine.gaussian_noise

    def recording(std, reference, generator, secure):
        draws.append((std, reference.numel()))
        return real(std, reference, generator, secure)

    monkeypatch.setattr(engine, "gaussian_noise", recording)
    torch.manual_seed(0)
    step, trainable, _ = dp_overhead.make_step("tiny", "dpsgd", 4, 8, torch.device("cpu"))
    step()
    step()
    assert draws == [(1.0, trainable)] * 2


def test_the_kept_activations_count_runs_under_autocast_on_a_cpu():
    """``props_ray.bench.kept_for_backward`` counts what a training forward saves for its backward under autocast, on a CPU too: in
    bf16 the tiny model's DP-SGD forward keeps less than in float32, and about what the non-private one
    keeps (the per-pair capture keeps each adapted layer's input once)."""
    from props_ray.bench.kept_for_backward import measure_kept

    kept = {(mode, dtype): measure_kept("tiny", mode, 32, 16, dtype)["kept_mib"]
            for mode in ("nonprivate", "dpsgd") for dtype in ("float32", "bfloat16")}
    assert kept[("dpsgd", "bfloat16")] < 0.75 * kept[("dpsgd", "float32")]
    assert kept[("nonprivate", "bfloat16")] < 0.75 * kept[("nonprivate", "float32")]
    assert kept[("dpsgd", "bfloat16")] <= 1.05 * kept[("nonprivate", "bfloat16")]


def test_the_data_parallel_bench_steps_both_ways_on_two_gloo_processes():
    """``props_ray.bench.data_parallel`` runs the tiny step in DDP and through the engine's all-reduce on
    two real gloo processes, and reports each process's time a step (a failed process raises)."""
    from props_ray.bench.data_parallel import measure

    for mode in ("ddp", "engine"):
        ms = measure(mode, batch=2, steps=3)
        assert len(ms) == 2 and all(0 < m < 60_000 for m in ms), (mode, ms)
