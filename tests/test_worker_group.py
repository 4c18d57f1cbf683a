"""The job's shared Ray Train worker group (props_ray/train/worker_group.py): every training of a job
in one worker group trains exactly what a worker group per run trains. Real Ray, Ray Train, Ray Data
and MLflow."""

import json
from pathlib import Path

import pytest

from props_ray.config import validate_job
from props_ray.driver import Job
from props_ray.train.worker_group import shared_group_fits


def _stage_rows(cfg, trial: str) -> dict:
    """Stage -> its checkpoint's directory and the rows of its metrics.jsonl (every logged step)."""
    state = json.loads((cfg.job_dir / "trials" / trial / "state.json").read_text())
    return {k: (Path(s["path"]), [json.loads(x) for x in (Path(s["path"]) / "metrics.jsonl").read_text().splitlines()])
            for k, s in state["stages"].items()}


def test_shared_worker_group_trains_what_a_group_per_run_trains(ray_local, tiny_job_raw, tmp_path):
    # PROPS (two DPO orders with a relabel between them, the second from the first's adapter) and
    # DP-RLHF (a DP reward model, then DP-PPO's loop): four trainings, in one worker group or in four.
    results, cfgs = {}, {}
    for mode in ("per_run", "shared"):
        raw = json.loads(json.dumps(tiny_job_raw))
        raw.update({"name": f"group-{mode}", "output_dir": str(tmp_path / mode),
                    "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/{mode}.db"},
                    "methods": [{"method": "props"}, {"method": "dprlhf"}]})
        raw["train"] = {**raw["train"], "epochs": 2, "worker_group": mode}
        cfgs[mode] = validate_job(raw)
        results[mode] = Job(cfgs[mode]).run()

    for trial in ("props-mle-eps0.5", "dprlhf-central-eps0.5"):
        runs = {mode: _stage_rows(cfgs[mode], trial) for mode in cfgs}
        assert sorted(runs["shared"]) == sorted(runs["per_run"]) == ["1", "2"]
        for k in runs["shared"]:
            shared, per_run = runs["shared"][k][1], runs["per_run"][k][1]
            assert [r["step"] for r in shared] == [r["step"] for r in per_run] and shared
            for a, b in zip(shared, per_run):  # the same shards, seeds and start: the same training
                for key in ("loss", "epsilon", "reward", "kl"):
                    if key in b:
                        assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-7), (trial, k, a, b)
    for a, b in zip(results["shared"], results["per_run"]):
        assert a.win.win_rate == pytest.approx(b.win.win_rate) and a.extra["reward_mean"] == pytest.approx(
            b.extra["reward_mean"])

    # where they ran: every checkpoint of the shared job in its one Ray Train run, one run per training otherwise
    def run_dirs(cfg):
        return {p.parent for trial in ("props-mle-eps0.5", "dprlhf-central-eps0.5")
                for p, _ in _stage_rows(cfg, trial).values()}
    assert run_dirs(cfgs["shared"]) == {(cfgs["shared"].job_dir / "train" / "worker-group").resolve()}
    assert len(run_dirs(cfgs["per_run"])) == 4


def test_the_group_is_shared_only_where_batch_inference_has_resources_beside_it(tiny_job_raw):
    def cfg(**train):
        raw = json.loads(json.dumps(tiny_job_raw))
        raw["train"] = {**raw["train"], **train}
        return validate_job(raw)

    assert shared_group_fits(cfg(), cluster_cpus=3)  # 2 workers of 1 CPU, and one CPU for Ray Data
    assert not shared_group_fits(cfg(), cluster_cpus=2)  # relabels would wait for the group forever
    assert not shared_group_fits(cfg(use_gpu=True), cluster_cpus=64)  # inference needs the GPUs between runs
    assert not shared_group_fits(cfg(use_gpu=True, worker_group="shared"), cluster_cpus=64)
    assert not shared_group_fits(cfg(worker_group="per_run"), cluster_cpus=64)
    assert shared_group_fits(cfg(worker_group="shared"), cluster_cpus=2)  # the user's call


def test_trials_at_once_are_bounded_by_cpus_and_with_use_gpu_by_gpus(tiny_job_raw):
    from props_ray.driver import trial_concurrency

    def cfg(sweep=None, **train):
        raw = json.loads(json.dumps(tiny_job_raw))
        raw["train"] = {**raw["train"], **train}
        if sweep:
            raw["sweep"] = sweep
        return validate_job(raw)

    # each trial: 2 workers of 1 CPU and an inference actor
    assert trial_concurrency(cfg(), 7, {"CPU": 16}) == 5
    assert trial_concurrency(cfg(), 3, {"CPU": 16}) == 3
    assert trial_concurrency(cfg(), 7, {"CPU": 2}) == 1  # never fewer than one
    assert trial_concurrency(cfg(), 7, {"CPU": 16, "GPU": 1}) == 5  # on CPUs the GPUs do not count
    # with use_gpu every worker holds a card: 4 GPUs hold two trials of 2 workers, 1 GPU one trial
    assert trial_concurrency(cfg(use_gpu=True), 7, {"CPU": 16, "GPU": 4}) == 2
    assert trial_concurrency(cfg(use_gpu=True, num_workers=1), 7, {"CPU": 16, "GPU": 1}) == 1
    assert trial_concurrency(cfg(use_gpu=True, num_workers=1), 7, {"CPU": 16, "GPU": 8}) == 7
    assert trial_concurrency(cfg(sweep={"max_concurrent_trials": 3}, use_gpu=True), 7, {"CPU": 2}) == 3


