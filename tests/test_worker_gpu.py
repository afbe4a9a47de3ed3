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
