"""Non-private DPO training throughput: props-ray's Ray Train loop against TRL's ``DPOTrainer``.

Two models: the embedded one (``--quick``: a tiny model, where a step is mostly framework work), and
a Pythia-160M-architecture GPT-NeoX with random weights (:func:`pythia_base`, the full bench) on
pairs of exactly 2 x 128 tokens (:func:`long_pairs`), where a step is mostly matrix products.

Both train the same model (the embedded reference with a fresh LoRA adapter on
the same modules), on the same pairs, with the same global batch, sequence
lengths, number of steps, optimizer (AdamW, same learning rate), ``sigmoid``
loss and beta, in the same precision and with the same activation checkpointing
(:func:`trl_args`: float32 and none on the CPU, unlike TRL's own defaults); both
compute the reference log-probs with the adapters disabled.
props-ray computes them once per pair and reuses them; TRL is measured both
ways, recomputing them every step (its default) and with
``precompute_ref_log_probs``. The figure is pairs per second at steady state:
the first epoch is warm-up (worker start, first data pass, allocator, and
props-ray's reference log-probs of each pair, which later epochs reuse), the
later epochs are timed, the time of the training loop only (not checkpoints,
which TRL is told not to write).

props-ray runs as users run it: ``num_workers`` Ray Train workers (DDP, gloo
on CPU) with ``cpus_per_worker`` threads each. TRL runs in one process with
the same total number of threads, a fresh Python process (:func:`trl_throughput_fresh`) as the Ray
Train workers are, rather than in the bench's own process after the sections before it (until
2026-12-07). On the tiny model the two placements read within the machine's run-to-run spread: TRL
107.8 and 117.0 pairs/s in the bench's process, 93.6 and 121.3 in its own (default and
``precompute_ref_log_probs``, 2026-12-07). TRL is installed only by the ``bench``
extra; without it the comparison says so and is skipped.
"""

from __future__ import annotations

import json
import pickle
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

from props_ray.bench.child import run_json_child
from props_ray.config import JobConfig
from props_ray.modeling import LORA_TARGETS, torch_threads
from props_ray.ray_runtime import environment_set


def bench_job(output_dir: str, pairs: int, batch_size: int, epochs: int, num_workers: int,
              cpus_per_worker: float, method: str = "nonprivate", model_name: str = "embedded",
              lengths: tuple[int, int] | None = None, **train) -> JobConfig:
    """The bench's job: the embedded task and model (or ``model_name``, a local directory, with
    ``lengths`` = (prompt, response) tokens), one stage, no tracking server needed."""
    data = {"source": "embedded", "num_pairs": pairs, "eval_prompts": 16}
    if lengths:
        data.update(max_prompt_length=lengths[0], max_response_length=lengths[1])
    return JobConfig.model_validate({
        "name": "bench", "seed": 0, "stages": 1, "output_dir": output_dir, "data": data,
        "train": {"num_workers": num_workers, "cpus_per_worker": cpus_per_worker, "batch_size": batch_size,
                  "epochs": epochs, "lr": 0.002, "beta": 0.1, "log_every": 10_000, **train},
        "methods": [{"method": method}],
        # TRL cannot put a LoRA adapter on lm_head (it reads lm_head.weight directly), so both sides
        # adapt the attention and MLP projections only.
        "model": {"name": model_name, "lora": {"target_modules": LORA_TARGETS["gpt_neox"]}},
        "tracking": {"tracking_uri": f"sqlite:///{output_dir}/bench-mlflow.db"},
    })


