"""Workers sharing a GPU (LBS_WORKERS above the GPU count, or several hosts' workers
against one PostgreSQL): between a claim and the model's load NVML's free memory does
not show the claimed job yet, so each claim reserves what its job was admitted for on
its GPUs, and the other workers of that host on those GPUs subtract it. Real claim
functions against SQLite."""

from __future__ import annotations

import multiprocessing as mp

import pytest

from backend.queue import jobs
from backend.queue.scheduling import Capacity
from tests.conftest import ENGINES, queue_on

both_engines = pytest.mark.parametrize("db_url", ENGINES, indirect=True)

GiB = 2**30
HOST = "gpu-box"


def _register(factory, worker_id, indices, host=HOST):
    gpus = [{"index": i, "name": "H100", "total_bytes": 80 * GiB, "free_bytes": 80 * GiB}
            for i in indices]
    queue_on(factory).workers.register(worker_id, host, 1000, "cuda", gpus=gpus,
                                       gpu_free_bytes=80 * GiB * len(indices))


def _caps(indices, free=80 * GiB, host=HOST):
    return Capacity(gpu_count=len(indices), free_gpu_bytes=(free,) * len(indices),
                    host=host, gpu_indices=tuple(indices))


def _claim(factory, worker_id, indices, **kwargs):
    job = queue_on(factory).claim(worker_id, capacity=_caps(indices, **kwargs))
    return job.id if job else None


def _submit(factory, *sizes):
    return [j.id for j in queue_on(factory).submit([
        jobs.NewJob("m", "gsm8k", {}, memory_bytes=size) for size in sizes])]


@both_engines
def test_a_claimed_job_holds_its_room_until_its_model_has_loaded(factory):
    """NVML says 80 GiB free to both workers on GPU 0; the first claims a 50 GiB job,
    so the second cannot claim another before the first has loaded, then only what is
    left once the loaded weights show in NVML and the job's rest stays reserved."""
    first, second = _submit(factory, 50 * GiB, 50 * GiB)
    _register(factory, "a", [0])
    _register(factory, "b", [0])
    assert _claim(factory, "a", [0]) == first
    assert queue_on(factory).workers.reservations("a") == {"0": 50 * GiB}
    assert _claim(factory, "b", [0]) is None, "both admitted before either loaded"
    # the model (30 GiB of weights) has loaded: NVML shows it; 20 GiB are still to come
    queue_on(factory).workers.reserve("a", {"0": 20 * GiB})
    assert _claim(factory, "b", [0], free=50 * GiB) is None  # 50 - 20 < 50
    queue_on(factory).workers.reserve("a", None)  # the job ended
    assert _claim(factory, "b", [0]) == second


@both_engines
def test_only_live_workers_of_this_host_on_the_same_gpu_count(factory):
    ids = _submit(factory, 50 * GiB, 50 * GiB, 50 * GiB)
    _register(factory, "a", [0])
    _register(factory, "other-gpu", [1])
    _register(factory, "other-host", [0], host="elsewhere")
    assert _claim(factory, "a", [0]) == ids[0]
    assert _claim(factory, "other-gpu", [1]) == ids[1]
    assert _claim(factory, "other-host", [0], host="elsewhere") == ids[2]


@both_engines
def test_a_lost_workers_reservation_is_not_counted(factory):
    from datetime import timedelta

    import sqlalchemy as sa

    from backend.queue.db import WorkerRow, utcnow

    first, second = _submit(factory, 50 * GiB, 50 * GiB)
    _register(factory, "a", [0])
    _register(factory, "b", [0])
    assert _claim(factory, "a", [0]) == first
    with factory.begin() as session:  # a stopped heartbeating long ago
        session.execute(sa.update(WorkerRow).where(WorkerRow.id == "a")
                        .values(heartbeat_at=utcnow() - timedelta(hours=1)))
    assert _claim(factory, "b", [0]) == second


@both_engines
def test_data_parallel_auto_counts_gpus_not_workers(factory):
    """Three idle workers on two GPUs of one host, two CPU workers elsewhere: a job
    spreads over four (one per GPU, one per CPU worker)."""
    _register(factory, "a", [0])
    _register(factory, "b", [0])
    _register(factory, "c", [1])
    for cpu in ("cpu-1", "cpu-2"):
        queue_on(factory).workers.register(cpu, "laptop", 1, "cpu")
    assert queue_on(factory).workers.idle_count() == 4



