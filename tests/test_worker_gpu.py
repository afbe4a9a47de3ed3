"""The worker's GPU bookkeeping against model moves: the heartbeat never waits on an
offload, prefetch follows the running job's load, free memory per GPU, NVML in a
PID namespace. GPUs are simulated (LBS_SIMULATED_GPU_MEMORY) and model moves are
fake runners that take as long as a real one would."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import sqlalchemy as sa

from backend.engine.contracts import CacheMode
from backend.queue import jobs
from backend.queue.db import Job
from tests.conftest import queue_on
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
    from backend.common.config import load_settings

    monkeypatch.setenv("LBS_SIMULATED_GPU_MEMORY", "24GB")
    monkeypatch.setenv("LBS_LEASE_SECONDS", "1")  # the heartbeat beats every 0.25 s
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "gsm8k", {})])
    with started_worker(load_settings(), "hb") as worker:
        worker.manager.has_gpu = True
        assert queue_on(factory, lease_seconds=1).claim(worker.id).id == job.id
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
    from backend.apps.worker import Worker
    from backend.engine.memory import cuda

    monkeypatch.setattr(cuda, "free_gpu_bytes", lambda: 10 * GB)
    worker = Worker(settings, worker_id="prefetcher")
    worker.manager.has_gpu = True
    following = FakeRunner(2 * GB, on_gpu=True)
    with worker.manager.use("next", "next", lambda: following, CacheMode.CACHED,
                            keep_on_gpu=lambda: False):
        pass
    assert following.device == "cpu"
    queue_on(factory).submit([jobs.NewJob("next", "gsm8k", {})])

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


class FakeNVML:
    """pynvml's functions used here, over pretend GPUs: (total, free, used, processes),
    processes as (pid, usedGpuMemory) pairs (None where the driver does not say)."""

    class NVMLError(Exception):
        pass

    def __init__(self, gpus):
        self.gpus = gpus

    def nvmlInit(self):
        pass

    def nvmlShutdown(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetName(self, handle):
        return "Fake GPU"

    def nvmlDeviceGetMemoryInfo(self, handle):
        total, free, used, _ = self.gpus[handle]
        return SimpleNamespace(total=total, free=free, used=used)

    def nvmlDeviceGetComputeRunningProcesses(self, handle):
        return [SimpleNamespace(pid=pid, usedGpuMemory=used)
                for pid, used in self.gpus[handle][3]]


def test_a_one_gpu_job_is_admitted_against_its_own_gpu_not_the_sum(factory):
    from backend.queue.scheduling import Capacity

    (one,) = queue_on(factory).submit([jobs.NewJob("m", "gsm8k", {}, memory_bytes=15 * GB)])
    two_cards = Capacity(gpu_count=2, free_gpu_bytes=(10 * GB, 10 * GB))
    assert queue_on(factory).claim("w", capacity=two_cards) is None  # fits only 10+10
    (two,) = queue_on(factory).submit([jobs.NewJob("m", "gsm8k", {}, memory_bytes=15 * GB,
                                                   num_gpus=2)])
    assert queue_on(factory).claim("w", capacity=two_cards).id == two.id
    roomy_first = Capacity(gpu_count=2, free_gpu_bytes=(16 * GB, 1 * GB))
    assert queue_on(factory).claim("w", capacity=roomy_first).id == one.id


def test_waiting_reason_counts_the_gpus_the_job_uses(factory):
    (job,) = queue_on(factory).submit([jobs.NewJob("m", "gsm8k", {}, memory_bytes=15 * GB)])
    gpus = [{"index": i, "name": "g", "total_bytes": 10 * GB, "free_bytes": 10 * GB,
             "available_bytes": 10 * GB} for i in range(2)]
    queue_on(factory).workers.register("w", "host", 1, "cuda:0,1", gpus=gpus,
                                       gpu_free_bytes=20 * GB)
    reason = queue_on(factory).waiting_reasons([queue_on(factory).get(job.id)])[job.id]
    assert "needs about 15.0 GiB" in reason and "has free is 10.0 GiB" in reason


def test_manager_gpu_cap_is_a_share_of_the_first_gpu(monkeypatch):
    import torch

    from backend.engine.memory.entries import ManagerConfig

    sizes = [24 * GB, 80 * GB]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(sizes))
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda i: SimpleNamespace(total_memory=sizes[i]))
    settings = SimpleNamespace(max_memory_usage=0, gpu_memory_limit=0.5, gpu_idle_timeout=1,
                               release_timeout=1, memory_check_interval=1,
                               auto_cleanup_enabled=True, pressure_ratio=0.8,
                               min_available_gb=1, pinned_memory_budget=0,
                               use_model_cache=True)
    assert ManagerConfig.from_settings(settings).gpu_cap_bytes == 12 * GB  # not 52 GiB


def test_nvml_indices_are_cuda_indices(monkeypatch, settings):
    import os

    from backend.common.config import apply_allocator_settings, select_cuda_device

    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")  # CUDA's default order
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")
    apply_allocator_settings(settings)
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    monkeypatch.setenv("CUDA_DEVICE_ORDER", "FASTEST_FIRST")
    select_cuda_device("1")
    assert os.environ["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"


def test_free_gpu_choice_skips_every_gpu_of_this_hosts_workers_only(factory, settings,
                                                                     monkeypatch):
    import socket
    import sys

    from backend.apps import worker_gpus

    nvml = FakeNVML([(80 * GB, 10 * GB, 0, []), (80 * GB, 80 * GB, 0, []),
                     (80 * GB, 40 * GB, 0, [])])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    chosen = []
    monkeypatch.setattr(worker_gpus, "select_cuda_device", chosen.append)

    def gpu(i):
        return {"index": i, "name": "Fake GPU", "total_bytes": 80 * GB, "free_bytes": 0}

    # here: a worker holding GPUs 0 and 1; on another machine: one holding its GPU 2
    queue_on(factory).workers.register("here", socket.gethostname(), 1, "cuda:0,1 (Fake GPU)",
                                                     gpus=[gpu(0), gpu(1)])
    queue_on(factory).workers.register("there", "other-host", 1, "cuda:2 (Fake GPU)",
                                                     gpus=[gpu(2)])
    assert worker_gpus.choose_gpu(settings) == "2" and chosen == ["2"]


def test_nvml_in_a_pid_namespace_reports_unknown_and_device_use_since_start(monkeypatch):
    """In a container the driver lists host PIDs: none is os.getpid()."""
    import os
    import sys

    from backend.engine.memory import gpu

    foreign = [(os.getpid() + 1000, 3 * GB), (os.getpid() + 2000, GB)]
    nvml = FakeNVML([(80 * GB, 75 * GB, 5 * GB, foreign)])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    assert gpu.process_gpu_bytes(os.getpid()) is None  # unknown, not 0
    nvml.gpus[0] = (80 * GB, 75 * GB, 5 * GB, [(os.getpid(), None)])  # listed, no figure
    assert gpu.process_gpu_bytes(os.getpid()) is None
    nvml.gpus[0] = (80 * GB, 75 * GB, 5 * GB, [(os.getpid(), 2 * GB)] + foreign)
    assert gpu.process_gpu_bytes(os.getpid()) == 2 * GB
    monkeypatch.setattr(gpu, "_baseline", {})
    assert gpu.device_used_since_baseline() is None  # no baseline taken
    gpu.take_device_baseline([0])  # worker start: 5 GB used by others
    nvml.gpus[0] = (80 * GB, 71 * GB, 9 * GB, foreign)
    assert gpu.device_used_since_baseline() == 4 * GB


def test_cuda_peaks_store_unknown_process_use_and_the_device_fallback(monkeypatch, factory):
    import os
    import sys

    import torch

    from backend.apps.api.schemas import memory_dict
    from backend.engine.memory import gpu
    from backend.engine.memory.tracker import CudaPeaks
    from backend.queue.db import JobState

    nvml = FakeNVML([(80 * GB, 75 * GB, 5 * GB, [(os.getpid() + 1000, 5 * GB)])])
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu, "_baseline", {})
    gpu.take_device_baseline([0])
    for name, value in [("is_available", lambda: True), ("device_count", lambda: 1),
                        ("max_memory_allocated", lambda i: GB),
                        ("max_memory_reserved", lambda i: GB),
                        ("reset_peak_memory_stats", lambda i: None), ("init", lambda: None)]:
        monkeypatch.setattr(torch.cuda, name, value)
    peaks = CudaPeaks()
    nvml.gpus[0] = (80 * GB, 73 * GB, 7 * GB, [(os.getpid() + 1000, 7 * GB)])
    peaks.new_window()
    readings = peaks.nvml_readings()
    assert readings == [("cuda_nvml_process_used", "cuda:all", None),
                        ("cuda_nvml_device_used", "cuda:all", 2 * GB)]
    (job,) = queue_on(factory).submit([jobs.NewJob("m", "gsm8k", {})])
    queue_on(factory).claim("w")
    queue_on(factory).finish(job.id, "w", JobState.SUCCEEDED, memory=readings)
    stored = queue_on(factory).get(job.id).memory_peaks
    shown = memory_dict([(m.name, m.device, m.bytes) for m in stored])["gpu"]["cuda:all"]
    assert shown["nvml_process_used_bytes"] is None  # null in the API: unknown
    assert shown["nvml_device_used_bytes"] == 2 * GB


def test_the_room_a_worker_advertises_never_passes_the_process_cap(settings, monkeypatch):
    """LBS_GPU_MEMORY_LIMIT=0.5 on an 80 GiB GPU caps this process at 40 GiB. With 30 GiB
    of idle cached models on it (NVML: 50 GiB free) the worker may offer those 30 GiB
    back, but a job needs room under the cap: 40 GiB at most, less what a running job's
    model holds."""
    import dataclasses

    from backend.apps import worker_gpus
    from backend.apps.worker import Worker
    from backend.engine.memory.entries import ManagerConfig
    from backend.engine.memory.manager import ModelManager

    gpus = [{"index": 0, "name": "H100", "total_bytes": 80 * GB, "free_bytes": 50 * GB}]
    monkeypatch.setattr(worker_gpus, "detect_gpus", lambda s: [dict(g) for g in gpus])
    worker = Worker(dataclasses.replace(settings, gpu_memory_limit=0.5), worker_id="capped")
    worker.manager = ModelManager(ManagerConfig(max_memory_usage=10**14), has_gpu=True)
    with worker.manager.use("idle", "idle", lambda: FakeRunner(30 * GB, on_gpu=True),
                            CacheMode.CACHED, keep_on_gpu=lambda: True):
        pass
    assert worker.free_gpu_bytes() == (40 * GB,)
    assert worker.gpus[0]["available_bytes"] == 40 * GB
    gpus[0]["free_bytes"] = 40 * GB  # a running job's 10 GiB model loads next to it
    with worker.manager.use("busy", "busy", lambda: FakeRunner(10 * GB, on_gpu=True),
                            CacheMode.UNCACHED):
        assert worker.free_gpu_bytes() == (30 * GB,)
    gpus[0]["free_bytes"] = 5 * GB  # another process took 45 GiB: NVML's figure wins
    assert worker.free_gpu_bytes() == (5 * GB + 30 * GB,)
