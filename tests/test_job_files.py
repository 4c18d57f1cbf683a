"""Every job file in ``jobs/`` runs end to end, in miniature, on the CPU.

Each file is loaded as a user would load it, with ``--set`` overrides that shrink it: a few pairs, one
epoch, one epsilon, one seed, a locally built model of the *same architecture family* in place of a hub
model (with the job's own LoRA targets, dtype and DP-SGD settings), its data from ``../shared/data`` or a
small file in its format, and a local judge. Then every trial of it runs on real Ray, Ray Train and
Ray Data. A trial whose code path (method section, task preset, architecture, LoRA, the DP-SGD
accountant and batching) an earlier file already ran is not run twice; every file still passes its
data step (loading, validation, partitions, the ledger). Configuration combinations that fail only at run time fail here.
"""

import json
from pathlib import Path

import pytest
import yaml

from props_ray.config import load_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared" / "data"
JOBS = sorted((ROOT / "jobs").glob("*.yaml"))
#: the hub models of the paper jobs -> the architecture of the local stand-in
FAMILY = {"gpt2": "gpt2", "pythia": "gpt_neox", "llama": "llama"}
_seen: set[str] = set()


def _family(name: str) -> str:
    for key, arch in FAMILY.items():
        if key in name.lower():
            return arch
    if name.startswith(("runs", ".", "/", "~")):
        return "gpt_neox"  # a local directory, e.g. one props-ray init-model wrote (GPT-NeoX by default)
    raise AssertionError(f"no local architecture for the hub model {name!r}: add it to FAMILY")


@pytest.fixture(scope="module")
def local(tmp_path_factory):
    """A tiny model, tokenizer and judge per architecture, built offline, and data in each format."""
    import pandas as pd
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from props_ray.data.loaders import load_preferences
    from props_ray.offline import init_model

    if not SHARED.exists():
        pytest.skip("needs ../shared/data")
    d = tmp_path_factory.mktemp("local")
    hh = SHARED / "hh-rlhf" / "harmless-base-test.jsonl.gz"
    pairs = load_preferences(str(hh), on_bad_row="skip").pairs.head(300)
    texts = [*pairs["prompt"], *pairs["chosen"], *pairs["rejected"]]
    out = {"data": {"hh_rlhf": str(hh),
                    "alpaca_eval": str(SHARED / "alpaca_eval" / "Mistral-7B-Instruct-v0.2.annotations.json")}}
    truthy = d / "truthy-dpo.jsonl"  # the preference format of jondurbin/truthy-dpo-v0.1
    truthy.write_text("".join(json.dumps({"id": f"t{i}", "source": "truthy_dpo", "system": "Be truthful.",
                                          "prompt": r.prompt[-200:], "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                              for i, r in enumerate(pairs.itertuples())))
    out["data"]["preference"] = str(truthy)
    for arch in sorted(set(FAMILY.values())):
        init_model(d / arch, texts, arch, vocab_size=512, min_frequency=2, hidden_size=32, num_layers=1,
                   num_heads=2, max_positions=128)
        judge = AutoModelForSequenceClassification.from_pretrained(d / arch, num_labels=1)
        judge.config.pad_token_id = 0
        judge.save_pretrained(d / f"{arch}-judge")
        AutoTokenizer.from_pretrained(d / arch).save_pretrained(d / f"{arch}-judge")
        out[arch] = str(d / arch)
    assert pd.notna(out["data"]["hh_rlhf"])
    return out


def _miniature(path: Path, out: Path, local: dict) -> list[str]:
    raw = yaml.safe_load(path.read_text())
    sets = [f"output_dir={out}", f"tracking.tracking_uri=sqlite:///{out}/mlflow.db", "train.use_gpu=false",
            "train.cpus_per_worker=1", "train.epochs=1", "train.batch_size=8", "train.log_every=1",
            "data.eval_prompts=4", "eval.samples_per_prompt=1", "eval.max_new_tokens=4"]
    eps = (raw.get("privacy") or {}).get("epsilons") or [0.5]
    sets.append(f"privacy.epsilons=[{max(eps)}]")
    for key in ("seeds", "stages"):
        if (raw.get("sweep") or {}).get(key):
            sets.append(f"sweep.{key}=[{raw['sweep'][key][0]}]")
    for i, m in enumerate(raw.get("methods") or []):
        if m.get("method") == "synthetic_instructions":
            # DP fine-tuning on ~100 prompts learns nothing at a small epsilon, and the generator must sample
            # some well-formed prompts for the path to run on: a large epsilon, more steps, fewer centres.
            # The miniature checks the path, not the method's utility.
            sets += [f"methods.{i}.epsilons=[16]", f"methods.{i}.generator_epochs=8",
                     f"methods.{i}.generator_lr=0.05", f"methods.{i}.clusters=2"]
    data = raw.get("data") or {}
    if data.get("source", "embedded") == "embedded":
        sets += ["data.num_pairs=120", "model.sft.steps=10", "model.sft.examples=256"]
        if (raw.get("audit") or {}).get("canaries"):
            sets.append("audit.canaries=16")
    else:
        arch = _family(raw["model"]["name"])
        sets += [f"model.name={local[arch]}", f"eval.judge={local[arch]}-judge",
                 f"data.source={local['data'][data['format']]}", "data.num_pairs=120",
                 "data.max_prompt_length=32", "data.max_response_length=16"]
    return sets


def _signature(cfg, method) -> str:
    """What decides a trial's code path once the data are loaded (values such as a learning rate or a
    clipping norm do not; the data format is exercised by every file's data step; the sweep and audit
    paths have their own end-to-end tests)."""
    dpsgd = cfg.privacy.dpsgd
    return json.dumps({"method": method.model_dump(mode="json"), "preset": cfg.task.preset,
                       "model": Path(cfg.model.name).name, "lora": cfg.model.lora.model_dump(mode="json"),
                       "dpsgd": [dpsgd.accountant, dpsgd.physical_batch_size is not None,
                                 dpsgd.noise_multiplier is not None]}, sort_keys=True)


@pytest.mark.parametrize("path", JOBS, ids=[p.stem for p in JOBS])
def test_job_file_runs_in_miniature(path, tmp_path, local, ray_local):
    from props_ray.driver import Job

    overrides = _miniature(path, tmp_path / "runs", local)
    cfg = load_job(path, overrides)
    todo = [m for m in cfg.methods if _signature(cfg, m) not in _seen]
    if not todo:  # every trial of it ran in an earlier file: its data step still runs
        Job(cfg).preflight()
        return
    cfg = load_job(path, overrides + ["methods=" + json.dumps([m.model_dump(mode="json", exclude_unset=True)
                                                               for m in todo])])
    results = Job(cfg).run()
    assert len(results) == len(cfg.trials()) * len(cfg.variants())
    for r in results:
        assert 0.0 <= r.win.win_rate <= 1.0, r
    _seen.update(_signature(cfg, m) for m in todo)
