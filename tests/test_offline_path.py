"""A user's own data, offline, through the real ``props-ray`` command: a model built from their text, a judge
trained on a split kept apart, then a private job judged by it."""

import json
import random
import subprocess
import sys

import yaml

GOOD = ("thank", "you", "gladly", "here", "is", "help", "kindly", "sure")
BAD = ("no", "go", "away", "never", "rude", "stop", "ugh", "whatever")


def _pairs(path, n, seed):
    """Pairs whose chosen response is polite words and rejected rude ones: a judge can learn it."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        prompt = f"User asks about {rng.choice(['cats', 'rain', 'maps', 'tea', 'jazz'])} number {i % 50}:"
        rows.append({"id": f"{path.stem}-{i}", "prompt": prompt,
                     "chosen": " ".join(rng.choices(GOOD, k=5)), "rejected": " ".join(rng.choices(BAD, k=5))})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _cli(*args, cwd):
    return subprocess.run([sys.executable, "-m", "props_ray.cli", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=900)


def test_init_model_sft_a_judge_then_a_private_job(tmp_path):
    public, private = _pairs(tmp_path / "public.jsonl", 640, 0), _pairs(tmp_path / "private.jsonl", 160, 1)
    done = _cli("init-model", str(public), "--out", "base", "--hidden-size", "32", "--num-heads", "2",
                "--vocab-size", "400", "--min-frequency", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    job = {"name": "own-data", "output_dir": "runs", "stages": 2,
           "data": {"source": str(private), "eval_prompts": 8, "max_prompt_length": 16, "max_response_length": 12},
           "model": {"name": "ref"}, "eval": {"judge": "judge", "samples_per_prompt": 1, "max_new_tokens": 8},
           "train": {"num_workers": 2, "batch_size": 16, "epochs": 2, "lr": 0.01},
           "privacy": {"epsilons": [1], "secure_randomness": True},
           "methods": [{"method": "nonprivate"}, {"method": "rr"}],
           "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db"}}
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))

    done = _cli("sft", "job.yaml", "--set", "model.name=base", "--data", str(public), "--out", "ref", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    sft = json.loads((tmp_path / "ref" / "sft.json").read_text())
    assert sft["examples"] == 640 and sft["epsilon"] is None and sft["privacy"].startswith("none")
    done = _cli("sft", "job.yaml", "--set", "model.name=base", "--data", str(public), "--out", "ref-dp",
                "--epsilon", "2", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    dp = json.loads((tmp_path / "ref-dp" / "sft.json").read_text())
    assert 1.5 < dp["epsilon"] <= 2.0 and "the example as the unit" in dp["privacy"]

    refused = _cli("reward-model", "job.yaml", "--data", str(private), "--out", "judge", cwd=tmp_path)
    assert refused.returncode == 2 and "the job's own preference data" in refused.stderr, refused.stderr
    assert "Traceback" not in refused.stderr

    done = _cli("reward-model", "job.yaml", "--data", str(public), "--out", "judge", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    info = json.loads((tmp_path / "judge" / "judge.json").read_text())
    assert info["held_out_pairs"] + info["train_pairs"] == 640 and info["held_out_pairs"] > 30
    assert info["held_out_accuracy"] > 0.9, info  # polite beats rude, on pairs it never saw

    done = _cli("run", "job.yaml", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    table = done.stdout[done.stdout.index("trial "):]
    assert "nonprivate" in table and "rr-eps1" in table and "win rate" in table
