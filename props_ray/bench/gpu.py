"""GPU figures: DPO steps of a Pythia-1B-architecture model in bf16, non-private and DP-SGD.

    props-ray bench --only gpu                 (says "skipped" without a CUDA device)
    python -m props_ray.bench.gpu [--model pythia-1b-arch] [--batch 8] [--length 512] [--steps 10]
                                  [--weights float32|bfloat16] [--peak-tflops X]

The weights are random (the hub is not needed to time a step). The step is the
training loop's, as :mod:`props_ray.bench.dp_overhead` runs it on a fixed batch:
reference log-probs with the adapters off, the policy forward (one row per pair, the
prompt once), the DPO loss, backward and AdamW. Non-private steps clip globally; DP-SGD steps take
per-pair samples, clip them and add noise. LoRA (r = 8) sits on attention and MLP.
By default the weights stay float32 and the forwards run under bf16 autocast, as a job with
``model.dtype: bfloat16`` runs them; ``--weights bfloat16`` stores the frozen base in bf16 (the
adapters stay float32), to measure what that would gain.

Per mode it reports step time, pairs/s, tokens/s (2 rows x ``length`` tokens a
pair) and peak memory, plus the DP-SGD/non-private step-time ratio. MFU is model
FLOPs per step / step time / the GPU's dense bf16 peak. Model FLOPs count what the
step computes: the reference forward, the policy forward, and the policy backward to
the activations (the frozen base needs no weight gradients; LoRA's are negligible),
over the tokens each runs (one row per pair with the prompt once, in both modes since
2026-12-06; before, 2B rows under DP-SGD: ``props_ray.dpo.logprobs``) and the positions
the LM head projects. A forward
is ``2 x block weights + 4 x layers x row length x hidden`` FLOPs per token (PaLM's
convention, causal masking not halved) plus ``2 x hidden x vocab`` per projected
position. DP-SGD's extra work (per-pair samples, clipping, noise) is overhead, not
model FLOPs. A change that removes work lowers the FLOPs of a step, so compare
pairs/s across changes, MFU within one.
"""

from __future__ import annotations

import argparse
import json

