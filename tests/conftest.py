import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _tracking_uri_restored():
    """``mlflow.set_tracking_uri`` (the Tracker calls it) also sets $MLFLOW_TRACKING_URI, which a later
    test's subprocess would inherit and report to: each test gets back the variable it started with."""
    before = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@pytest.fixture(scope="session")
def ray_local():
    """One local Ray instance for the tests that need it (real Ray, not a mock)."""
    import ray

    from props_ray.ray_runtime import ensure_ray

    ensure_ray(num_workers=2)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_job_raw(tmp_path_factory):
    """A small job on the embedded task, as a dict (tests override what they need)."""
    out = tmp_path_factory.mktemp("runs")
    return {
        "name": "tiny",
        "seed": 0,
        "output_dir": str(out),
        "stages": 2,
        "data": {"num_pairs": 160, "eval_prompts": 16},
        "model": {"sft": {"steps": 60, "examples": 512}},
        "train": {"num_workers": 2, "batch_size": 16, "epochs": 1, "lr": 0.005, "log_every": 2},
        "eval": {"samples_per_prompt": 1},
        "privacy": {"epsilons": [0.5]},
        "methods": [{"method": "nonprivate"}, {"method": "rr"}, {"method": "props"}],
        "tracking": {"tracking_uri": f"sqlite:///{out}/mlflow.db"},
    }


@pytest.fixture(scope="session")
def stage_adapter(tmp_path_factory):
    """A tiny reference model and a LoRA adapter with non-zero weights (so it changes the outputs):
    (base path, adapter path, the embedded task)."""
    import torch

    from props_ray.config import ModelConfig
    from props_ray.embedded.model import build_tiny_model, build_tokenizer
    from props_ray.embedded.task import EmbeddedTask
    from props_ray.modeling import build_policy

    d = tmp_path_factory.mktemp("stage")
    task = EmbeddedTask()
    tok = build_tokenizer(task)
    build_tiny_model(len(tok), 32, 1, 2).save_pretrained(d / "base")
    tok.save_pretrained(d / "base")
    policy = build_policy(str(d / "base"), ModelConfig())
    torch.manual_seed(0)
    with torch.no_grad():
        for n, p in policy.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.5)
    policy.save_pretrained(d / "adapter")
    return str(d / "base"), str(d / "adapter"), task


def pytest_sessionfinish(session, exitstatus):
    session.config._props_ray_exitstatus = int(exitstatus)


def pytest_unconfigure(config):
    """End the process with pytest's own status once its summary is printed.

    Ray, torch and pyarrow leave native threads behind; the interpreter's final teardown has
    crashed with SIGSEGV after every test had passed (exit 139). Skipping that teardown keeps
    the exit status the tests' verdict.
    """
    status = getattr(config, "_props_ray_exitstatus", None)
    if status is not None:
        import sys

        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def tiny_lora_lm(wrap=None):
    """A 1-layer, 32-wide GPT-NeoX with LoRA (attention, MLP and lm_head) in float64, optionally wrapped
    (e.g. with a value head), its LoRA B (and value head) drawn N(0, 0.3) so gradients are non-trivial."""
    import torch
    from peft import LoraConfig, get_peft_model

    from props_ray.embedded.model import build_tiny_model
    from props_ray.modeling import LORA_TARGETS

    torch.manual_seed(0)
    base = build_tiny_model(vocab_size=30, hidden_size=32, num_layers=1, num_heads=2, seed=0)
    lm = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
                                         target_modules=LORA_TARGETS["gpt_neox"] + ["lm_head"]))
    model = (wrap(lm) if wrap else lm).double()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n or "value_head" in n:
                p.normal_(0, 0.3)
    return model
