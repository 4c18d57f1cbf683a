"""The local Ray instance (props_ray/ray_runtime.py): its workers get the job's variables from the
raylet's environment, not from a job runtime_env, so the raylet's prestarted workers serve the job."""

import os

from props_ray.ray_runtime import QUIET_ENV, TRAIN_ENV, environment_set


def test_workers_inherit_the_variables_and_the_job_has_no_runtime_env_of_its_own(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0)
    def worker_env(keys):
        return {k: os.environ.get(k) for k in keys}

    want = {**QUIET_ENV, **TRAIN_ENV, "OMP_NUM_THREADS": "1"}
    assert ray.get(worker_env.remote(list(want))) == want
    # a runtime_env would put every task and actor of the job in a worker pool of its own
    assert ray.get_runtime_context().runtime_env == {}


def test_the_variables_are_set_for_rays_start_only(monkeypatch):
    # the driver keeps its own environment (its torch threads, its warnings) after Ray's start
    monkeypatch.setenv("PROPS_RAY_TEST_KEPT", "mine")
    monkeypatch.delenv("PROPS_RAY_TEST_UNSET", raising=False)
    with environment_set({"PROPS_RAY_TEST_KEPT": "ray's", "PROPS_RAY_TEST_UNSET": "1"}):
        assert os.environ["PROPS_RAY_TEST_KEPT"] == "ray's" and os.environ["PROPS_RAY_TEST_UNSET"] == "1"
    assert os.environ["PROPS_RAY_TEST_KEPT"] == "mine" and "PROPS_RAY_TEST_UNSET" not in os.environ
