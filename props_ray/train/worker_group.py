"""One Ray Train worker group for every training run of a job.

A Ray Train run costs about 8 s of start-up on a 2-core machine (its controller, placement group,
worker processes, the process group) plus the workers' imports and model build, whatever it trains.
A job on the embedded task trains a dozen small runs, so on CPUs the job keeps one long-lived
``TorchTrainer`` instead: its workers wait for *orders* (a training loop, its config and its
datasets), run each one as they would run it in a run of its own, and report its checkpoints to the
shared run. The driver keeps the recipe's order of work: between orders the workers are idle and the
relabels and evaluations run as Ray Data jobs on the CPUs beside them.

What stays as it was:

- an order's checkpoints are Ray Train checkpoints (model, optimizer, the accountant), tagged with
  the order's name; a worker that fails is restarted by Ray Train (``train.max_failures``) and
  resumes the order from its last checkpoint; a re-run of the job resumes the same way;
- each order's datasets are split across the workers in equal shards (:func:`split_equally`, which a
  training in a run of its own uses too).

The shared group is used where the relabel's and evaluation's Ray Data workers have resources beside
it: without GPUs and with a spare CPU (:func:`shared_group_fits`). On GPUs every run has the worker
group to itself, so that batch inference can take the GPUs between runs.
"""

from __future__ import annotations

import asyncio
import threading

#: Set in a training's loop config: its datasets' shards, one per worker, by dataset name.
SHARDS = "_shards"
#: Set in the loop config of an order that runs in the shared worker group.
SHARED_ORDER = "_shared_order"


def split_equally(datasets: dict, num_workers: int) -> dict:
    """Each dataset materialized and split into ``num_workers`` equal shards (``Dataset.split(equal=True)``),
    in the driver.

    Not ``streaming_split``, as Ray Train splits a run's datasets: its coordinator is an actor, so every
    dataset of every training started a Ray worker process that imports Ray Data, on the same CPUs as
    the training workers. On 2 cores that cost a 3-stage training 3.1 s of its 8.6 s (2026-12-05).
    A training's partitions are held in the object store while it runs; the workers read their shard
    without a coordinator, and a restarted worker reads the same shard again."""
    return {name: ds.split(num_workers, equal=True) for name, ds in datasets.items()}


def rows_dataset(rows: list[dict], num_workers: int):
    """A Ray Dataset from a list of row dicts, one block per worker (training workers here, batch-inference
    workers in :func:`props_ray.generation.generate`): ``from_items``' default of 200 blocks cost 0.3-0.7 s
    of object-store puts a call on 2 cores, whatever the rows (2026-12-07)."""
    import ray.data

    return ray.data.from_items(rows, override_num_blocks=max(1, min(num_workers, len(rows))))


def dataset_shard(loop_config: dict, name: str):
    """This worker's shard of the dataset ``name`` (:func:`split_equally`)."""
    import ray.train

    return loop_config[SHARDS][name][ray.train.get_context().get_world_rank()]


#: In a shared group's worker, the (path, metrics) of every checkpoint reported under the running
#: order: those Ray Train held for it when the order started (a resumed order's), then each one this
#: process reports. None outside a shared order.
_order_reports: list | None = None


def checkpoint_to_resume(loop_config: dict):
    """The checkpoint a training loop resumes from: the run's latest (its own run), or in a shared
    worker group the latest one reported under this order's name (None: the order starts afresh)."""
    import ray.train

    global _order_reports
    if not loop_config.get(SHARED_ORDER):
        return ray.train.get_checkpoint()
    mine = reported_under(loop_config["order"])
    _order_reports = as_rows(mine)
    return mine[-1].checkpoint if mine else None


def note_reported(metrics: dict) -> None:
    """After this worker's ``ray.train.report`` with a checkpoint: in a shared order, add it (its
    persisted path, which ``ray.train.get_checkpoint`` returns once the report has returned) to the
    order's reports."""
    import ray.train

    if _order_reports is not None:
        _order_reports.append((ray.train.get_checkpoint().path, dict(metrics)))


def _take_order_reports(order: str) -> list:
    """The reports of the order just run, for the driver. Kept as they were reported rather than read
    from Ray Train at the end, which waits for its controller to register the last one at its next
    poll: 0.25 s an order on average (2026-12-07)."""
    global _order_reports
    reports, _order_reports = _order_reports, None
    if reports is None:  # a loop that did not ask to resume: Ray Train's own account
        reports = as_rows(reported_under(order))
    return reports


