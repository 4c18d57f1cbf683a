"""``props-ray sft``: supervised fine-tuning of the base model on the preferred responses of a split kept
apart from the preference partitions, to make the reference (the paper's pipeline SFTs before DPO).

Each example is ``prompt + chosen + eos`` with the next-token loss on the response tokens only (the same
tokenization as DPO's chosen rows), trained on Ray Train as the ``language_model`` objective: the base
plus LoRA, merged into a full model at the end, or the whole model with ``model.lora.enabled: false``.

Privacy, stated: with ``--epsilon`` the SFT is DP-SGD through the project's engine with the *example* (one
prompt and its preferred response) as the unit, Poisson sampling and the job's accountant, and the
spent epsilon is written beside the model. Without it the SFT is not private: the split's prompts and
preferred responses are in the reference, so that split must not be the private preference data (the
job's ``data.source`` is refused).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from props_ray.config import JobConfig
from props_ray.errors import UserError


def sft_rows(tokenizer, pairs: pd.DataFrame, max_prompt_length: int, max_response_length: int) -> list[dict]:
    """One row per pair: ``input_ids``, ``attention_mask`` and ``loss_mask`` (the chosen response and eos)."""
    from props_ray.dpo.tokenize import tokenize_pairs

    arr = tokenize_pairs(tokenizer, list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["chosen"]),
                         max_prompt_length, max_response_length)
    return [{"input_ids": arr["chosen_input_ids"][i].astype(np.int64),
             "attention_mask": arr["chosen_attention_mask"][i].astype(np.int64),
             "loss_mask": arr["chosen_loss_mask"][i].astype(np.int64)} for i in range(len(pairs))]


def run_sft(cfg: JobConfig, source: str, out: str | Path, epsilon: float | None = None) -> dict:
    """SFT ``cfg.model.name`` on the chosen responses of ``source`` with the job's training settings; write
    the reference to ``out`` (a full model and its tokenizer, with ``sft.json``)."""
    from props_ray.data.loaders import load_preferences
    from props_ray.data.split import refuse_private_source
    from props_ray.modeling import build_policy, load_tokenizer
    from props_ray.ray_runtime import ensure_ray
    from props_ray.train.trainer import fit_stages, run_name_for
    from props_ray.train.worker_group import rows_dataset

    if cfg.model.name == "embedded":
        raise UserError("sft: model.name is 'embedded', whose reference is already warmed up on public task "
                        "data; give a hub id or a directory (e.g. one props-ray init-model wrote)")
    refuse_private_source(source, cfg.data.source, "sft", "SFT on it would put its prompts and preferred "
                          "responses into the reference. Give a split kept apart")
    if epsilon is not None and not epsilon > 0:
        raise UserError(f"sft: --epsilon must be positive, got {epsilon}")
    pairs = load_preferences(source, "auto", on_bad_row=cfg.data.on_bad_row).pairs
    if len(pairs) < cfg.train.batch_size:
        raise UserError(f"sft: {source} has {len(pairs)} usable pairs, fewer than a batch of {cfg.train.batch_size}")
    tok = load_tokenizer(cfg.model.tokenizer or cfg.model.name)
    rows = sft_rows(tok, pairs, cfg.data.max_prompt_length, cfg.data.max_response_length)
    t = time.time()
    ensure_ray(cfg.train.num_workers, cfg.train.cpus_per_worker)
    name = run_name_for("sft", out)
    ck = fit_stages(cfg, run_name=name, trial="sft", method="sft", engine="dpsgd" if epsilon else "standard",
                    objective="language_model", stages=[1], datasets={1: rows_dataset(rows, cfg.train.num_workers)},
                    base_path=cfg.model.name, init_adapter=None, loss="sigmoid", flip_rate=None,
                    num_pairs=len(rows), extra={"epsilon": epsilon, "total_pairs": len(rows)})[0]
    model = build_policy(cfg.model.name, cfg.model, adapter_path=ck.model_path, trainable=False)
    if cfg.model.lora.enabled:
        model = model.merge_and_unload()
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    spent = ck.metrics.get("epsilon")
    info = {"source": str(source), "base": cfg.model.name, "examples": len(rows), "epochs": cfg.train.epochs,
            "final_loss": ck.metrics.get("loss"), "seconds": round(time.time() - t, 1),
            "privacy": (f"DP-SGD, the example as the unit: epsilon {spent:.4g}, delta {ck.metrics.get('delta'):.3g}"
                        if epsilon else "none: the SFT split's prompts and chosen responses are in the model"),
            "epsilon": spent if epsilon else None}
    (out / "sft.json").write_text(json.dumps(info, indent=1))
    return info