def pythia_base(out_dir: str, embedded_base: str, architecture: str = "pythia-160m-arch") -> str:
    """A Pythia-architecture GPT-NeoX with random weights and the embedded task's word-level tokenizer
    (whose ids all fall inside Pythia's 50,304-token vocabulary), saved where ``from_pretrained`` loads it."""
    from pathlib import Path

    import torch
    from transformers import GPTNeoXForCausalLM

    from props_ray.bench.dp_overhead import pythia_config
    from props_ray.modeling import load_tokenizer

    path = Path(out_dir) / architecture
    if (path / "config.json").exists():
        return str(path)
    tok = load_tokenizer(embedded_base)
    config = pythia_config(architecture)
    config.pad_token_id, config.eos_token_id, config.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.eos_token_id
    with torch.random.fork_rng():
        torch.manual_seed(0)
        model = GPTNeoXForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def long_pairs(base_path: str, n: int, prompt_tokens: int, response_tokens: int, seed: int = 0) -> pd.DataFrame:
    """``n`` pairs of random task words: a prompt of ``prompt_tokens`` words and responses of
    ``response_tokens - 1`` (the end-of-sequence token completes them), one token a word, so every row is
    exactly ``prompt_tokens + response_tokens`` tokens long in both trainers and neither truncates or pads."""
    import numpy as np

    from props_ray.modeling import load_tokenizer

    tok = load_tokenizer(base_path)
    words = [w for w, i in tok.get_vocab().items() if i not in tok.all_special_ids and not w.startswith("<")]
    rng = np.random.default_rng(seed)

    def text(k):
        return " ".join(rng.choice(words, size=k))

    return pd.DataFrame({"id": [f"long-{i}" for i in range(n)], "prompt": [text(prompt_tokens) for _ in range(n)],
                         "chosen": [text(response_tokens - 1) for _ in range(n)],
                         "rejected": [text(response_tokens - 1) for _ in range(n)]})


def bench_pairs(cfg: JobConfig) -> pd.DataFrame:
    from props_ray.reference import embedded_task

    return embedded_task(cfg).preference_pairs(cfg.data.num_pairs, cfg.seed)[["id", "prompt", "chosen", "rejected"]]


def steady_state(epochs: list[dict], pairs: int) -> dict:
    """Pairs/s over the epochs after the first (rank 0's loop time per epoch)."""
    timed = [e for e in epochs if e["epoch"] >= 1]
    if not timed:
        raise ValueError("throughput needs at least 2 epochs (the first is warm-up)")
    seconds = sum(e["epoch_seconds"] for e in timed)
    return {"pairs_per_s": pairs * len(timed) / seconds, "timed_epochs": len(timed), "timed_seconds": seconds,
            "warmup_epoch_seconds": next(e["epoch_seconds"] for e in epochs if e["epoch"] == 0)}


def props_ray_throughput(cfg: JobConfig, base_path: str, pairs: pd.DataFrame) -> dict:
    """Train one stage through :func:`props_ray.train.trainer.fit_stages` (a real TorchTrainer)."""
    from props_ray.data.tokenize_step import to_training_dataset
    from props_ray.train.trainer import fit_stages

    t = time.time()
    ds = to_training_dataset(pairs, base_path, cfg.data.max_prompt_length, cfg.data.max_response_length)
    ck = fit_stages(cfg, run_name=f"bench-throughput-{int(t)}", trial="bench", method="nonprivate", stages=[1],
                    datasets={1: ds}, base_path=base_path, init_adapter=None, loss="sigmoid", flip_rate=None,
                    num_pairs=len(pairs))[0]
    out = steady_state(ck.epochs, len(pairs))
    out.update(run_seconds=time.time() - t, workers=cfg.train.num_workers,
               threads_per_worker=int(cfg.train.cpus_per_worker))
    return out


def _as_completions(pairs: pd.DataFrame) -> pd.DataFrame:
    """TRL appends the completion text to the prompt text as is: give it the response as props-ray's
    tokenizer joins it (one separating space), so both train on the same token sequences."""
    from props_ray.dpo.tokenize import join_response

    return pd.DataFrame({"prompt": pairs["prompt"],
                         "chosen": [join_response(p, r) for p, r in zip(pairs["prompt"], pairs["chosen"])],
                         "rejected": [join_response(p, r) for p, r in zip(pairs["prompt"], pairs["rejected"])]})


def trl_available() -> str | None:
    """TRL's version, or None when the ``bench`` extra is not installed."""
    try:
        import trl
    except ImportError:
        return None
    return trl.__version__