def _claim_once(url: str, worker_id: str, start, out) -> None:
    from backend.queue.db import session_factory

    factory = session_factory(url)
    start.wait()  # both processes are ready: race from here
    job = queue_on(factory).claim(worker_id, capacity=_caps([0]))
    out.put((worker_id, job.id if job else None))


@both_engines
def test_two_processes_racing_for_one_gpu_claim_one_job(settings, factory):
    """Two worker processes on GPU 0 claim at the same moment, each reading 80 GiB free:
    only one 50 GiB job is claimed, whichever wins (the claims are serialised)."""
    _submit(factory, 50 * GiB, 50 * GiB)
    _register(factory, "w0", [0])
    _register(factory, "w1", [0])
    ctx = mp.get_context("spawn")
    out, start = ctx.Queue(), ctx.Barrier(2)
    procs = [ctx.Process(target=_claim_once, args=(settings.database_url, f"w{i}", start, out))
             for i in range(2)]
    for p in procs:
        p.start()
    results = dict(out.get(timeout=120) for _ in procs)
    for p in procs:
        p.join(30)
    assert sorted(results.values(), key=lambda v: v is None)[1] is None, results
    assert [v for v in results.values() if v is not None], results

def test_two_workers_on_one_gpu_run_two_large_jobs_one_after_the_other(
        settings, factory, with_tiny, monkeypatch):
    """Two real workers on one (pretend, 24 GiB) GPU: the first claims a job admitted
    for 15 GiB; the second, whose GPU reading still says 24 GiB free, does not claim
    the other until the first has finished its job and dropped its reservation."""
    import dataclasses

    from backend.apps.worker import Worker

    shared = dataclasses.replace(settings, simulated_gpu_memory=(24 * GiB,))
    grid = {"context_lengths": [256], "depth_percents": [50], "max_new_tokens": 4}
    first, second = (j.id for j in queue_on(factory).submit([
        jobs.NewJob("builtin:tiny", "needle_in_haystack", grid, memory_bytes=15 * GiB)
        for _ in range(2)]))
    a, b = Worker(shared, worker_id="a"), Worker(shared, worker_id="b")
    for worker in (a, b):
        worker._register()
    claimed = queue_on(factory).claim("a", capacity=a.capacity())
    assert claimed.id == first and a.capacity().free_gpu_bytes == (24 * GiB,)
    assert not b.run_once(), "b claimed a job on memory a had taken"
    a.run_job(claimed.id, claimed.model, claimed.dataset, claimed.params,
              memory_bytes=claimed.memory_bytes)
    assert queue_on(factory).get(first).state == "succeeded"
    assert queue_on(factory).workers.reservations("a") is None
    assert b.run_once()
    assert queue_on(factory).get(second).state == "succeeded"
    for worker in (a, b):
        worker.manager.stop_monitor()


def test_once_the_model_has_loaded_only_the_rest_of_the_job_stays_reserved(
        settings, factory, monkeypatch):
    """NVML shows the loaded weights from then on; what the job allocates after them
    (its KV cache and activations) stays reserved until it ends."""
    import threading

    from backend.apps.worker import Worker
    from backend.engine.contracts import CacheMode
    from backend.engine.memory import cuda
    from tests.test_manager import FakeRunner

    monkeypatch.setattr(cuda, "free_gpu_bytes", lambda: 0)  # no prefetch
    worker = Worker(settings, worker_id="a")
    worker._register()
    worker.manager.has_gpu = True
    queue_on(factory).workers.reserve("a", {"0": 15 * GiB})
    worker.current_job = 7
    after = threading.Thread(target=worker._after_load, args=(7, "m", 15 * GiB, ["0"]))
    after.start()
    with worker.manager.use("m", "m", lambda: FakeRunner(10 * GiB, on_gpu=True),
                            CacheMode.UNCACHED, estimate=10 * GiB):
        after.join(10)
        assert queue_on(factory).workers.reservations("a") == {"0": 5 * GiB}
    worker.current_job = None
    worker._drop_reservation()
    assert queue_on(factory).workers.reservations("a") is None
