"""The reference (SFT) model: where it comes from and its cache.

For a Hugging Face id or path the reference is that model. For the embedded
task it is a tiny GPT-NeoX model warmed up by a short supervised fine-tuning
(SFT) on uniformly random responses, which gives it varied generations; it is
built once per task, model size, SFT settings and seed, then cached, so every
method and every stage of a job (and every job with the same settings) starts
from the same reference.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from props_ray.config import JobConfig

log = logging.getLogger(__name__)


def cache_root(cfg: JobConfig) -> Path:
    root = Path(cfg.model.cache_dir) if cfg.model.cache_dir else Path(cfg.output_dir) / "cache"
    return root.resolve()  # workers run in other directories


def embedded_task(cfg: JobConfig):
    from props_ray.embedded.task import EmbeddedTask

    return EmbeddedTask(**cfg.task.model_dump(exclude={"preset"}))


def embedded_reference_path(cfg: JobConfig) -> Path:
    key = json.dumps({"task": embedded_task(cfg).fingerprint(), "tiny": cfg.model.tiny.model_dump(),
                      "sft": cfg.model.sft.model_dump(), "seed": cfg.seed}, sort_keys=True)
    return cache_root(cfg) / "reference" / f"embedded-{hashlib.sha256(key.encode()).hexdigest()[:16]}"


def resolve_reference(cfg: JobConfig) -> str:
    """Path or id of the reference model, building the embedded one if it is not cached."""
    if cfg.model.name != "embedded":
        return cfg.model.name
    path = embedded_reference_path(cfg)
    if not (path / "COMPLETE").exists():
        build_embedded_reference(cfg, path)
    return str(path)


def sft_warmup(model, tokenizer, prompts, responses, steps: int, batch_size: int, lr: float,
               max_prompt_length: int, max_response_length: int, seed: int) -> list[float]:
    """Next-token training on the response tokens of prompt+response+eos; returns the losses."""
    from props_ray.dpo.tokenize import tokenize_pairs

    arr = tokenize_pairs(tokenizer, prompts, responses, responses, max_prompt_length, max_response_length)
    ids = torch.from_numpy(arr["chosen_input_ids"])
    att = torch.from_numpy(arr["chosen_attention_mask"])
    mask = torch.from_numpy(arr["chosen_loss_mask"])
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for _ in range(steps):
        idx = torch.randint(0, ids.shape[0], (batch_size,), generator=gen)
        logits = model(input_ids=ids[idx], attention_mask=att[idx]).logits[:, :-1]
        tgt, m = ids[idx][:, 1:], mask[idx][:, 1:].float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1),
                                                reduction="none").view_as(m)
        loss = (nll * m).sum() / m.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


#: Intra-op threads of the embedded reference's SFT, whatever the machine. A CPU kernel's sums split
#: over threads, so the warmed-up weights depend on their number (1 and 2 threads differ): with
#: torch's default, one thread per core, machines with other core counts built other references from
#: the same settings, under the same cache key (task, model, SFT settings, seed). Two is what the
#: 2-core machines behind the README's figures used.
SFT_THREADS = 2


def build_embedded_reference(cfg: JobConfig, path: Path) -> None:
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.modeling import torch_threads

    t0 = time.time()
    task = embedded_task(cfg)
    tok = build_tokenizer(task)
    model = build_tiny_model(len(tok), cfg.model.tiny.hidden_size, cfg.model.tiny.num_layers,
                             cfg.model.tiny.num_heads,
                             max_positions=max(64, cfg.data.max_prompt_length + cfg.data.max_response_length),
                             seed=cfg.seed)
    prompts, responses = task.sft_examples(cfg.model.sft.examples, cfg.seed)
    with torch.random.fork_rng(), torch_threads(SFT_THREADS):
        torch.manual_seed(cfg.seed)
        losses = sft_warmup(model, tok, prompts, responses, cfg.model.sft.steps, cfg.model.sft.batch_size,
                            cfg.model.sft.lr, cfg.data.max_prompt_length, cfg.data.max_response_length, cfg.seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=".building-"))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    info = {"task": task.fingerprint(), "sft_final_loss": float(np.mean(losses[-20:])) if losses else None,
            "seconds": round(time.time() - t0, 2)}
    (tmp / "reference.json").write_text(json.dumps(info, indent=1))
    (tmp / "COMPLETE").write_text("")
    try:
        os.replace(tmp, path)  # atomic; a concurrent builder that won the race is fine
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("built the embedded reference model in %.1fs (SFT loss %.3f): %s", info["seconds"],
             info["sft_final_loss"] or float("nan"), path)
