"""The model manager: lazy load, cache policy, LRU eviction under a limit, pins, idle
monitor, pressure; with fake runners for the GPU paths and real models for RAM."""

from __future__ import annotations

import threading
import time

import pytest

from backend.engine.contracts import CacheMode, HeldModel
from backend.engine.memory.entries import (
    Location,
    ManagerConfig,
    MemoryLimitError,
    ModelBusy,
    UnknownModel,
)
from backend.engine.memory.manager import ModelManager

MB = 2**20
GB = 2**30


class FakeRunner(HeldModel):
    """Stands in for HFRunner's placement methods; counts what the manager does."""

    def __init__(self, size: int, on_gpu: bool):
        self.size = size
        self.device = "cuda:0" if on_gpu else "cpu"
        self.offloads = self.restores = self.closed = 0
        self.backgrounds: list[bool] = []  # per restore: copied beside a running job?
        self.host_pinned = False

    def size_bytes(self):
        return self.size

    def host_bytes(self):
        return 0

    def movable(self):
        return True

    def offload(self, pin):
        self.offloads += 1
        self.device, self.host_pinned = "cpu", pin
        return self.size

    def restore(self, device="cuda:0", background=False):
        self.restores += 1
        self.backgrounds.append(background)
        self.device = device
        return self.size

    def close(self):
        self.closed += 1


def manager(limit=100 * MB, gpu=False, **cfg) -> ModelManager:
    return ModelManager(ManagerConfig(max_memory_usage=limit, **cfg), has_gpu=gpu)


def run_job(m, name, size=40 * MB, mode=CacheMode.CACHED, gpu=False, keep=None):
    runners = []

    def load():
        runners.append(FakeRunner(size, gpu))
        return runners[-1]

    with m.use(name, name, load, mode, estimate=size, keep_on_gpu=keep) as runner:
        pass
    return runner


def test_cached_model_loads_once_and_uncached_is_released():
    m = manager()
    a = run_job(m, "a")
    assert run_job(m, "a") is a and m.load_counts["a"] == 1
    b = run_job(m, "b", mode=CacheMode.UNCACHED)
    assert b.closed == 1 and m.loaded() == ["a"]


def test_lru_eviction_and_pins():
    m = manager(limit=100 * MB)
    a = run_job(m, "a")
    run_job(m, "b")
    run_job(m, "a")  # a is now the most recently used
    run_job(m, "c")  # needs room: b (LRU) goes
    assert sorted(m.loaded()) == ["a", "c"] and a.closed == 0
    m.set_pinned("a", True)
    run_job(m, "d")  # c goes; pinned a stays
    assert sorted(m.loaded()) == ["a", "d"]
    m.set_pinned("d", True)
    with pytest.raises(MemoryLimitError, match="cannot be evicted.*a 40.00 MiB \\(pinned\\)"):
        run_job(m, "e")
    assert sorted(m.loaded()) == ["a", "d"] and "e" not in m.load_counts
    with pytest.raises(MemoryLimitError, match="even alone"):
        run_job(m, "huge", size=200 * MB)
    with pytest.raises(UnknownModel):
        m.set_pinned("nope", True)


def test_gpu_after_job_offloads_unless_next_job_needs_it():
    m = manager(gpu=True)
    r = run_job(m, "a", gpu=True, keep=lambda: True)
    assert r.device == "cuda:0" and r.offloads == 0  # next job uses it: stays
    run_job(m, "a", gpu=True, keep=lambda: False)
    assert r.offloads == 1 and r.device == "cpu"
    assert m.status()["models"][0]["location"] == "cpu"
    run_job(m, "a", gpu=True, keep=lambda: False)  # restored for the job, offloaded after
    assert (r.restores, r.offloads) == (1, 2)
    kinds = [e.kind for e in m.events]
    assert kinds == ["load", "offload", "restore", "offload"]


def test_idle_monitor_offloads_then_releases_and_timeout_changes():
    m = manager(gpu=True, idle_timeout=600, release_timeout=3600)
    r = run_job(m, "a", gpu=True, keep=lambda: True)
    m.tick(time.monotonic() + 10)
    assert r.device == "cuda:0"
    m.set_idle_timeout(5)
    m.tick(time.monotonic() + 10)
    assert r.offloads == 1 and r.device == "cpu"
    m.tick(time.monotonic() + 4000)
    assert r.closed == 1 and m.loaded() == []


