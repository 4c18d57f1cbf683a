"""A measurement in a fresh Python process: ``python -m MODULE ARGS``, whose last line of output is
its result as JSON. The bench times both sides of a comparison in processes that start alike,
never in its own, which has run every section before."""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_json_child(module: str, *args: str) -> dict:
    """Run ``python -m module *args`` quietly and return its last stdout line, parsed; a failure
    raises with the child's stderr."""
    env = {**os.environ, "TRANSFORMERS_VERBOSITY": "error", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"python -m {module} failed (exit {proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
