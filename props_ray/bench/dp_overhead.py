"""DP-SGD overhead: DP-SGD DPO step time and peak memory relative to a non-private DPO step.

    props-ray bench --only dp_overhead          (part of the bench table)
    python -m props_ray.bench.dp_overhead [--batch 32] [--steps 20] [--large-on-cpu]   (details)
    python -m props_ray.bench.dp_overhead --model pythia-160m-arch --batch 8 --length 128 --steps 3

Both modes run the same training step as ``props_ray.train.loop`` on the same
fixed batch of pairs: reference log-probs (LoRA disabled, no grad), policy
forward (one row per pair, the prompt shared, as the loop runs it), DPO loss,
backward, optimizer step (AdamW). The reference pass runs every step here (the
training loop reuses each pair's reference log-probs after the first epoch, which
would shrink both steps alike). The non-private step is ``StandardEngine``'s (mean
loss, global clipping at 1.0, without DDP since there is one process); the DP-SGD
step is ``DPSGDEngine``'s (per-layer hooks giving per-pair samples, per-pair
clipping, Gaussian noise, a fixed sigma so no calibration time is counted).

Time: both modes run in one subprocess on identical model copies with their
steps interleaved, so load from other processes slows both alike. Memory: each
(model, mode) runs alone in its own subprocess:

- CUDA: ``torch.cuda.max_memory_allocated``; the ratio of the peak over the
  memory held before the first step (model + data) is the "training" ratio, the
  ratio of the total peaks is also printed.
- CPU: resident set size (RSS) from ``/proc/self/status``: the peak (VmHWM, reset
  through ``/proc/self/clear_refs`` just before the first step) minus the RSS
  before the first step. tracemalloc is not used: it does not see PyTorch's
  tensor allocations.

Models: the embedded tiny GPT-NeoX (the demo's model, LoRA on attention, MLP and
lm_head); Pythia-160m- and -410m-architecture GPT-NeoXs (random init, LoRA r=8
on attention and MLP) only when CUDA is available, or on CPU with
``--large-on-cpu`` (410m) or ``--model`` (any, alone). Goals: time ratio <= 1.10
on the tiny model and <= 1.05 on the Pythia architectures, memory ratio <= 1.3
(printed, not asserted).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

from props_ray.bench.child import run_json_child

TIME_GOAL, MEMORY_GOAL = 1.10, 1.3
LARGE_TIME_GOAL = 1.05  # the step-time goal at the Pythia architectures (160M and up)


# --------------------------------------------------------------------------- one measurement (subprocess)

def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def _reset_peak_rss() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


# Pythia architectures (hidden, layers, heads, MLP width), from the Pythia suite's configs.
PYTHIA = {"pythia-160m-arch": (768, 12, 12, 3072), "pythia-410m-arch": (1024, 24, 16, 4096),
          "pythia-1b-arch": (2048, 16, 8, 8192)}


def pythia_config(name: str, vocab_size: int = 50304):
    from transformers import GPTNeoXConfig

    hidden, layers, heads, mlp = PYTHIA[name]
    return GPTNeoXConfig(vocab_size=vocab_size, hidden_size=hidden, num_hidden_layers=layers,
                         num_attention_heads=heads, intermediate_size=mlp, max_position_embeddings=2048,
                         rotary_pct=0.25, use_parallel_residual=True, tie_word_embeddings=False)


def build_model(name: str, weights: str = "float32"):
    """The bench model with a fresh LoRA adapter (r = 8). ``weights`` bfloat16/float16 stores the frozen base
    weights in that precision (the adapters stay float32); float32 is what jobs run today."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXForCausalLM

    from props_ray.config import JobConfig
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.modeling import LORA_TARGETS
    from props_ray.reference import embedded_task

    if name in PYTHIA:  # a Pythia architecture, random init
        torch.manual_seed(0)
        base = GPTNeoXForCausalLM(pythia_config(name))
        vocab = base.config.vocab_size
        targets = LORA_TARGETS["gpt_neox"]
    elif name == "tiny":
        cfg = JobConfig(name="bench", methods=[{"method": "dpsgd"}])
        vocab = len(build_tokenizer(embedded_task(cfg)))
        base = build_tiny_model(vocab, cfg.model.tiny.hidden_size, cfg.model.tiny.num_layers,
                                cfg.model.tiny.num_heads)
        targets = LORA_TARGETS["gpt_neox"] + ["lm_head"]
    else:
        raise ValueError(f"unknown bench model {name!r}: tiny or one of {sorted(PYTHIA)}")
    if weights != "float32":
        base = base.to(getattr(torch, weights))
    model = get_peft_model(base, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=targets,
                                            task_type="CAUSAL_LM"))
    for p in model.parameters():  # the trained adapters in float32 whatever the base's precision
        if p.requires_grad:
            p.data = p.data.float()
    return model, vocab