def test_pinned_model_is_never_idle_released():
    m = manager(release_timeout=1)
    run_job(m, "a")
    m.set_pinned("a", True)
    m.tick(time.monotonic() + 100)
    assert m.loaded() == ["a"]


def test_monitor_thread_releases_idle_model():
    m = manager(release_timeout=0.5)
    r = run_job(m, "a")
    m.start_monitor(interval=0.1)
    try:
        deadline = time.monotonic() + 5
        while m.loaded() and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        m.stop_monitor()
    assert r.closed == 1


def test_busy_model_is_not_touched_from_another_thread():
    m = manager(gpu=True)
    with m.use("a", "a", lambda: FakeRunner(MB, True), CacheMode.CACHED):
        with pytest.raises(ModelBusy):
            m.release("a")
        with pytest.raises(ModelBusy):
            m.offload("a")
        m.tick(time.monotonic() + 10**6)  # the monitor skips it too
        assert m.status()["models"][0]["location"] == Location.GPU.value


def test_pressure_recommends_lru_and_cleanup_unloads():
    m = manager(limit=100 * MB, pressure_ratio=0.5)
    run_job(m, "a")
    run_job(m, "b")
    p = m.pressure()
    assert p["memory_pressure"] and p["recommended_unload"] == ["a", "b"]
    out = m.cleanup()
    assert out["unloaded"] == ["a"] and not m.pressure()["memory_pressure"]
    assert m.cleanup(force=True)["unloaded"] == ["b"]


def test_no_gpu_offload_is_a_clear_noop():
    m = manager()
    run_job(m, "a")
    assert m.offload() == [] and m.loaded() == ["a"]
    with pytest.raises(UnknownModel, match="'nope' is not loaded"):  # not a silent no-op
        m.offload("nope")


def test_release_of_real_model_returns_rss(settings, with_tiny):
    """A model of tens of MB, loaded and released: RSS measurably drops."""
    from backend.engine.contracts import GenerationRequest
    from backend.runners.hf.loading import LoadOptions, model_key
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import estimate_model_bytes, resolve_model

    spec = resolve_model("builtin:small", settings)
    m = ModelManager(ManagerConfig.from_settings(settings))
    size = estimate_model_bytes(spec)  # before it exists: from the recipe
    assert 30 * MB < size < 60 * MB
    with m.use(model_key(spec, settings), spec.name,
               lambda: HFRunner.load(spec, LoadOptions.from_settings(settings), settings),
               CacheMode.UNCACHED, estimate=size) as runner:
        assert abs(runner.size_bytes() - size) < 0.05 * size
        assert abs(estimate_model_bytes(spec) - size) < 0.05 * size  # from the headers
        # Weights are mapped from the safetensors file and paged in on first use:
        # generate once, as a job does, so all of them are resident.
        runner.generate([GenerationRequest(runner.render("hello"), 2)])
    release = m.events[-1]
    assert release.kind == "release"
    freed = release.rss_before - release.rss_after
    assert freed > 0.8 * size, (freed, size, release.note)
    assert "RSS returned" in release.note


def test_gpu_cap_offloads_lru_models_to_make_room():
    m = manager(limit=10**12, gpu=True, gpu_cap_bytes=100 * MB)
    a = run_job(m, "a", gpu=True, keep=lambda: True)
    b = run_job(m, "b", gpu=True, keep=lambda: True)
    assert a.device == b.device == "cuda:0"
    c = run_job(m, "c", gpu=True, keep=lambda: True)  # 120 MB would pass the 100 MB cap
    assert a.device == "cpu" and b.device == c.device == "cuda:0"
    run_job(m, "a", gpu=True, keep=lambda: True)  # restoring a pushes out b (now LRU)
    assert a.device == "cuda:0" and b.device == "cpu"


def test_prefetch_restores_next_model_when_it_fits():
    m = manager(gpu=True, gpu_cap_bytes=100 * MB)
    a = run_job(m, "a", gpu=True, keep=lambda: False)  # offloaded after its job
    assert a.device == "cpu"
    assert not m.prefetch("a", free_gpu_bytes=lambda: 10 * MB)  # does not fit: stays
    assert m.prefetch("a", free_gpu_bytes=lambda: 80 * GB)
    assert a.device == "cuda:0" and m.events[-1].note == "prefetched for the next queued job"
    assert not m.prefetch("a", free_gpu_bytes=lambda: 80 * GB)  # already there
    assert not manager().prefetch("a")  # no GPU: nothing to do