def reported_under(order: str) -> list:
    """The checkpoints (``ReportedCheckpoint``) the run holds for the training ``order``, in the order
    they were reported."""
    import ray.train

    return [r for r in ray.train.get_all_reported_checkpoints() if r.metrics.get("order") == order]


def as_rows(reported: list) -> list[tuple[str, dict]]:
    """``ReportedCheckpoint``s as what the driver gets for an order: (persisted path, metrics) each."""
    return [(r.checkpoint.path, dict(r.metrics)) for r in reported]


def run_config(cfg, name: str):
    """The ``RunConfig`` of a training run (a shared group's, or one training's): the job's storage,
    ``train.max_failures``, every checkpoint kept."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig

    return RunConfig(name=name, storage_path=str((cfg.job_dir / "train").resolve()),
                     failure_config=FailureConfig(max_failures=cfg.train.max_failures),
                     checkpoint_config=CheckpointConfig(num_to_keep=None))


def shared_group_fits(cfg, cluster_cpus: float) -> bool:
    """Whether a job's trainings share one worker group: never on GPUs; 'shared' or 'per_run' as
    ``train.worker_group`` says; 'auto' where the cluster has a CPU beside the group for batch inference."""
    mode = cfg.train.worker_group
    if cfg.train.use_gpu or mode == "per_run":
        return False
    return mode == "shared" or cluster_cpus >= cfg.train.num_workers * cfg.train.cpus_per_worker + 1


def _orders_actor():
    import ray

    @ray.remote(num_cpus=0)
    class Orders:
        """The orders of a shared worker group, one at a time: the driver submits one and waits for its
        result; every worker takes it, runs it, and rank 0 posts its checkpoints.

        An order is ``[ref]``, the object-store reference of its (loop, loop config) in a list, which
        Ray passes on as it is: this actor never deserializes an order, so it never imports the
        training loop's modules (torch among them) or Ray Data's for the order's shards, about 4
        CPU-seconds on the first order's critical path."""

        def __init__(self):
            self.seq, self.order, self.result, self.closed = 0, None, None, False
            self.changed = asyncio.Condition()

        async def submit(self, order: list) -> int:
            async with self.changed:
                self.seq, self.order, self.result = self.seq + 1, order, None
                self.changed.notify_all()
                return self.seq

        async def next(self, after: int):
            """The order after ``after`` (a worker's last finished one), waiting for it; None when closed.
            A restarted worker (``after`` 0) gets the order in flight again."""
            async with self.changed:
                await self.changed.wait_for(
                    lambda: self.closed or (self.order is not None and self.result is None and self.seq > after))
                return None if self.closed else (self.seq, self.order)

        async def finish(self, seq: int, result: list) -> None:
            async with self.changed:
                if seq == self.seq:
                    self.result = result
                    self.changed.notify_all()

        async def result_of(self, seq: int) -> list:
            async with self.changed:
                await self.changed.wait_for(lambda: self.seq == seq and self.result is not None)
                return self.result

        async def close(self) -> None:
            async with self.changed:
                self.closed = True
                self.changed.notify_all()

    return Orders


def serve_per_worker(config: dict) -> None:
    """The shared run's train function: take each order, run its loop, and on rank 0 post the
    checkpoints the order reported (their paths and metrics)."""
    import ray
    import ray.train

    orders, last = config["orders"], 0
    rank = ray.train.get_context().get_world_rank()
    while True:
        order = ray.get(orders.next.remote(last))
        if order is None:
            return
        seq, (ref,) = order
        loop, loop_config = ray.get(ref)
        loop(loop_config)
        last = seq
        if rank == 0:
            ray.get(orders.finish.remote(seq, _take_order_reports(loop_config["order"])))