def make_batch(n: int, length: int, vocab: int, device):
    import torch

    from props_ray.dpo.tokenize import PAIR_TENSORS

    g = torch.Generator().manual_seed(1)
    out = {}
    for side in ("chosen", "rejected"):
        out[f"{side}_input_ids"] = torch.randint(2, vocab, (n, length), generator=g)
        out[f"{side}_attention_mask"] = torch.ones(n, length, dtype=torch.int64)
        mask = torch.zeros(n, length, dtype=torch.int64)
        mask[:, length // 2:] = 1
        out[f"{side}_loss_mask"] = mask
    out["rejected_input_ids"][:, :length // 2] = out["chosen_input_ids"][:, :length // 2]  # one prompt a pair
    out["confidence"] = torch.ones(n)
    assert set(PAIR_TENSORS) <= set(out)
    return {k: v.to(device) for k, v in out.items()}


def bench_engine(batch: int):
    """The bench's DP-SGD engine: C = 1 and a fixed sigma = 1 (no calibration), ``batch`` pairs a step."""
    from props_ray.dpsgd.engine import DPSGDEngine

    return DPSGDEngine(target_epsilon=None, delta=1e-5, max_grad_norm=1.0, expected_batch_size=batch, epochs=1,
                       noise_multiplier=1.0)


def make_step(model_name: str, mode: str, batch: int, length: int, device, dtype: str = "float32",
              weights: str = "float32"):
    """(step function returning (total seconds, reference-forward seconds), trainable count, total count).

    ``dtype`` bfloat16/float16: the forwards run under autocast on CUDA, as the training loop runs them
    with ``model.dtype`` set (weights stay float32)."""
    import torch

    from props_ray.dpo.logprobs import pair_logprobs
    from props_ray.dpo.losses import dpo_loss, implicit_reward_margin
    from props_ray.modeling import AUTOCAST_DTYPES, Reference

    torch.manual_seed(0)
    policy, vocab = build_model(model_name, weights)
    policy = policy.to(device).train()
    reference = Reference(policy)
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    data = make_batch(batch, length, vocab, device)

    if mode == "dpsgd":
        engine = bench_engine(batch)
        model, optimizer = engine.wrap(policy, optimizer)
        # start_stage without a shard to materialize: sigma fixed at 1 rather than calibrated
        engine.enter_stage(1, engine.accounting.plan(1, 10 * batch, batch, 1, None, 1.0))

        def backward_and_step(per_pair):
            engine.backward(per_pair)
            engine.step(model, optimizer)
    else:  # the training loop's own non-private step (DDP aside): mean loss, global clipping, AdamW
        from props_ray.train.engine import StandardEngine

        model, engine = policy, StandardEngine(batch, 1, 1.0, 0)

        def backward_and_step(per_pair):
            engine.backward(per_pair)
            engine.step(model, optimizer)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    amp = AUTOCAST_DTYPES.get(dtype)

    def autocast():
        return torch.autocast(device.type, dtype=amp, enabled=amp is not None and device.type == "cuda")

    def step():
        sync()
        t0 = time.perf_counter()
        with autocast():
            ref_c, ref_r = reference.pair_logprobs(data)
        sync()
        t1 = time.perf_counter()
        with autocast():
            pol_c, pol_r = pair_logprobs(model, data, share_prompt=True)  # as the loop does
        per_pair = dpo_loss("sigmoid", implicit_reward_margin(pol_c, pol_r, ref_c, ref_r), 0.1)
        backward_and_step(per_pair)
        sync()
        return time.perf_counter() - t0, t1 - t0

    return step, sum(p.numel() for p in params), sum(p.numel() for p in policy.parameters())


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_memory(model_name: str, mode: str, batch: int, length: int, steps: int, warmup: int,
                   dtype: str = "float32", weights: str = "float32") -> dict:
    """Peak memory of one mode alone in this process (see the module docstring)."""
    import gc

    import torch

    device = _device()
    step, trainable, total = make_step(model_name, mode, batch, length, device, dtype, weights)
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() / 2**20
    else:
        _reset_peak_rss()
        base = _rss_kib("VmRSS") / 1024
    for _ in range(warmup + steps):
        step()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else _rss_kib("VmHWM") / 1024
    return {"base_mib": base, "peak_mib": peak, "delta_mib": peak - base, "trainable": trainable,
            "total_params": total, "device": device.type}


def measure_time(model_name: str, batch: int, length: int, steps: int, warmup: int, dtype: str = "float32",
                 weights: str = "float32") -> dict:
    """Both modes in one process on identical model copies, steps interleaved (alternating which goes
    first), so a busy machine slows both alike; medians of per-step times."""
    device = _device()
    steps_fn = {m: make_step(model_name, m, batch, length, device, dtype, weights)[0] for m in ("nonprivate", "dpsgd")}
    times: dict = {m: [] for m in steps_fn}
    for i in range(warmup + steps):
        order = ("nonprivate", "dpsgd") if i % 2 == 0 else ("dpsgd", "nonprivate")
        for m in order:
            t = steps_fn[m]()
            if i >= warmup:
                times[m].append(t)
    out = {}
    for m, ts in times.items():
        out[m] = {"step_s": statistics.median(t for t, _ in ts), "policy_s": statistics.median(t - r for t, r in ts)}
    out["per_step_ratio"] = statistics.median(d[0] / n[0] for d, n in zip(times["dpsgd"], times["nonprivate"]))
    return out


# --------------------------------------------------------------------------- driver

def run_child(args, what: str, model: str, mode: str, batch: int, length: int, steps: int, warmup: int,
              dtype: str = "float32", weights: str = "float32") -> dict:
    """One measurement in a fresh subprocess (``args.threads`` torch threads)."""
    return run_json_child("props_ray.bench.dp_overhead", "--child", what, model, mode, "--batch", str(batch),
                          "--length", str(length), "--steps", str(steps), "--warmup", str(warmup),
                          "--threads", str(args.threads), "--dtype", dtype, "--weights", weights)


def measure(model: str = "tiny", batch: int = 32, length: int = 16, steps: int = 20, warmup: int = 3,
            threads: int = 1) -> dict:
    """Step-time and peak-memory ratios DP-SGD / non-private for one model (for ``props-ray bench``)."""
    args = argparse.Namespace(threads=threads)
    t = run_child(args, "time", model, "both", batch, length, steps, warmup)
    mem = {m: run_child(args, "memory", model, m, batch, length, min(steps, 5), warmup) for m in ("nonprivate", "dpsgd")}
    return {"model": model, "pairs_per_step": batch, "tokens_per_row": length, "timed_steps": steps,
            "threads": threads, "device": mem["dpsgd"]["device"],
            "nonprivate_step_ms": t["nonprivate"]["step_s"] * 1e3, "dpsgd_step_ms": t["dpsgd"]["step_s"] * 1e3,
            "time_ratio": t["dpsgd"]["step_s"] / t["nonprivate"]["step_s"],
            "median_per_step_ratio": t["per_step_ratio"],
            "nonprivate_peak_delta_mib": mem["nonprivate"]["delta_mib"], "dpsgd_peak_delta_mib": mem["dpsgd"]["delta_mib"],
            "memory_ratio": mem["dpsgd"]["delta_mib"] / max(mem["nonprivate"]["delta_mib"], 1e-9),
            "total_memory_ratio": mem["dpsgd"]["peak_mib"] / mem["nonprivate"]["peak_mib"],
            "raw": {"time": t, "memory": mem}}


def report(model: str, batch: int, length: int, t: dict, mem: dict) -> None:
    np_, dp = mem["nonprivate"], mem["dpsgd"]
    mem_kind = ("CUDA max_memory_allocated" if dp["device"] == "cuda"
                else "RSS (peak VmHWM after a clear_refs reset, minus RSS before the first step)")
    time_ratio = t["dpsgd"]["step_s"] / t["nonprivate"]["step_s"]
    policy_ratio = t["dpsgd"]["policy_s"] / t["nonprivate"]["policy_s"]
    mem_ratio = dp["delta_mib"] / max(np_["delta_mib"], 1e-9)
    total_ratio = dp["peak_mib"] / np_["peak_mib"]
    ok = lambda r, goal: "meets" if r <= goal else "MISSES"  # noqa: E731
    goal = TIME_GOAL if model == "tiny" else LARGE_TIME_GOAL
    print(f"\n== {model} on {dp['device']}: {batch} pairs x 2 rows x {length} tokens, "
          f"{dp['trainable']:,} trainable / {dp['total_params']:,} parameters")
    print(f"  step time (median)       non-private {t['nonprivate']['step_s'] * 1e3:9.1f} ms  "
          f"dp-sgd {t['dpsgd']['step_s'] * 1e3:9.1f} ms  ratio {time_ratio:.3f}  "
          f"(goal <= {goal}: {ok(time_ratio, goal)}; median per-step ratio {t['per_step_ratio']:.3f})")
    print(f"  policy part (no ref fwd) non-private {t['nonprivate']['policy_s'] * 1e3:9.1f} ms  "
          f"dp-sgd {t['dpsgd']['policy_s'] * 1e3:9.1f} ms  ratio {policy_ratio:.3f}")
    print(f"  peak memory above start  non-private {np_['delta_mib']:9.1f} MiB dp-sgd {dp['delta_mib']:9.1f} MiB "
          f"ratio {mem_ratio:.3f}  (goal <= {MEMORY_GOAL}: {ok(mem_ratio, MEMORY_GOAL)})")
    print(f"  peak memory, total       non-private {np_['peak_mib']:9.1f} MiB dp-sgd {dp['peak_mib']:9.1f} MiB "
          f"ratio {total_ratio:.3f}")
    print(f"  memory measured as: {mem_kind}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--child", nargs=3, metavar=("WHAT", "MODEL", "MODE"), help=argparse.SUPPRESS)
    ap.add_argument("--batch", type=int, default=None, help="pairs per step (default 32 tiny, 8 large)")
    ap.add_argument("--length", type=int, default=None, help="tokens per row (default 16 tiny, 256 large)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1, what each Ray Train worker uses with cpus_per_worker=1)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="autocast precision of the forwards on CUDA (weights stay float32)")
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="precision of the frozen base weights (the LoRA adapters stay float32)")
    ap.add_argument("--large-on-cpu", action="store_true",
                    help="also run the Pythia-410m-architecture model without CUDA (slow)")
    ap.add_argument("--model", action="append", choices=["tiny", *PYTHIA],
                    help="run only this model (repeatable); a Pythia architecture on a CPU defaults to a short "
                         "run (2 pairs x 64 tokens, 3 steps after 1 warm-up: set --batch, --length, --steps)")
    args = ap.parse_args(argv)
    if args.child:
        import torch

        torch.set_num_threads(args.threads)
        what, model, mode = args.child
        if what == "time":
            print(json.dumps(measure_time(model, args.batch, args.length, args.steps, args.warmup, args.dtype,
                                          args.weights)))
        else:
            print(json.dumps(measure_memory(model, mode, args.batch, args.length, args.steps, args.warmup,
                                            args.dtype, args.weights)))
        return

    import torch

    cuda = torch.cuda.is_available()
    runs = [("tiny", args.batch or 32, args.length or 16, args.steps, args.warmup)]
    if args.model:
        runs = [r for r in runs if r[0] in args.model] + [
            (m, args.batch or 8, args.length or 256, args.steps, args.warmup) if cuda
            else (m, args.batch or 2, args.length or 64, min(args.steps, 3), 1)
            for m in dict.fromkeys(args.model) if m != "tiny"]
    elif cuda:
        runs += [(m, args.batch or 8, args.length or 256, args.steps, args.warmup)
                 for m in ("pythia-160m-arch", "pythia-410m-arch")]
    elif args.large_on_cpu:  # seconds per step on a CPU: a short run
        runs.append(("pythia-410m-arch", args.batch or 2, args.length or 64, min(args.steps, 3), 1))
    else:
        print("(no CUDA: skipping the Pythia-160m- and -410m-architecture models; --large-on-cpu runs the 410m one anyway)")
    print(f"device: {'cuda ' + torch.cuda.get_device_name() if cuda else 'cpu'}, torch {torch.__version__}, "
          f"{args.threads} CPU thread(s)")
    for model, batch, length, steps, warmup in runs:
        t = run_child(args, "time", model, "both", batch, length, steps, warmup, args.dtype, args.weights)
        mem = {m: run_child(args, "memory", model, m, batch, length, min(steps, 5), warmup, args.dtype, args.weights)
               for m in ("nonprivate", "dpsgd")}
        print(f"\n({steps} timed steps per mode, interleaved, after {warmup} warm-up steps)", end="")
        report(model, batch, length, t, mem)


if __name__ == "__main__":
    main()