def test_on_move_is_called_after_every_move():
    """The worker publishes its status from this hook: each call sees the model already
    where the move put it."""
    m, seen = manager(gpu=True), []
    m.on_move = lambda event: seen.append(
        (event.kind, event.model, {e["model_name"]: e["location"] for e in m.status()["models"]}))
    run_job(m, "a", gpu=True)  # load, then offload when the job ends
    run_job(m, "a", gpu=True)  # restore, offload
    m.release("a")
    run_job(m, "b", mode=CacheMode.UNCACHED, gpu=True)  # load, release
    assert seen == [("load", "a", {"a": "gpu"}), ("offload", "a", {"a": "cpu"}),
                    ("restore", "a", {"a": "gpu"}), ("offload", "a", {"a": "cpu"}),
                    ("release", "a", {}), ("load", "b", {"b": "gpu"}), ("release", "b", {})]


def test_keep_on_gpu_is_asked_outside_the_lock():
    """keep_on_gpu queries the database: the heartbeat must not wait behind it."""
    m = manager(gpu=True)
    held = []
    a = run_job(m, "a", gpu=True, keep=lambda: held.append(m._lock._is_owned()) or True)
    assert held == [False] and a.device == "cuda:0"

    def broken():
        raise RuntimeError("database is locked")

    run_job(m, "b", gpu=True, keep=broken)  # a failed question offloads; nothing stuck
    assert not any(e["in_use"] for e in m.status()["models"])


def test_prefetch_copies_outside_the_lock_and_leaves_room_for_the_running_job():
    m = manager(gpu=True)

    class SlowRestore(FakeRunner):
        go = threading.Event()
        lock_held: list[bool] = []

        def restore(self, device="cuda:0", background=False):
            self.lock_held.append(m._lock._is_owned())
            self.go.wait(10)
            return super().restore(device, background)

    runner = SlowRestore(40 * MB, on_gpu=True)
    with m.use("a", "a", lambda: runner, CacheMode.CACHED, keep_on_gpu=lambda: False):
        pass
    # 40 MB x 1.2 + 60 MB the running job still allocates > 100 MB free
    assert not m.prefetch("a", free_gpu_bytes=lambda: 100 * MB, reserve=60 * MB)
    mover = threading.Thread(target=m.prefetch, args=("a", lambda: 100 * MB, 40 * MB))
    mover.start()
    while not runner.lock_held:
        time.sleep(0.01)
    try:
        reader = threading.Thread(target=m.status)
        reader.start()
        reader.join(5)
        assert not reader.is_alive(), "status() waited on the copy"
        with pytest.raises(ModelBusy):  # nothing else moves it meanwhile
            m.offload("a")
    finally:
        SlowRestore.go.set()
        mover.join(5)
    assert runner.lock_held == [False], "the copy held the manager's lock"
    assert runner.device == "cuda:0" and m.events[-1].note == "prefetched for the next queued job"


class PinnedHost:
    """torch's caching host allocator as the manager meets it: every pinned block is
    rounded up to a power of two (ATen/core/CachingHostAllocator.h, PowerOf2Ceil);
    `fail` makes pinning fail as cudaHostAlloc does when the host is out of it."""

    def __init__(self, fail=False):
        self.fail = fail
        self.pinned = 0

    def pin(self, nbytes):
        if self.fail:
            raise RuntimeError("CUDA error: out of memory (cudaHostAlloc)")
        self.pinned += 1 << (nbytes - 1).bit_length()


class PinningRunner(FakeRunner):
    """A model of several weights whose offload pins each one through `host`."""

    def __init__(self, weights, host):
        super().__init__(sum(weights), on_gpu=True)
        self.weights, self.host = weights, host

    def pinned_bytes(self):
        from backend.runners.hf.offload import pinned_block_bytes

        return sum(pinned_block_bytes(w) for w in self.weights)

    def offload(self, pin):
        if pin:
            for w in self.weights:
                self.host.pin(w)
        return super().offload(pin)