def test_use_gpu_with_too_few_gpus_is_refused_locally_and_a_warning_on_a_cluster():
    from props_ray.config import ConfigError
    from props_ray.ray_runtime import check_gpus

    assert check_gpus(2, {"CPU": 16, "GPU": 2}, local=True) is None
    assert check_gpus(1, {"CPU": 16, "GPU": 8}, local=False) is None
    with pytest.raises(ConfigError, match=r"needs 2 GPUs .*train\.num_workers = 2.*has 1: set train\.num_workers "
                                          r"to 1 or fewer"):
        check_gpus(2, {"CPU": 16, "GPU": 1}, local=True)
    with pytest.raises(ConfigError, match=r"has 0: set train\.use_gpu: false"):
        check_gpus(1, {"CPU": 16}, local=True)
    warning = check_gpus(4, {"CPU": 16, "GPU": 2}, local=False)  # an autoscaler may add GPU nodes
    assert "has 2 now" in warning and "autoscaler" in warning


def test_a_rows_dataset_has_a_block_per_worker_and_its_shards_partition_the_rows(ray_local):
    import numpy as np

    from props_ray.train.worker_group import rows_dataset, split_equally

    rows = [{"i": i, "ids": np.arange(3) + i} for i in range(101)]
    ds = rows_dataset(rows, 2)
    assert ds.num_blocks() == 2  # not from_items' default of 200
    shards = split_equally({"d": ds}, 2)["d"]
    seen = [sorted(r["i"] for r in shard.take_all()) for shard in shards]
    assert [len(s) for s in seen] == [50, 50]  # equal shards: one row is dropped, as split(equal=True) does
    assert not set(seen[0]) & set(seen[1])
    assert all(list(r["ids"]) == [r["i"], r["i"] + 1, r["i"] + 2] for shard in shards for r in shard.take_all())
    assert rows_dataset(rows[:1], 4).count() == 1  # fewer rows than workers: one block, nothing lost


def test_an_orders_reports_are_ray_trains_own_without_waiting_for_its_controller(ray_local, tiny_job_raw, tmp_path):
    """Rank 0 hands the driver the checkpoints it reported as it reported them; at the order's end they
    are what Ray Train's controller registers for the order (checked in the worker, after waiting for it)."""
    from props_ray.train.worker_group import SharedWorkerGroup

    def loop(config):  # three checkpoints, as the training loops report them
        import ray.train

        from props_ray.train import worker_group
        from props_ray.train.loop import report_checkpoint

        worker_group.checkpoint_to_resume(config)
        rank = ray.train.get_context().get_world_rank()
        for epoch in range(3):
            report_checkpoint({"order": config["order"], "epoch": epoch}, rank,
                              lambda d, e=epoch: (d / "state.txt").write_text(f"{config['order']} {e}"), [])
        registered = worker_group.as_rows(worker_group.reported_under(config["order"]))
        if rank == 0 and registered != worker_group._order_reports:
            raise AssertionError(f"{worker_group._order_reports} != Ray Train's {registered}")

    raw = json.loads(json.dumps(tiny_job_raw))
    raw.update({"name": "order-reports", "output_dir": str(tmp_path)})
    group = SharedWorkerGroup(validate_job(raw), "order-reports")
    try:
        first = group.run(loop, {"order": "first"}, {})
        second = group.run(loop, {"order": "second"}, {})
        # On a local instance no run has Ray Train's placement-group cleaner (it would poll the state
        # API every second for the whole job); the same query finds the run's controller.
        from ray.util.state import list_actors

        assert list_actors(filters=[("class_name", "=", "TrainController")], raise_on_missing_output=False)
        assert not list_actors(filters=[("class_name", "=", "PlacementGroupCleaner")], raise_on_missing_output=False)
    finally:
        group.close()
    for order, reports in (("first", first), ("second", second)):
        assert [m["epoch"] for _, m in reports] == [0, 1, 2] and {m["order"] for _, m in reports} == {order}
        assert [(Path(p) / "state.txt").read_text() for p, _ in reports] == [f"{order} {e}" for e in range(3)]
    assert len({p for p, _ in first + second}) == 6


class _Unloadable:
    """An object whose unpickling raises: it can be put in the object store, never loaded."""

    def __reduce__(self):
        return (_refuse, ())


def _refuse():
    raise RuntimeError("an order's payload was deserialized")


def test_the_orders_actor_passes_an_order_on_without_deserializing_it(ray_local):
    """The Orders actor holds an order's object reference, not its contents: it never imports the
    training loop's modules or Ray Data's (the shards), so the first order does not wait for them."""
    import ray

    from props_ray.train.worker_group import _orders_actor

    orders = _orders_actor().remote()
    try:
        payload = ray.put(_Unloadable())
        seq = ray.get(orders.submit.remote([payload]))
        taken, (ref,) = ray.get(orders.next.remote(0))
        assert taken == seq == 1 and ref == payload
        with pytest.raises(Exception, match="deserialized"):  # what a worker would load, and the actor did not
            ray.get(ref)
    finally:
        ray.kill(orders)