def trl_args(cfg: JobConfig, output_dir: str, precompute_ref: bool = False):
    """TRL's ``DPOConfig`` for the same training as ``cfg``.

    TRL's own defaults differ from props-ray's where it costs most: ``bf16`` autocast and activation
    checkpointing are on unless set. props-ray trains in float32 on the CPU and autocasts only on CUDA
    (``model.dtype``), and checkpoints only with ``model.gradient_checkpointing``; TRL is told the same.
    On a CPU without AVX-512 a bf16 matrix product is emulated: 2,048 x 768 by 768 x 3,072 took 10.0 s
    against 86 ms in float32 (2026-12-07), which is what had TRL's 160M training not finish."""
    import torch
    from trl import DPOConfig

    cuda = torch.cuda.is_available()
    # transformers 5 renamed gradient_checkpointing (still accepted, with a warning) to activation_checkpointing
    checkpointing = ("activation_checkpointing" if "activation_checkpointing" in DPOConfig.__dataclass_fields__
                     else "gradient_checkpointing")
    return DPOConfig(
        output_dir=output_dir, per_device_train_batch_size=cfg.train.batch_size, num_train_epochs=cfg.train.epochs,
        learning_rate=cfg.train.lr, lr_scheduler_type="constant", warmup_steps=0,
        weight_decay=cfg.train.weight_decay, max_grad_norm=cfg.train.max_grad_norm or 0.0,
        beta=cfg.train.beta, loss_type=["sigmoid"],
        max_length=cfg.data.max_prompt_length + cfg.data.max_response_length,
        bf16=cuda and cfg.model.dtype == "bfloat16", fp16=cuda and cfg.model.dtype == "float16",
        **{checkpointing: cfg.model.gradient_checkpointing},
        use_cpu=not cuda, report_to="none", save_strategy="no",
        logging_strategy="no", disable_tqdm=True, dataloader_num_workers=0, seed=cfg.seed,
        precompute_ref_log_probs=precompute_ref)


def trl_throughput(cfg: JobConfig, base_path: str, pairs: pd.DataFrame, threads: int,
                   precompute_ref: bool = False) -> dict:
    """The same training with TRL's DPOTrainer in this process, ``threads`` torch threads.

    ``precompute_ref``: TRL's ``precompute_ref_log_probs`` (a reference pass over the data before
    training, outside the timed epochs), the counterpart of props-ray reusing each pair's reference
    log-probs after the first epoch; TRL's default recomputes them every step."""
    import datasets
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import TrainerCallback
    from transformers.trainer_callback import PrinterCallback
    from trl import DPOTrainer

    from props_ray.modeling import load_base_model, load_tokenizer, lora_targets

    class EpochTimer(TrainerCallback):
        def __init__(self):
            self.seconds: list[float] = []

        def on_epoch_begin(self, args, state, control, **kw):
            self.t = time.perf_counter()

        def on_epoch_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t)

    datasets.disable_progress_bars()
    with torch_threads(threads):
        torch.manual_seed(cfg.seed)
        model = load_base_model(base_path, cfg.model)
        tok = load_tokenizer(base_path)
        lora = LoraConfig(r=cfg.model.lora.r, lora_alpha=cfg.model.lora.alpha, lora_dropout=cfg.model.lora.dropout,
                          target_modules=lora_targets(model, cfg.model), task_type="CAUSAL_LM")
        timer = EpochTimer()
        with tempfile.TemporaryDirectory() as out:
            args = trl_args(cfg, out, precompute_ref)
            with environment_set({"TQDM_DISABLE": "1"}):  # TRL's reference pass draws one of its own
                trainer = DPOTrainer(model=model, args=args, processing_class=tok, peft_config=lora,
                                     train_dataset=Dataset.from_pandas(_as_completions(pairs), preserve_index=False),
                                     callbacks=[timer])
            trainer.remove_callback(PrinterCallback)  # it prints the run's closing metrics as a dict
            trainer.train()
    epochs = [{"epoch": i, "epoch_seconds": s} for i, s in enumerate(timer.seconds)]
    out = steady_state(epochs, len(pairs))
    out.update(threads=threads)
    return out


def trl_throughput_fresh(cfg: JobConfig, base_path: str, pairs: pd.DataFrame, threads: int,
                         precompute_ref: bool = False) -> dict:
    """:func:`trl_throughput` in a fresh Python process (``python -m props_ray.bench.throughput ARGS``)."""
    with tempfile.TemporaryDirectory() as tmp:
        args = Path(tmp) / "args.pickle"
        args.write_bytes(pickle.dumps((cfg, base_path, pairs, threads, precompute_ref)))
        return run_json_child("props_ray.bench.throughput", str(args))


if __name__ == "__main__":
    cfg_, base_, pairs_, threads_, precompute_ = pickle.loads(Path(sys.argv[1]).read_bytes())
    print(json.dumps(trl_throughput(cfg_, base_, pairs_, threads_, precompute_ref=precompute_)))