def trainer_class(trainer_cls):
    """``trainer_cls`` without Ray Train's placement-group cleaner on an embedded local Ray instance.

    The cleaner is a detached actor that asks the state API (the dashboard) every second whether the
    run's controller is alive, to release the placement group if the driver dies without closing the
    run. A local instance dies with its driver, placement groups and all, so there it only costs a
    process start and a poll a second, for the whole job. On a cluster (``RAY_ADDRESS``) it stays. Should
    Ray Train's hook for its default callbacks change, the trainer is used as it is."""
    from props_ray.ray_runtime import cluster_address

    try:
        from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback
    except ImportError:
        return trainer_cls
    if cluster_address() is not None or not hasattr(trainer_cls, "_create_default_callbacks"):
        return trainer_cls

    class LocalTrainer(trainer_cls):
        def _create_default_callbacks(self):
            return [c for c in super()._create_default_callbacks()
                    if not isinstance(c, PlacementGroupCleanerCallback)]

    return LocalTrainer


class SharedWorkerGroup:
    """The job's worker group (a ``TorchTrainer`` whose ``fit`` runs in a driver thread until
    :meth:`close`). :meth:`run` trains one order and returns its reported checkpoints."""

    def __init__(self, cfg, name: str):
        from ray.train import ScalingConfig
        from ray.train.torch import TorchTrainer

        self.num_workers = cfg.train.num_workers
        self.resources = {"CPU": cfg.train.cpus_per_worker}
        self.orders = _orders_actor().remote()
        self.trainer = trainer_class(TorchTrainer)(
            serve_per_worker, train_loop_config={"orders": self.orders},
            scaling_config=ScalingConfig(num_workers=self.num_workers, use_gpu=False,
                                         resources_per_worker=self.resources),
            run_config=run_config(cfg, name))
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, name="shared-worker-group", daemon=True)
        self.thread.start()

    def _fit(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as e:  # noqa: BLE001 - raised in the driver by the order that waits on it
            self.error = e

    def serves(self, cfg) -> bool:
        """Whether an order of ``cfg`` can run here (the same workers and resources)."""
        return (cfg.train.num_workers == self.num_workers and not cfg.train.use_gpu
                and {"CPU": cfg.train.cpus_per_worker} == self.resources)

    def run(self, loop, loop_config: dict, datasets: dict) -> list[tuple[str, dict]]:
        """Run the training loop ``loop`` (a train function) with ``loop_config`` (its ``order`` names it)
        on ``datasets`` (name -> Ray Dataset, split equally over the workers); returns the (path,
        metrics) of every checkpoint reported under the order's name, in order."""
        import ray

        order = {**loop_config, SHARDS: split_equally(datasets, self.num_workers), SHARED_ORDER: True}
        payload = ray.put((loop, order))  # held here until the order's result is in (a restarted worker reads it)
        seq = ray.get(self.orders.submit.remote([payload]))
        result = self.orders.result_of.remote(seq)
        while True:
            ready, _ = ray.wait([result], timeout=0.2)
            if ready:
                return ray.get(result)
            if not self.thread.is_alive():
                if self.error is not None:
                    raise self.error
                raise RuntimeError("the shared training worker group ended before its order finished")

    def close(self) -> None:
        import ray

        if self.thread.is_alive():
            ray.get(self.orders.close.remote())
            self.thread.join()
        ray.kill(self.orders)
        if self.error is not None:
            raise self.error


_active: SharedWorkerGroup | None = None
_opened: tuple | None = None  # the arguments of the group the open ``with`` block starts on first use


def active() -> SharedWorkerGroup | None:
    """The job's shared worker group while a :class:`shared_worker_group` block is open in this process,
    started by the first order that asks for it."""
    global _active
    if _active is None and _opened is not None:
        _active = SharedWorkerGroup(*_opened)
    return _active


class shared_worker_group:  # noqa: N801 - a context manager, used as ``with shared_worker_group(...)``
    """Within the ``with`` block, trainings share one worker group (started when the first one needs it;
    nothing when ``enabled`` is false); it is closed at the block's end."""

    def __init__(self, cfg, name: str, enabled: bool):
        self.args, self.enabled = (cfg, name), enabled

    def __enter__(self):
        global _opened
        if self.enabled:
            _opened = self.args
        return self

    def start(self) -> None:
        """Start the group now (its start-up overlaps the caller's next steps) rather than at the first
        training; nothing when the block is not enabled."""
        if self.enabled:
            active()

    def __exit__(self, *exc):
        global _active, _opened
        group, _active, _opened = _active, None, None
        if group is not None:
            try:
                group.close()
            except BaseException:
                if exc[0] is None:  # an error of the block itself is the one to see
                    raise
        return False