# Dense bf16 peak TFLOPS by device name (NVIDIA data sheets, no sparsity); others need --peak-tflops.
PEAK_BF16_TFLOPS = (("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4),
                    ("A100", 312.0))


def peak_tflops(device_name: str) -> float | None:
    for key, value in PEAK_BF16_TFLOPS:
        if key in device_name:
            return value
    return None


def matmul_weights(config) -> int:
    """Weights used in matrix products per token (GPT-NeoX): attention, MLP and the output head."""
    d, layers, mlp, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    return layers * (4 * d * d + 2 * d * mlp) + d * vocab


def forward_flops(config, rows: int, row_length: int, head_positions: int) -> int:
    """One forward: ``2 x block weights + 4 x layers x row_length x hidden`` FLOPs per token through the
    blocks, and ``2 x hidden x vocab`` per position the LM head projects."""
    d, layers, vocab = config.hidden_size, config.num_hidden_layers, config.vocab_size
    blocks = matmul_weights(config) - d * vocab
    return rows * row_length * (2 * blocks + 4 * layers * row_length * d) + 2 * d * vocab * head_positions


def layout_forward_flops(config, pairs: int, length: int, shared_prompt: bool) -> int:
    """A forward over ``pairs`` pairs of rows of ``length`` tokens, the first half the prompt (the bench's
    batch): 2B rows, or one row per pair with the prompt once (``pair_logprobs``); the head projects
    the positions that predict a response token."""
    prompt = length // 2
    response = length - prompt
    if shared_prompt:
        return forward_flops(config, pairs, prompt + 2 * response, pairs * (2 * response + 1))
    return forward_flops(config, 2 * pairs, length, 2 * pairs * (response + 1))


def step_flops(config, pairs: int, length: int, mode: str) -> int:
    """Model FLOPs of one DPO step (see the module docstring): the reference forward, and the policy's
    forward and backward to the activations, all with the prompt shared. ``mode`` ('nonprivate' or
    'dpsgd') does not change them: DP-SGD runs the same layout, and its extra work is overhead."""
    if mode not in ("nonprivate", "dpsgd"):
        raise ValueError(f"mode must be 'nonprivate' or 'dpsgd', got {mode!r}")
    return 3 * layout_forward_flops(config, pairs, length, shared_prompt=True)


def matmul_tflops(n: int = 8192, repeats: int = 10) -> float:
    """The device's measured dense bf16 rate: an n x n x n product on random data, after warm-up."""
    import torch

    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        a @ b
    end.record()
    torch.cuda.synchronize()
    return 2 * n ** 3 * repeats / (start.elapsed_time(end) / 1e3) / 1e12


def measure(model: str = "pythia-1b-arch", batch: int = 8, length: int = 512, steps: int = 10, warmup: int = 3,
            dtype: str = "bfloat16", peak: float | None = None, require_cuda: bool = True,
            weights: str = "float32") -> dict:
    """Step times, throughput, MFU and peak memory per mode; ``{"skipped": why}`` without CUDA."""
    import torch

    from props_ray.bench import dp_overhead

    if not torch.cuda.is_available() and require_cuda:
        return {"skipped": "no CUDA device"}
    device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    peak = peak or peak_tflops(device_name)
    args = argparse.Namespace(threads=torch.get_num_threads())
    t = dp_overhead.run_child(args, "time", model, "both", batch, length, steps, warmup, dtype, weights)
    mem = {m: dp_overhead.run_child(args, "memory", model, m, batch, length, min(steps, 5), warmup, dtype, weights)
           for m in ("nonprivate", "dpsgd")}
    if model in dp_overhead.PYTHIA:
        config = dp_overhead.pythia_config(model)
    else:
        config = dp_overhead.build_model(model)[0].base_model.model.config
    flops = {m: step_flops(config, batch, length, m) for m in ("nonprivate", "dpsgd")}
    measured = matmul_tflops() if torch.cuda.is_available() else None
    out = {"model": model, "device": device_name, "dtype": dtype, "weights": weights, "pairs_per_step": batch,
           "tokens_per_row": length, "measured_matmul_tflops": measured,
           "timed_steps": steps, "flops_per_step": flops, "peak_tflops": peak,
           "time_ratio": t["dpsgd"]["step_s"] / t["nonprivate"]["step_s"]}
    for m in ("nonprivate", "dpsgd"):
        s = t[m]["step_s"]
        out[m] = {"step_ms": s * 1e3, "pairs_per_s": batch / s, "tokens_per_s": 2 * batch * length / s,
                  "mfu": flops[m] / s / (peak * 1e12) if peak else None,
                  "of_measured_matmul": flops[m] / s / (measured * 1e12) if measured else None,
                  "peak_memory_mib": mem[m]["peak_mib"]}
    return out


def profile(path: str, model: str = "pythia-1b-arch", batch: int = 8, length: int = 512,
            modes: tuple[str, ...] = ("nonprivate", "dpsgd"), dtype: str = "bfloat16",
            weights: str = "float32") -> None:
    """Where a step's time goes: ``torch.profiler`` over 3 steps (after 2 warm-up steps) per mode, the
    operators sorted by device time, written to ``path`` (one table per mode, each as soon as it is done)."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from props_ray.bench import dp_overhead

    device = dp_overhead._device()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort = "cuda_time_total" if device.type == "cuda" else "cpu_time_total"
    with open(path, "w") as f:
        for mode in modes:
            step = dp_overhead.make_step(model, mode, batch, length, device, dtype, weights)[0]
            for _ in range(2):
                step()
            with torch_profile(activities=activities) as prof:
                times = [step()[0] for _ in range(3)]
            f.write(f"== {model} {mode}: {batch} pairs x 2 rows x {length} tokens, {dtype} autocast, {weights} "
                    "base weights; "
                    f"steps {', '.join(f'{t * 1e3:.1f}' for t in times)} ms\n")
            f.write(prof.key_averages().table(sort_by=sort, row_limit=40, max_name_column_width=60) + "\n")
            f.flush()
            del step
            if device.type == "cuda":
                torch.cuda.empty_cache()


def format_lines(g: dict) -> list[str]:
    if "skipped" in g:
        return [f"gpu: skipped ({g['skipped']}); the Pythia-1B-architecture figures need a CUDA device"]
    head = (f"gpu: {g['model']} on {g['device']}, {g['dtype']} autocast, {g.get('weights', 'float32')} base weights, "
            f"{g['pairs_per_step']} pairs x 2 rows x {g['tokens_per_row']} tokens, {g['timed_steps']} timed steps")
    lines = [head]
    if g.get("measured_matmul_tflops"):
        lines.append(f"  the device's bf16 matrix product (8192^3, random data): {g['measured_matmul_tflops']:.0f} TFLOP/s; "
                     f"MFU below is against the data sheet's {g['peak_tflops']} TFLOP/s")
    for m in ("nonprivate", "dpsgd"):
        r = g[m]
        mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else "- (unknown peak: --peak-tflops)"
        lines.append(f"  {m:<10} {r['step_ms']:8.1f} ms/step  {r['pairs_per_s']:8.1f} pairs/s  "
                     f"{r['tokens_per_s']:10.0f} tokens/s  MFU {mfu}  peak memory {r['peak_memory_mib']:.0f} MiB")
    lines.append(f"  DP-SGD / non-private step time {g['time_ratio']:.2f}x (goal <= 1.10)")
    return lines


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-1b-arch")
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--length", type=int, default=512, help="tokens per row")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--weights", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="precision of the frozen base weights (the adapters stay float32)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="the GPU's dense peak for this dtype")
    ap.add_argument("--json", default=None)
    ap.add_argument("--profile", default=None, metavar="PATH",
                    help="instead of timing, write torch.profiler's operator table of each mode's step to PATH")
    args = ap.parse_args(argv)
    if args.profile:
        profile(args.profile, args.model, args.batch, args.length, dtype=args.dtype, weights=args.weights)
        return
    g = measure(args.model, args.batch, args.length, args.steps, args.warmup, args.dtype, args.peak_tflops,
                weights=args.weights)
    print("\n".join(format_lines(g)))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(g, f, indent=1)


if __name__ == "__main__":
    main()