def test_pinned_budget_counts_what_the_host_allocator_rounds_to():
    weights = [22 * MB, 3 * MB]  # 25 MB of weights take 32 + 4 = 36 MB pinned
    host = PinnedHost()
    m = manager(gpu=True, pinned_budget=30 * MB)
    a = PinningRunner(weights, host)
    with m.use("a", "a", lambda: a, CacheMode.CACHED, keep_on_gpu=lambda: False):
        pass
    assert not a.host_pinned and host.pinned == 0  # 36 MB would pass the 30 MB budget
    assert "pageable" in m.events[-1].note
    m2 = manager(gpu=True, pinned_budget=40 * MB)
    b = PinningRunner(weights, host)
    with m2.use("b", "b", lambda: b, CacheMode.CACHED, keep_on_gpu=lambda: False):
        pass
    assert b.host_pinned and host.pinned == 36 * MB
    c = PinningRunner([5 * MB], host)  # pins 8 MB: 36 + 8 would pass 40 MB, pageable
    with m2.use("c", "c", lambda: c, CacheMode.CACHED, keep_on_gpu=lambda: False):
        pass
    assert not c.host_pinned


def test_a_failed_pin_falls_back_to_pageable_memory_and_the_job_ends_well():
    m = manager(gpu=True, pinned_budget=GB)
    a = PinningRunner([22 * MB], PinnedHost(fail=True))
    with m.use("a", "a", lambda: a, CacheMode.CACHED, keep_on_gpu=lambda: False):
        pass  # the job's samples are done: its end must not fail
    assert a.device == "cpu" and not a.host_pinned
    assert "pinning failed" in m.events[-1].note and m.status()["models"][0]["location"] == "cpu"


def test_hf_runner_counts_its_pinned_blocks(with_tiny, settings):
    from backend.runners.hf.loading import LoadOptions
    from backend.runners.hf.offload import pinned_block_bytes
    from backend.runners.hf.runner import HFRunner
    from backend.runners.models import resolve_model

    assert [pinned_block_bytes(n) for n in (1, 4096, 22 * MB, 32 * MB, 32 * MB + 1)] == \
        [1, 4096, 32 * MB, 32 * MB, 64 * MB]
    runner = HFRunner.load(resolve_model("builtin:tiny", settings),
                           LoadOptions("float32", False, 0.0), settings)
    sizes = [t.numel() * t.element_size() for _, t in runner._tensors()]
    assert runner.pinned_bytes() == sum(1 << (s - 1).bit_length() for s in sizes)
    assert runner.pinned_bytes() > runner.size_bytes()


def test_wait_loaded_waits_for_a_job_to_hold_its_model_where_it_runs():
    m = manager(gpu=True)
    a = run_job(m, "a", gpu=True, keep=lambda: False)  # offloaded: held in RAM
    assert not m.wait_loaded("a", 0.05)  # no job has it yet: not restored
    with m.use("a", "a", lambda: None, CacheMode.CACHED, keep_on_gpu=lambda: False):
        assert m.wait_loaded("a", 0.05) and a.device == "cuda:0"
    assert not m.wait_loaded("b", 0.05)


def test_prefetch_leaves_the_running_jobs_reserve_under_the_process_cap():
    """Under LBS_GPU_MEMORY_LIMIT the cap counts every byte of this process: the model
    of the running job (40 MB), what that job will still allocate (`reserve`, 40 MB)
    and a prefetched model (30 MB) must fit it together, however free the GPU is."""
    m = manager(gpu=True, gpu_cap_bytes=100 * MB)
    a = run_job(m, "a", size=30 * MB, gpu=True, keep=lambda: False)  # offloaded
    with m.use("running", "running", lambda: FakeRunner(40 * MB, on_gpu=True),
               CacheMode.UNCACHED, estimate=40 * MB):
        assert not m.prefetch("a", free_gpu_bytes=lambda: 80 * GB, reserve=40 * MB)
        assert a.device == "cpu"
        assert m.prefetch("a", free_gpu_bytes=lambda: 80 * GB, reserve=20 * MB)
    assert a.device == "cuda:0"


def test_a_prefetch_copies_in_the_background_and_a_jobs_own_restore_does_not():
    """A prefetch runs beside another job's kernels, so the runner copies on a side
    stream (HFRunner.restore, background=True); a job restoring its own model waits
    for it anyway."""
    m = manager(gpu=True)
    a = run_job(m, "a", gpu=True, keep=lambda: False)
    assert m.prefetch("a", free_gpu_bytes=lambda: 80 * GB)
    m.offload("a")
    run_job(m, "a", gpu=True, keep=lambda: False)
    assert a.backgrounds == [True, False]
