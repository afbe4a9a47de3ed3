"""The models a worker holds and the moves between their locations: offload to CPU
RAM, restore to the GPU, release, and the LRU eviction that makes room under the RAM
limit and the GPU cap. It decides nothing about when: `ModelManager`
(engine/memory/manager.py) applies the cache policy, the idle monitor and the
commands on top of it, and its docstring states the contract.

The underscored methods expect the caller to hold `_lock`; the public readings say
whether they take it.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable, Hashable

import psutil

from backend.common.units import format_bytes
from backend.engine.memory.cuda import cuda_available, empty_cuda_cache, gpu_reserved, trim_heap
from backend.engine.memory.entries import (
    Entry,
    Location,
    ManagerConfig,
    MemoryLimitError,
    ModelEvent,
)
from backend.engine.memory.tracker import MemoryTracker, rss_bytes

log = logging.getLogger(__name__)


class ModelStore:
    """The held models (`Entry` by key), their events and the moves between locations."""

    def __init__(self, config: ManagerConfig | None = None, has_gpu: bool | None = None,
                 use_cache: bool | None = None):
        self.config = config or ManagerConfig()
        if use_cache is not None:
            self.config.use_cache = use_cache
        total_ram = psutil.virtual_memory().total
        if not self.config.max_memory_usage:
            self.config.max_memory_usage = int(total_ram * 0.8)
        if not self.config.pinned_budget:
            self.config.pinned_budget = int(total_ram * 0.25)
        self.has_gpu = cuda_available() if has_gpu is None else has_gpu
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a load or a prefetch ended
        self._models: dict[Hashable, Entry] = {}
        self.load_counts: dict[Hashable, int] = {}
        self.events: list[ModelEvent] = []
        self.event_count = 0  # events ever recorded; `events` keeps the last 200
        self.on_move: Callable[[ModelEvent], None] | None = None
        self.tracker = MemoryTracker()

    # --- moves ---------------------------------------------------------------------

    def _offload(self, entry: Entry, why: str) -> ModelEvent | None:
        if entry.location is not Location.GPU:
            return None
        if not entry.runner.movable():
            return self._release(entry, f"{why}; a device-mapped model is released, not moved")
        before, started = rss_bytes(), time.perf_counter()
        pin = _pinned_bytes(entry) <= self._pinned_room(entry)
        how = "pinned" if pin else "pageable"
        try:
            copied = entry.runner.offload(pin=pin)
        except Exception as exc:  # noqa: BLE001 - cudaHostAlloc refused: pageable will do
            if not pin:
                raise
            log.warning("[ModelManager] pinning %s's host copy failed (%s); using pageable "
                        "memory", entry.name, exc)
            empty_cuda_cache()  # the blocks pinned before the failure
            copied = entry.runner.offload(pin=False)
            how = f"pageable (pinning failed: {exc})"
        entry.location = Location.CPU
        empty_cuda_cache()
        return self._event("offload", entry.name, started, before, copied,
                           f"{why}; host copy {how}")

    def _restore(self, entry: Entry) -> ModelEvent:
        before, started = rss_bytes(), time.perf_counter()
        moved = entry.runner.restore()
        entry.location = Location.GPU
        return self._event("restore", entry.name, started, before, moved)

    def _release(self, entry: Entry, why: str) -> ModelEvent:
        self._models.pop(entry.key, None)
        before, started = rss_bytes(), time.perf_counter()
        gpu_before = gpu_reserved()
        size = entry.size
        entry.runner.close()
        entry.runner = None
        gc.collect()
        empty_cuda_cache()
        trim_heap()
        check = self.tracker.release_check(f"release {entry.name}", before, expected_bytes=size)
        if gpu_before:
            check += f"; GPU reserved {format_bytes(gpu_before - gpu_reserved())} freed"
        event = self._event("release", entry.name, started, before, size,
                            f"{why}; {check}")
        log.info("[ModelManager] released %s (%s): %s", entry.name, why, check)
        return event

    def _event(self, kind: str, name: str, started: float, before: int, nbytes: int,
               note: str | None = None) -> ModelEvent:
        event = ModelEvent(kind, name, time.perf_counter() - started, before, rss_bytes(),
                           nbytes, note)
        self.events.append(event)
        self.event_count += 1
        del self.events[:-200]
        if self.on_move is not None:
            self.on_move(event)
        if kind not in ("release", "oom"):  # those log their own line
            log.info("[ModelManager] %s %s: %s in %.3f s", kind, name, format_bytes(nbytes),
                     event.seconds)
        return event

    def _pinned_room(self, entry: Entry) -> int:
        used = sum(_pinned_bytes(e) for e in self._models.values()
                   if e is not entry and e.runner is not None and e.runner.host_pinned)
        return self.config.pinned_budget - used

    # --- sizes and eviction ---------------------------------------------------------

    def ram_bytes(self, key: Hashable) -> int:
        """RAM the weights of the model held under `key` take now (HeldModel.ram_bytes);
        0 when it is not held."""
        with self._lock:
            entry = self._models.get(key)
            return entry.runner.ram_bytes() if entry is not None and entry.runner else 0

    def idle_gpu_bytes(self) -> int:
        """Bytes of the models on the GPU that no job uses (the manager offloads them to
        make room). Read without the lock, so it never waits on a model move: a model
        being moved counts where it was."""
        entries = list(self._models.values())  # one C-level copy: safe without the lock
        return sum(e.size for e in entries if e.location is Location.GPU and not e.in_use)

    def gpu_bytes(self) -> int:
        """Bytes of all the models on the GPU, idle or in use (lock-free, as above)."""
        entries = list(self._models.values())
        return sum(e.size for e in entries if e.location is Location.GPU)

    def size_of(self, name: str) -> int:
        """Bytes of the weights of the models called `name` held here (0 if none)."""
        return sum(e.size for e in list(self._models.values()) if e.name == name)

    def usage(self) -> int:
        with self._lock:
            return sum(e.held_bytes() for e in self._models.values())

    def _lru_candidates(self) -> list[Entry]:
        free = [e for e in self._models.values()
                if not e.pinned and not e.busy and e.location is not Location.LOADING]
        return sorted(free, key=lambda e: e.last_used)

    def _make_room(self, name: str, needed: int) -> None:
        limit = self.config.max_memory_usage
        if needed > limit:
            raise MemoryLimitError(
                f"{name} needs about {format_bytes(needed)}, more than the model memory "
                f"limit of {format_bytes(limit)} (MAX_MEMORY_USAGE) even alone")
        for victim in self._lru_candidates():
            if self.usage() + needed <= limit:
                break
            self._release(victim, f"evicted (LRU) to make room for {name}")
        if self.usage() + needed > limit:
            held = ", ".join(f"{e.name} {format_bytes(e.held_bytes())}"
                             f"{' (pinned)' if e.pinned else ''}{' (in use)' if e.in_use else ''}"
                             for e in self._models.values())
            raise MemoryLimitError(
                f"{name} needs about {format_bytes(needed)} but only "
                f"{format_bytes(limit - self.usage())} of the {format_bytes(limit)} limit is "
                f"free, and the rest is held by models that cannot be evicted: {held}")

    def _make_gpu_room(self, name: str, needed: int, keep: Entry | None = None) -> None:
        """Offload LRU models from the GPU until `needed` more bytes fit under the cap
        (LBS_GPU_MEMORY_LIMIT); a model that does not fit is left to the device map."""
        cap = self.config.gpu_cap_bytes
        if not cap:
            return
        on_gpu = [e for e in self._lru_candidates() if e.location is Location.GPU and e is not keep]
        for victim in on_gpu:
            used = sum(e.size for e in self._models.values() if e.location is Location.GPU)
            if used + needed <= cap:
                break
            self._offload(victim, f"GPU cap: making room for {name}")


def _pinned_bytes(entry: Entry) -> int:
    """Pinned host memory the model's copy takes: what the host allocator rounds its
    blocks to (HeldModel.pinned_bytes; HFRunner's counts the rounding)."""
    return entry.runner.pinned_bytes()
