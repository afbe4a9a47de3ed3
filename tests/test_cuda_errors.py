"""CUDA errors and database errors around a worker: library allocation failures are
out-of-memory; any other CUDA error makes a real worker process give its job back
and exit for a fresh one; a database error while claiming does not end the loop;
the server's pool restarts workers with a growing delay."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time

import pytest
import sqlalchemy.exc
import torch

from backend.engine.answering import is_cuda_failure
from backend.engine.contracts import is_out_of_memory
from backend.queue import jobs
from tests.conftest import ROOT, queue_on

# The messages torch raises: TORCH_CUDABLAS_CHECK and AT_CUDNN_CHECK in
# ATen/cuda/Exceptions.h ("CUDA error: <cublas status> when calling `...`",
# "cuDNN error: <cudnnGetErrorString>"), C10_CUDA_CHECK as torch.AcceleratorError.
CUBLAS_ALLOC = RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling "
                            "`cublasCreate(handle)`")
CUDNN_ALLOC = RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED")
CUDNN9_ALLOC = RuntimeError("cuDNN error: CUDNN_STATUS_INTERNAL_ERROR_DEVICE_ALLOCATION_FAILED")
ILLEGAL_ACCESS = torch.AcceleratorError("CUDA error: an illegal memory access was encountered")


@pytest.mark.parametrize("exc", [CUBLAS_ALLOC, CUDNN_ALLOC, CUDNN9_ALLOC,
                                 torch.OutOfMemoryError("CUDA out of memory.")])
def test_library_allocation_failures_are_out_of_memory(exc):
    assert is_out_of_memory(exc) and not is_cuda_failure(exc)


@pytest.mark.parametrize("exc", [
    ILLEGAL_ACCESS, RuntimeError("CUDA error: device-side assert triggered"),
    RuntimeError("CUDA error: CUBLAS_STATUS_EXECUTION_FAILED when calling `cublasGemmEx`"),
    RuntimeError("cuDNN error: CUDNN_STATUS_EXECUTION_FAILED")])
def test_other_cuda_errors_break_the_context(exc):
    assert is_cuda_failure(exc) and not is_out_of_memory(exc)


@pytest.mark.parametrize("exc", [ValueError("CUDA error: not a runtime error"),
                                 RuntimeError("Expected all tensors to be on the same device")])
def test_ordinary_errors_are_neither(exc):
    assert not is_cuda_failure(exc) and not is_out_of_memory(exc)


FAULTY_PLUGIN = '''
import torch

from backend.datasets.base import CacheMode, Dataset, DatasetParams, Item
from backend.datasets.registry import register


@register
class CudaFault(Dataset):
    name = "cuda_fault"
    description = "Raises the error an illegal memory access raises (test plugin)."
    cache_mode = CacheMode.CACHED
    Params = DatasetParams

    def build_items(self, params, tokenizer):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    def score(self, item, prediction):
        return 0.0
'''


def test_worker_gives_its_job_back_and_exits_after_a_cuda_error(factory, with_tiny, tmp_path):
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "cuda_fault.py").write_text(FAULTY_PLUGIN)
    (job,) = queue_on(factory).submit([jobs.NewJob("builtin:tiny", "cuda_fault", {})])
    env = {**os.environ, "LBS_PLUGIN_DIRS": str(plugins), "LBS_MAX_ATTEMPTS": "2",
           "LBS_POLL_INTERVAL": "0.2"}

    def run_worker() -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "backend.apps.worker"], cwd=ROOT, env=env,
                              capture_output=True, text=True, timeout=120)

    first = run_worker()
    assert first.returncode == 3, first.stderr[-3000:]
    back = queue_on(factory).get(job.id)
    assert back.state == "queued" and back.attempts == 1 and back.worker_id is None
    assert back.events[-1]["kind"] == "cuda_error"
    assert "illegal memory access" in back.events[-1]["message"]
    second = run_worker()  # the second attempt is the last one: the job fails
    assert second.returncode == 3, second.stderr[-3000:]
    failed = queue_on(factory).get(job.id)
    assert failed.state == "failed" and failed.attempts == 2
    assert "gave up after 2 attempts" in failed.error and "AcceleratorError" in failed.error
    workers = queue_on(factory).workers.all()
    assert len(workers) == 2 and all(w.state == "stopped" for w in workers)


def test_a_database_error_while_claiming_does_not_end_the_loop(settings, monkeypatch):
    from backend.apps import worker as worker_module

    calls = []
    worker = worker_module.Worker(settings, worker_id="flaky-db")

    def claim(*args, **kwargs):
        calls.append(1)
        if len(calls) <= 2:
            raise sqlalchemy.exc.OperationalError("SELECT", {}, Exception("database is locked"))
        worker.stop()
        return None

    monkeypatch.setattr(worker.queue, "claim", claim)
    outcome = []
    loop = threading.Thread(target=lambda: outcome.append(worker.run_forever()))
    loop.start()
    loop.join(60)
    assert outcome == [0] and len(calls) == 3  # backed off 0.5 s, then 1 s, then claimed


def test_pool_restarts_workers_with_exponential_backoff(settings, monkeypatch):
    from backend.server import WorkerPool

    class FakeProc:
        pid = 4242

        def __init__(self):
            self.code = None

        def poll(self):
            return self.code

    spawned: list[FakeProc] = []

    def spawn(slot, device):
        spawned.append(FakeProc())
        return spawned[-1]

    pool = WorkerPool(settings)
    monkeypatch.setattr(pool, "_spawn", spawn)
    pool.devices = [None]
    pool.procs[0], pool.started_at[0] = spawn(0, None), 0.0
    now, delays = 0.0, []
    for _ in range(8):  # each worker dies 1 s after it starts
        now += 1.0
        spawned[-1].code = 3
        pool.check(now)
        count = len(spawned)
        restart = pool.restart_at[0]
        pool.check(restart - 0.01)
        assert len(spawned) == count  # not before its delay
        pool.check(restart)
        assert len(spawned) == count + 1
        delays.append(restart - now)
        now = restart
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]
    now += 120  # a healthy run resets the delay
    spawned[-1].code = 0
    pool.check(now)
    assert pool.restart_at[0] - now == 1


def test_a_restart_racing_the_shutdown_leaves_no_worker_running(settings, monkeypatch):
    """The server's shutdown stops every worker it started, including a replacement the
    supervisor is starting at that very moment (one was left running, orphaned, after
    a Ctrl-C: on a GPU box a process holding a model's memory)."""
    from backend.server import WorkerPool

    started: list[subprocess.Popen] = []
    spawning = threading.Event()

    def slow_spawn(slot, device):  # a restart that is still starting when stop() comes
        spawning.set()
        time.sleep(0.5)
        proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        started.append(proc)
        return proc

    pool = WorkerPool(settings)
    monkeypatch.setattr(pool, "_spawn", slow_spawn)
    pool.devices = [None]
    first = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    started.append(first)
    first.wait(30)
    pool.procs[0], pool.started_at[0] = first, 0.0
    pool.check(1.0)  # the worker exited: a restart is due in 1 s
    restart = threading.Thread(target=pool.check, args=(pool.restart_at[0],))
    try:
        restart.start()
        assert spawning.wait(10)
        pool.stop(timeout=10)
        restart.join(10)
        assert len(started) == 2
        assert all(p.poll() is not None for p in started), "a worker outlived the shutdown"
    finally:
        for proc in started:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
