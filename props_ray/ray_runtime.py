"""Connecting to Ray: the cluster named by RAY_ADDRESS, or an embedded local instance."""

from __future__ import annotations

import contextlib
import logging
import os

log = logging.getLogger(__name__)

# Keep worker output to what a user wants to read: our progress lines and real errors.
# Ray Train's controller: poll workers more often (a stage finishes sooner) and skip the
# preemption watcher actor, which only matters on spot capacity.
# Train workers' print() stays print(): Ray Train's patch would send each line to the driver twice,
# once through stdout and once through its logger.
TRAIN_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
             "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
QUIET_ENV = {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1", "TRANSFORMERS_VERBOSITY": "error",
             "HF_HUB_DISABLE_PROGRESS_BARS": "1", "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning"}


def verbose() -> bool:
    """``props-ray --verbose``: Ray's own worker output and library logs reach the console."""
    return os.environ.get("PROPS_RAY_VERBOSE", "") not in ("", "0")


def cluster_address() -> str | None:
    """The Ray cluster this process joins (``RAY_ADDRESS``), or None for an embedded local instance."""
    return os.environ.get("RAY_ADDRESS") or None


def ensure_ray(num_workers: int = 2, cpus_per_worker: float = 1.0) -> None:
    """Quiet by default: workers' output is not forwarded to the driver (progress travels through
    :mod:`props_ray.progress`, and a failure still raises here with its worker's traceback)."""
    import ray

    if ray.is_initialized():
        return
    loud = verbose()
    for k, v in TRAIN_ENV.items():
        os.environ.setdefault(k, v)
    env = {"env_vars": {**QUIET_ENV, **TRAIN_ENV, "OMP_NUM_THREADS": "1",
                        **{k: v for k, v in os.environ.items() if k.startswith("PROPS_RAY_")}}}
    address = cluster_address()
    if address:
        # Inside a Ray job (ray job submit / props-ray submit) the job has a runtime_env of its own:
        # merge ours into it rather than have Ray refuse the second one.
        os.environ.setdefault("RAY_OVERRIDE_JOB_RUNTIME_ENV", "1")
        ray.init(address=address, runtime_env=env, log_to_driver=loud,
                 logging_level=logging.INFO if loud else logging.ERROR)
        log.info("connected to the Ray cluster at %s", address)
    else:
        # Logical CPUs: the training workers, one Ray Data actor, and the train controller, even on 2 cores.
        cpus = max(os.cpu_count() or 1, int(num_workers * cpus_per_worker) + 2)
        # Worker processes the raylet starts at once: one per logical CPU rather than per core. A job's
        # shared training worker group, its controller and Ray Data's actors stay up together, and on
        # 2 cores Ray would otherwise print a warning about their number to the console.
        os.environ.setdefault("RAY_worker_maximum_startup_concurrency", str(cpus))
        # The workers' variables go in the environment the raylet starts with, which every worker it
        # starts inherits, not in a job runtime_env: workers of a runtime_env are a pool of their own, so
        # the raylet's prestarted workers would sit unused and every actor and task process (the train
        # controller, the worker group's actors, Ray Data's tasks) would start cold.
        # The dashboard serves the state API that Ray Train's placement-group cleaner polls.
        with environment_set(env["env_vars"]):
            ray.init(num_cpus=cpus, include_dashboard=True, log_to_driver=loud,
                     configure_logging=True, logging_level=logging.INFO if loud else logging.ERROR)
        log.info("started a local Ray instance with %d logical CPUs", cpus)
    quiet_ray_libraries()


@contextlib.contextmanager
def environment_set(values: dict[str, str]):
    """``os.environ`` updated with ``values`` within the block (for processes started there), restored
    after it: this process keeps its own (its torch threads, its warnings)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def check_gpus(num_workers: int, resources: dict, local: bool) -> str | None:
    """``train.use_gpu`` on this cluster, whose logical resources are ``resources``: every Ray Train
    worker takes one whole GPU (two DDP processes cannot share a card under NCCL). A local Ray
    instance can never gain a GPU, so too few is a :class:`~props_ray.config.ConfigError`, raised
    before any training; a cluster may add GPU nodes when Ray Train asks (its autoscaler), so there it
    is a warning, returned."""
    from props_ray.config import ConfigError

    have = int(resources.get("GPU", 0))
    if have >= num_workers:
        return None
    where = "this machine" if local else "the Ray cluster"
    need = (f"train.use_gpu: true needs {num_workers} GPU{'s' if num_workers > 1 else ''} (one per worker, "
            f"train.num_workers = {num_workers})")
    if local:
        fix = f"set train.num_workers to {have} or fewer" if have else "set train.use_gpu: false"
        raise ConfigError(f"{need}, and {where} has {have}: {fix}")
    return f"{need}, and {where} has {have} now: Ray Train waits until its autoscaler adds them"


def quiet_ray_libraries() -> None:
    """No Ray Data progress bars or info logs in this process (the driver, or a trial task)."""
    from ray.data import DataContext

    level = logging.INFO if verbose() else logging.ERROR
    logging.getLogger("ray.data").setLevel(level)
    logging.getLogger("ray.train").setLevel(level)
    DataContext.get_current().enable_progress_bars = False
