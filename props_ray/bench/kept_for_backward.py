"""What a DPO training forward keeps for its backward, non-private against DP-SGD: a count, not a peak.

    python -m props_ray.bench.kept_for_backward [--dtype bfloat16] [--model pythia-160m-arch]

The policy's training forward (one row per pair, the prompt shared, as the loop runs it) on the
DP-SGD overhead bench's model and batch (:mod:`props_ray.bench.dp_overhead`), under autocast in
``--dtype`` on this device, a CPU included (that bench autocasts on CUDA only). Every storage
autograd saves is counted once, a parameter's own storage not counted, so the figure is
deterministic, unlike a peak. A linear layer's per-pair capture saves its input through autograd,
so with LoRA (every adapted layer linear) the count covers DP-SGD's kept inputs; a hooked layer of
another type keeps its input outside autograd, which this does not count.
"""

from __future__ import annotations

import argparse

from props_ray.bench.dp_overhead import PYTHIA, _device, bench_engine, build_model, make_batch


def measure_kept(model_name: str, mode: str, batch: int, length: int, dtype: str = "float32") -> dict:
    """MiB that one training forward of the policy keeps for its backward (see the module docstring)."""
    import torch

    from props_ray.dpo.logprobs import pair_logprobs
    from props_ray.modeling import AUTOCAST_DTYPES

    device = _device()
    torch.manual_seed(0)
    policy, vocab = build_model(model_name)
    model = policy.to(device).train()
    if mode == "dpsgd":
        model, _ = bench_engine(batch).wrap(policy, torch.optim.AdamW([p for p in policy.parameters() if p.requires_grad]))
    data = make_batch(batch, length, vocab, device)
    parameters = {(p.device, p.untyped_storage().data_ptr()) for p in policy.parameters()}
    storages: dict = {}

    def keep(t):
        storage = t.untyped_storage()
        key = (storage.device, storage.data_ptr())
        if key not in parameters:
            storages[key] = storage.nbytes()
        return t

    amp = AUTOCAST_DTYPES.get(dtype)
    with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t), \
            torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        pair_logprobs(model, data, share_prompt=True)
    return {"kept_mib": sum(storages.values()) / 2**20, "device": device.type}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", action="append", choices=["tiny", *PYTHIA], help="default: tiny (repeatable)")
    ap.add_argument("--batch", type=int, default=None, help="pairs (default 32 tiny, 8 otherwise)")
    ap.add_argument("--length", type=int, default=None, help="tokens per row (default 16 tiny, 128 otherwise)")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                    help="autocast precision of the forward (float32: no autocast)")
    args = ap.parse_args(argv)
    for model in args.model or ["tiny"]:
        batch = args.batch or (32 if model == "tiny" else 8)
        length = args.length or (16 if model == "tiny" else 128)
        kept = {m: measure_kept(model, m, batch, length, args.dtype)["kept_mib"] for m in ("nonprivate", "dpsgd")}
        print(f"{model}: {batch} pairs x 2 rows x {length} tokens, {args.dtype}: kept for the backward "
              f"non-private {kept['nonprivate']:.2f} MiB, dp-sgd {kept['dpsgd']:.2f} MiB, "
              f"ratio {kept['dpsgd'] / kept['nonprivate']:.3f}")


if __name__ == "__main__":
    main()
