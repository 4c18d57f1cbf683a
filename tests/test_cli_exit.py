"""The props-ray command's quick exit (props_ray.cli.exit_now): what the interpreter's own exit does
before its teardown still happens."""

import subprocess
import sys
from pathlib import Path

SCRIPT = """
import atexit, sys, tempfile, threading, time, os
from concurrent.futures import ThreadPoolExecutor
from props_ray.cli import exit_now

idle = ThreadPoolExecutor(1)  # left open, as libraries leave theirs: its thread waits for work
idle.submit(print, "pool ran").result()

kept = tempfile.TemporaryDirectory()  # removed by its finalizer at exit
print(kept.name)
atexit.register(lambda: print("atexit handler ran"))

def late():
    time.sleep(0.5)
    print("non-daemon thread finished")

threading.Thread(target=late).start()
sys.stdout.write("buffered, no newline")
exit_now(int(sys.argv[1]))
print("not reached")
"""


def test_exit_now_joins_threads_stops_pools_runs_atexit_flushes_and_returns_the_status():
    # times out (the test fails) if the idle pool's thread is joined without being told to stop
    out = subprocess.run([sys.executable, "-c", SCRIPT, "3"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 3
    pool, kept = out.stdout.splitlines()[:2]
    assert pool == "pool ran"
    assert "non-daemon thread finished" in out.stdout
    assert "buffered, no newline" in out.stdout and "atexit handler ran" in out.stdout
    assert out.stdout.index("non-daemon thread finished") < out.stdout.index("atexit handler ran")
    assert "not reached" not in out.stdout
    assert not Path(kept).exists()  # the temporary directory's finalizer ran


def test_the_props_ray_command_exits_with_mains_status(tmp_path):
    # a refused job file: main returns 2 with one line on stderr, through the console entry point
    bad = tmp_path / "job.yaml"
    bad.write_text("name: x\\nmethods: [{method: nope}]\\n")
    out = subprocess.run([sys.executable, "-c", "from props_ray.cli import console; console()", "validate",
                          str(bad)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.startswith("error:") and "nope" in out.stderr
