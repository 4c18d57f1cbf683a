"""One non-private DPO step (reference forward, policy forward and backward) in three log-prob layouts,
interleaved in one process, on a Pythia-architecture GPT-NeoX with random weights and LoRA:

- full-length logits over 2B rows (every position through the LM head; props-ray before 2026-12-06);
- the response window over 2B rows (the head only where a response token is predicted; the fallback when
  a pair's rows do not share their prompt);
- the response window with the prompt shared, one row per pair (the training loop's layout, DP-SGD's too).

    python -m props_ray.bench.layouts [--model pythia-160m-arch] [--pairs 8] [--prompt 64] [--response 64]

Prints the median step time of each after one warm-up step, and checks that all three give the same
log-probs. One torch thread, as each Ray Train worker uses with ``cpus_per_worker: 1``.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time


def full_length_rows(model, batch):
    """The 2B-row layout with every position's logits: the baseline the other two replace."""
    import torch

    n = batch["chosen_input_ids"].shape[0]
    ids = torch.cat([batch["chosen_input_ids"], batch["rejected_input_ids"]])
    att = torch.cat([batch["chosen_attention_mask"], batch["rejected_attention_mask"]])
    mask = torch.cat([batch["chosen_loss_mask"], batch["rejected_loss_mask"]])
    logits = model(input_ids=ids, attention_mask=att).logits[:, :-1]
    logp = torch.log_softmax(logits.float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)
    sums = (logp * mask[:, 1:]).sum(-1)
    return sums[:n], sums[n:]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pythia-160m-arch")
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--response", type=int, default=64)
    ap.add_argument("--steps", type=int, default=4, help="steps per layout, the first a warm-up")
    args = ap.parse_args(argv)

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import GPTNeoXForCausalLM

    from props_ray.bench.dp_overhead import pythia_config
    from props_ray.dpo.logprobs import pair_logprobs
    from props_ray.modeling import LORA_TARGETS, adapters_off

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = get_peft_model(GPTNeoXForCausalLM(pythia_config(args.model)),
                           LoraConfig(r=8, target_modules=LORA_TARGETS["gpt_neox"])).train()
    b, p, r = args.pairs, args.prompt, args.response
    chosen = torch.randint(2, 1000, (b, p + r))
    rejected = chosen.clone()
    rejected[:, p:] = torch.randint(2, 1000, (b, r))
    loss_mask = torch.zeros(b, p + r, dtype=torch.long)
    loss_mask[:, p:] = 1
    batch = {"chosen_input_ids": chosen, "rejected_input_ids": rejected, "chosen_loss_mask": loss_mask,
             "rejected_loss_mask": loss_mask, "chosen_attention_mask": torch.ones_like(chosen),
             "rejected_attention_mask": torch.ones_like(chosen)}
    layouts = {"full-length logits, 2B rows": full_length_rows, "response window, 2B rows": pair_logprobs,
               "response window, prompt shared": functools.partial(pair_logprobs, share_prompt=True)}
    times: dict[str, list[float]] = {k: [] for k in layouts}
    values = {}
    print(f"{args.model}, {b} pairs of {p} prompt + {r} response tokens, 1 thread, {args.steps} steps per layout")
    for _ in range(args.steps):
        for name, logprobs in layouts.items():
            start = time.perf_counter()
            with torch.no_grad(), adapters_off(model):
                ref_c, ref_r = logprobs(model, batch)
            pol_c, pol_r = logprobs(model, batch)
            (-torch.nn.functional.logsigmoid(0.1 * ((pol_c - ref_c) - (pol_r - ref_r))).mean()).backward()
            model.zero_grad()
            times[name].append(time.perf_counter() - start)
            values[name] = torch.cat([pol_c, pol_r]).detach()
    base = next(iter(layouts))
    for name, ts in times.items():
        median = statistics.median(ts[1:] or ts)
        drift = float((values[name] - values[base]).abs().max())
        print(f"  {name:32s} {median:8.2f} s  ({statistics.median(times[base][1:] or times[base]) / median:.2f}x)"
              f"  max |log-prob - full-length| {drift:.1e}")


if __name__ == "__main__":
    main()
