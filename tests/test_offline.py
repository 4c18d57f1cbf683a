"""Offline start: a BPE tokenizer built on the user's text and a small model of a named architecture."""

import gzip
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from props_ray.modeling import LORA_TARGETS
from props_ray.offline import ARCHITECTURES, build_tokenizer, init_model, model_config

ROOT = Path(__file__).resolve().parents[1]
HH = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

TEXTS = [f"the {w} garden is {a} today" for w in ("red", "blue", "green", "gold") for a in ("calm", "wild")] * 10


def test_tokenizer_round_trips_any_text_and_keeps_rare_strings_out():
    tok = build_tokenizer(TEXTS + ["zyxwvut once"], vocab_size=400, min_frequency=5)
    for text in ("the red garden is calm today", "Ünïcode and 12345 never seen", "zyxwvut once"):
        ids = tok(text).input_ids
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids  # byte-level: nothing is unknown
    assert len(tok(" garden").input_ids) == 1  # frequent (always after a space): a token
    assert len(tok(" zyxwvut").input_ids) > 1  # seen once: not a token, so not in the released vocabulary
    assert (tok.pad_token, tok.eos_token) == ("<pad>", "<eos>")


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_each_architecture_saves_loads_and_has_lora_targets(tmp_path, architecture):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    info = init_model(tmp_path / architecture, TEXTS, architecture, vocab_size=300, min_frequency=2,
                      hidden_size=32, num_layers=1, num_heads=2, max_positions=64)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / architecture)
    tok = AutoTokenizer.from_pretrained(tmp_path / architecture)
    assert model.config.model_type == architecture == info["architecture"]
    assert model.config.vocab_size == len(tok) == info["vocab_size"]
    assert sum(p.numel() for p in model.parameters()) == info["parameters"]
    ids = torch.tensor([tok("the red garden").input_ids])
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    assert set(LORA_TARGETS[architecture]) <= names  # the default LoRA targets exist in the built model


def test_a_bad_size_or_architecture_is_refused():
    with pytest.raises(ValueError, match="multiple of the 3 heads"):
        model_config("gpt2", 100, hidden_size=32, num_heads=3)
    with pytest.raises(ValueError, match="architecture must be one of"):
        model_config("bert", 100)


@pytest.mark.skipif(not HH.exists(), reason="needs ../shared/data")
def test_init_model_cli_on_hh_rlhf(tmp_path):
    out = tmp_path / "model"
    done = subprocess.run([sys.executable, "-m", "props_ray.cli", "init-model", str(HH), "--out", str(out),
                           "--architecture", "llama", "--vocab-size", "1024", "--hidden-size", "32",
                           "--num-heads", "2"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "llama model" in done.stdout and "Traceback" not in done.stderr
    built = json.loads((out / "init-model.json").read_text())
    assert built["vocab_size"] == 1024
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(out)
    with gzip.open(HH, "rt") as f:
        text = json.loads(f.readline())["chosen"]
    assert tok.decode(tok(text).input_ids) == text
    assert len(tok(text).input_ids) < len(text.encode()) / 2  # it learned merges: under 2 bytes a token


def test_split_is_disjoint_complete_and_reproducible(tmp_path):
    import pandas as pd

    from props_ray.data.loaders import load_preferences
    from props_ray.data.split import split_pairs

    pairs = pd.DataFrame({"id": [f"p{i}" for i in range(2000)], "prompt": ["q"] * 2000,
                          "chosen": ["a"] * 2000, "rejected": ["b"] * 2000})
    rest, apart = split_pairs(pairs, 0.3, seed=0)
    assert set(rest["id"]).isdisjoint(apart["id"]) and len(rest) + len(apart) == 2000
    assert abs(len(apart) / 2000 - 0.3) < 0.04  # 4 binomial standard deviations
    again = split_pairs(pairs, 0.3, seed=0)[1]
    assert list(again["id"]) == list(apart["id"])
    assert list(split_pairs(pairs, 0.3, seed=1)[1]["id"]) != list(apart["id"])
    if HH.exists():  # the command, on real data: its two files load back as the same pairs
        done = subprocess.run([sys.executable, "-m", "props_ray.cli", "split", str(HH), "--apart", "a.jsonl",
                               "--rest", "b.jsonl", "--on-bad-row", "skip"], capture_output=True, text=True,
                              cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        a, b = (load_preferences(str(tmp_path / f)).pairs for f in ("a.jsonl", "b.jsonl"))
        whole = load_preferences(str(HH), on_bad_row="skip").pairs
        assert len(a) + len(b) == len(whole) and set(a["id"]).isdisjoint(b["id"])
        assert set(a["chosen"]) | set(b["chosen"]) == set(whole["chosen"])


def test_relative_local_paths_become_absolute(tmp_path, monkeypatch):
    """Ray workers run in other directories: a job's relative model, judge or data path must not reach them
    relative (a model would then be looked up on the hub)."""
    from props_ray.config import JobConfig

    for d in ("base", "judge"):
        (tmp_path / d).mkdir()
    (tmp_path / "pairs.jsonl").write_text("")
    monkeypatch.chdir(tmp_path)
    cfg = JobConfig.model_validate({"name": "x", "methods": [{"method": "rr"}], "model": {"name": "base"},
                                    "eval": {"judge": "judge"}, "data": {"source": "pairs.jsonl"}})
    assert (cfg.model.name, cfg.eval.judge, cfg.data.source) == (
        str(tmp_path / "base"), str(tmp_path / "judge"), str(tmp_path / "pairs.jsonl"))
    hub = JobConfig.model_validate({"name": "x", "methods": [{"method": "rr"}], "model": {"name": "gpt2"},
                                    "eval": {"judge": "OpenAssistant/reward-model"}})
    assert (hub.model.name, hub.eval.judge, hub.data.source) == ("gpt2", "OpenAssistant/reward-model", "embedded")


def test_a_second_split_is_independent_of_the_first():
    import pandas as pd

    from props_ray.data.split import split_pairs

    pairs = pd.DataFrame({"id": [f"p{i}" for i in range(4000)], "prompt": ["q"] * 4000,
                          "chosen": ["a"] * 4000, "rejected": ["b"] * 4000})
    apart = split_pairs(pairs, 0.5, seed=0)[1]
    held = split_pairs(apart, 0.1, seed=0, salt="judge")[1]
    assert abs(len(held) / len(apart) - 0.1) < 0.03  # not 0.2, as one hash for both splits would give


def test_sft_and_judge_runs_are_named_by_the_resolved_output(tmp_path, monkeypatch):
    """A relative --out and the same directory given absolute resume the same Ray Train run; another
    directory does not."""
    from props_ray.train.trainer import run_name_for

    monkeypatch.chdir(tmp_path)
    assert run_name_for("sft", "ref") == run_name_for("sft", tmp_path / "ref")
    assert run_name_for("judge", "./judge") == run_name_for("judge", str(tmp_path / "judge"))
    assert run_name_for("sft", "ref") != run_name_for("sft", "other")
    assert run_name_for("sft", "ref") != run_name_for("judge", "ref")
