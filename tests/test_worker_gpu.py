"""The worker's GPU bookkeeping against model moves: the heartbeat never waits on an
offload, prefetch follows the running job's load, free memory per GPU, NVML in a
PID namespace. GPUs are simulated (LBS_SIMULATED_GPU_MEMORY) and model moves are
fake runners that take as long as a real one would."""

from __future__ import annotations

import threading
import time

import sqlalchemy as sa

from backend import jobs
from backend.datasets.base import CacheMode
from backend.db import Job
from tests.test_jobs import started_worker
from tests.test_manager import FakeRunner

GB = 2**30


class SlowOffload(FakeRunner):
    """An offload that holds the model manager (and its lock) until `release` is set."""

    def __init__(self, size):
        super().__init__(size, on_gpu=True)
        self.started = threading.Event()
        self.release = threading.Event()

    def offload(self, pin):
        self.started.set()
        self.release.wait(30)
        return super().offload(pin)


def _lease(factory, job_id):
    with factory() as session:
        return session.scalar(sa.select(Job.lease_expires_at).where(Job.id == job_id))


def test_heartbeat_renews_the_lease_while_an_offload_outlasts_it(factory, monkeypatch):
    from backend.config import load_settings

    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", "24GB")
    monkeypatch.setenv("LBS_LEASE_SECONDS", "1")  # the heartbeat beats every 0.25 s
    (job,) = jobs.submit_jobs(factory, [jobs.NewJob("builtin:tiny", "gsm8k", {})])
    with started_worker(load_settings(), "hb") as worker:
        worker.manager.has_gpu = True
        assert jobs.claim_job(factory, worker.id, 1, 3).id == job.id
        worker.current_job = job.id
        runner = SlowOffload(GB)

        def run():  # a job ends; its cached model is offloaded (slowly)
            with worker.manager.use("m", "m", lambda: runner, CacheMode.CACHED,
                                    keep_on_gpu=lambda: False):
                pass

        mover = threading.Thread(target=run)
        mover.start()
        try:
            assert runner.started.wait(10)
            seen = {_lease(factory, job.id)}
            deadline = time.monotonic() + 10  # 10 leases: far longer than it needs
            while len(seen) < 4 and time.monotonic() < deadline:
                time.sleep(0.05)
                seen.add(_lease(factory, job.id))
            assert len(seen) >= 4, "the lease was not renewed while the offload ran"
            assert not runner.release.is_set() and mover.is_alive()  # still offloading
            assert worker.capacity().free_gpu_bytes is not None  # status lock-free too
        finally:
            runner.release.set()
            mover.join(10)
            worker.current_job = None


def test_prefetch_waits_for_the_running_jobs_model_and_counts_its_estimate(
        factory, settings, monkeypatch):
    from backend.memory import manager as manager_module
    from backend.worker import Worker

    monkeypatch.setattr(manager_module, "_free_gpu_bytes", lambda: 10 * GB)
    worker = Worker(settings, worker_id="prefetcher")
    worker.manager.has_gpu = True
    following = FakeRunner(2 * GB, on_gpu=True)
    with worker.manager.use("next", "next", lambda: following, CacheMode.CACHED,
                            keep_on_gpu=lambda: False):
        pass
    assert following.device == "cpu"
    jobs.submit_jobs(factory, [jobs.NewJob("next", "gsm8k", {})])

    def prefetch_while(job_bytes):
        worker.current_job = 7
        thread = threading.Thread(target=worker._prefetch_next, args=(7, "current", job_bytes))
        thread.start()
        time.sleep(0.5)  # the running job's model is still loading
        before = following.restores
        with worker.manager.use("current", "current", lambda: FakeRunner(GB, on_gpu=True),
                                CacheMode.UNCACHED):
            thread.join(10)
        worker.current_job = None
        return before, following.restores

    # its estimate 9 GB less its 1 GB of weights leaves 2 GB: 2 GB x 1.2 does not fit
    assert prefetch_while(9 * GB) == (0, 0)
    assert prefetch_while(3 * GB) == (0, 1)  # 2 GB left: fits after the load
    assert following.device == "cuda:0"
