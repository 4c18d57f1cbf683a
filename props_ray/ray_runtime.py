"""Connecting to Ray: the cluster named by RAY_ADDRESS, or an embedded local instance."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def ensure_ray(num_workers: int = 2, cpus_per_worker: float = 1.0) -> None:
    import ray

    if ray.is_initialized():
        return
    env = {"env_vars": {"TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
                        "OMP_NUM_THREADS": "1",
                        # Ray Train V2 keeps its own run state; tell it the job's output lives on local disk
                        **{k: v for k, v in os.environ.items() if k.startswith("PROPS_RAY_")}}}
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, runtime_env=env, log_to_driver=True)
        log.info("connected to the Ray cluster at %s", address)
        return
    # Logical CPUs: the training workers, one Ray Data actor, and the train controller, even on 2 cores.
    cpus = max(os.cpu_count() or 1, int(num_workers * cpus_per_worker) + 2)
    ray.init(num_cpus=cpus, include_dashboard=False, runtime_env=env, log_to_driver=True,
             configure_logging=True, logging_level=logging.WARNING)
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    log.info("started a local Ray instance with %d logical CPUs", cpus)
