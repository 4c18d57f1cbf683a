import os
from pathlib import Path

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


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
