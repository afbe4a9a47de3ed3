"""Workers placed by Ray and scaled with the queue, on a real local Ray cluster whose two
GPUs are pretend ones (declared to Ray; the workers run on the CPU), against the test
PostgreSQL queue: the queue a cluster's workers share."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from backend.apps.cluster.controller import Controller, ScalePolicy, worker_overrides
from backend.queue import jobs
from backend.queue.cluster import PoolShape
from backend.queue.db import JobState
from tests.conftest import queue_on
from tests.test_worker_exit import wait_until, with_slow_plugin

ray = pytest.importorskip("ray", reason="ray is not installed (pip install '.[cluster]')")
ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray for the module: 4 CPUs, 2 pretend GPUs, 2 of a custom `h100`."""
    ray.init(num_cpus=4, num_gpus=2, resources={"h100": 2}, include_dashboard=False,
             log_to_driver=False, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    yield
    ray.shutdown()


@pytest.fixture
def slow_settings(settings, tmp_path):
    return with_slow_plugin(settings, tmp_path)


def _controller(settings, pool: PoolShape, max_workers: int, idle_exit_s: float):
    from backend.apps.cluster.ray_pool import RayPool

    engine = RayPool(pool, worker_overrides(settings, pool), idle_exit_s=idle_exit_s,
                     resources={"h100": 1})
    return Controller(settings, pool, engine, ScalePolicy(max_workers=max_workers,
                                                          idle_exit_s=idle_exit_s,
                                                          interval_s=0.3))


def test_ray_workers_scale_from_zero_run_a_data_parallel_job_and_go(
        ray_cluster, slow_settings, factory, with_tiny):
    settings = slow_settings
    pool = PoolShape("ray-test", labels=("h100",), gpus=1)
    control = _controller(settings, pool, max_workers=2, idle_exit_s=2.0)
    assert control.step() == 0 and control.engine.placed() == 0  # empty queue: no GPU held
    (job,) = queue_on(factory).submit([jobs.NewJob(  # 4 s a shard: both workers get one
        "builtin:tiny", "slow_echo", {"items": 8, "seconds": 1.0}, data_parallel=2,
        worker_label="h100")])
    stop = threading.Thread(target=control.run, args=(done := threading.Event(),))
    stop.start()
    try:
        wait_until(lambda: control.engine.placed() == 2, 30, "two Ray workers")
        wait_until(lambda: ray.available_resources().get("GPU", 0) == 0, 60,
              "each worker to hold its GPU")
        wait_until(lambda: queue_on(factory).get(job.id).state in ("succeeded", "failed"), 180,
              "the job")
        view = queue_on(factory).get(job.id)
        assert view.state == JobState.SUCCEEDED.value, view.error
        samples, total = queue_on(factory).samples(job.id)
        assert sorted(s.idx for s in samples) == list(range(8)) and total == 8
        ran_on = {s.worker_id for s in queue_on(factory).shards(job.id)}
        assert len(ran_on) == 2 and all(w.startswith("ray-test-") for w in ran_on)
        wait_until(lambda: control.book.recent(1)[0].placed == 0, 60, "the idle workers to exit")
        wait_until(lambda: ray.available_resources().get("GPU", 0) == 2, 30, "GPUs back in Ray")
    finally:
        done.set()
        stop.join(60)
    seen = [(d.queued, d.placed, d.started) for d in reversed(control.book.recent(50))]
    assert seen[0] == (0, 0, 0)  # 0 held …
    assert any(started == 2 for _, _, started in seen)  # … 2 asked for …
    assert seen[-1][1] == 0  # … and 0 again


def test_killing_a_ray_worker_mid_job_loses_nothing(ray_cluster, slow_settings, factory,
                                                    with_tiny):
    settings = slow_settings
    pool = PoolShape("ray-kill", gpus=1)
    control = _controller(settings, pool, max_workers=1, idle_exit_s=2.0)
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "slow_echo",
                                                   {"items": 10, "seconds": 0.3})])
    runner = threading.Thread(target=control.run, args=(done := threading.Event(),))
    runner.start()
    try:
        # a Ray actor's start, imports and model load first: a minute on two loaded cores
        wait_until(lambda: queue_on(factory).get(job.id).progress_done >= 2, 150,
                   "two samples")
        ((victim_id, actor),) = control.engine.workers().items()
        ray.kill(actor)  # as a node lost: no give-back, the lease expires
        wait_until(lambda: queue_on(factory).get(job.id).state in ("succeeded", "failed"), 120,
              "the job to resume and finish")
    finally:
        done.set()
        runner.join(60)
    view = queue_on(factory).get(job.id)
    assert view.state == JobState.SUCCEEDED.value, view.error
    assert view.worker_id != victim_id and view.attempts == 2
    samples, total = queue_on(factory).samples(job.id)
    assert sorted(s.idx for s in samples) == list(range(10)) and total == 10
