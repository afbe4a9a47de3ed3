"""Model manager: which models a worker holds, where, and for how long.

One manager per worker process, created at worker start. Models are keyed by
what makes them different (name, path, backend, load options) and live in one
of the `Location`s. The contract:

- **Lazy load**: `use()` loads a model on first use. Before loading, the
  model's size is estimated and least-recently-used unpinned models that are
  not in use are released until it fits under `max_memory_usage`; a model that
  cannot fit even alone, or only by evicting pinned models, is refused with
  `MemoryLimitError` naming the sizes.
- **After a job** (`use()` exits, also when the body raised): an uncached
  dataset's model is released; a cached one stays where it is when
  `keep_on_gpu()` says the next job needs it, else it is offloaded to CPU RAM
  (dropping its GPU copy; its CPU copy is kept, pinned within the pinned
  budget, so the next restore is one host-to-device copy). Without a GPU a
  cached model simply stays in RAM.
- **Idle monitor** (`start_monitor`): a model idle on the GPU longer than
  `idle_timeout` is offloaded; idle in RAM longer than `release_timeout` it is
  released. Every `check_interval` a pressure check runs and, with
  `auto_cleanup`, unloads LRU models while there is pressure.
- **Pins**: a pinned model is never evicted, cleaned up or idle-released.

All public methods are thread-safe (the worker's job thread, its idle monitor
and its control thread share the manager). Models in use by a job are never
moved or released from another thread: such requests answer `ModelBusy`.
`on_move`, when set, is called with each event (load, offload, restore,
release, oom) right after the move, under the manager's lock: it must return at
once and call neither the manager from another thread nor the database (the
worker's only sets a flag that makes its control thread publish the status).
"""

from __future__ import annotations

import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from typing import Any

import psutil

from backend.common.units import format_bytes
from backend.engine.contracts import CacheMode
from backend.engine.memory import cuda
from backend.engine.memory.entries import (
    Entry,
    Location,
    ManagerConfig,
    ModelBusy,
    ModelEvent,
    UnknownModel,
)
from backend.engine.memory.store import ModelStore
from backend.engine.memory.tracker import rss_bytes

log = logging.getLogger(__name__)


class ModelManager(ModelStore):
    """Lazily loaded models of one worker; see the module docstring for the contract."""

    def __init__(self, config: ManagerConfig | None = None, has_gpu: bool | None = None,
                 use_cache: bool | None = None):
        super().__init__(config, has_gpu, use_cache)
        self._monitor: threading.Thread | None = None
        self._stop = threading.Event()
        self._last_check = time.monotonic()

    # --- using a model -------------------------------------------------------------

    @contextmanager
    def use(self, key: Hashable, name: str, load: Callable[[], Any], cache_mode: CacheMode,
            estimate: int = 0, keep_on_gpu: Callable[[], bool] | None = None) -> Iterator[Any]:
        """Yield the runner for `key`: restored if offloaded, loaded with `load()` if not
        held (after making room for `estimate` bytes). Afterwards apply the cache policy."""
        entry = self._acquire(key, name, load, estimate)
        try:
            yield entry.runner
        except BaseException as exc:
            # The failed job's frames, down to the model's own forward, hold the runner's
            # tensors and the model itself (`self`): drop their locals, or the release
            # below empties the allocators' caches while the weights are still held.
            traceback.clear_frames(exc.__traceback__)
            raise
        finally:
            cached = cache_mode is CacheMode.CACHED and self.config.use_cache
            # asked before taking the lock: it queries the database, and the heartbeat
            # and the control thread must not wait on that
            keep = cached and keep_on_gpu is not None and _asked(keep_on_gpu)
            with self._lock:
                entry.in_use = False
                entry.last_used, entry.last_used_wall = time.monotonic(), time.time()
                if not cached:
                    self._release(entry, "uncached dataset" if self.config.use_cache
                                  else "LBS_USE_MODEL_CACHE=0")
                elif entry.location is Location.GPU and not keep:
                    self._offload(entry, "job finished")

    def _acquire(self, key: Hashable, name: str, load: Callable[[], Any],
                 estimate: int) -> Entry:
        with self._lock:
            entry = self._models.get(key)
            while entry is not None and entry.moving:  # a prefetch is bringing it back
                self._changed.wait()
                entry = self._models.get(key)
            if entry is not None:
                if entry.location is Location.CPU and self.has_gpu and entry.runner.movable():
                    self._make_gpu_room(name, entry.size, keep=entry)
                    self._restore(entry)
                entry.in_use = True
                entry.last_used, entry.last_used_wall = time.monotonic(), time.time()
                self._changed.notify_all()
                return entry
            self._make_room(name, estimate)
            if self.has_gpu:
                self._make_gpu_room(name, estimate)
            placeholder = Entry(key, name, None, Location.LOADING, estimate, in_use=True)
            self._models[key] = placeholder
        before = rss_bytes()
        started = time.perf_counter()
        try:
            runner = load()
        except BaseException:
            with self._lock:
                self._models.pop(key, None)
                self._changed.notify_all()
            raise
        with self._lock:
            placeholder.runner = runner
            placeholder.size = runner.size_bytes()
            placeholder.location = (Location.GPU if str(runner.device).startswith("cuda")
                                    else Location.CPU)
            self.load_counts[key] = self.load_counts.get(key, 0) + 1
            placeholder.load_count = self.load_counts[key]
            self._event("load", name, started, before, placeholder.size)
            self.tracker.checkpoint(f"load {name}")
            self._changed.notify_all()
            return placeholder

    def wait_loaded(self, name: str, timeout: float) -> bool:
        """Wait until a job holds a model called `name`, loaded (or restored) where it
        runs; False when `timeout` seconds passed first (its load may have failed, or
        the job ended)."""
        def ready() -> bool:
            return any(e.name == name and e.in_use and e.location is not Location.LOADING
                       for e in self._models.values())
        with self._lock:
            return self._changed.wait_for(ready, timeout)

    def prefetch(self, name: str, free_gpu_bytes: Callable[[], int] | None = None,
                 reserve: int = 0) -> bool:
        """Restore `name` to the GPU ahead of its job, if it is offloaded, idle and fits,
        with a 20% margin and next to `reserve` bytes (what the running job will still
        allocate: its KV cache and activations), both under the process cap
        (LBS_GPU_MEMORY_LIMIT: the models on the GPU count against it) and in the free
        GPU memory.
        Returns whether it did. The worker calls it from a thread once the running job's
        model has loaded; the copy runs outside the lock (a job that wants the model
        meanwhile waits for it; commands answer busy)."""
        with self._lock:
            if not self.has_gpu:
                return False
            entry = next((e for e in self._models.values() if e.name == name), None)
            if entry is None or entry.location is not Location.CPU or entry.in_use \
                    or entry.moving:
                return False
            cap = self.config.gpu_cap_bytes
            on_gpu = sum(e.size for e in self._models.values() if e.location is Location.GPU)
            free = (free_gpu_bytes or cuda.free_gpu_bytes)()
            needed = entry.size * 1.2 + reserve  # the running job allocates `reserve` still
            if (cap and on_gpu + needed > cap) or needed > free:
                return False
            entry.moving = True
        before, started = rss_bytes(), time.perf_counter()
        try:
            moved = entry.runner.restore(background=True)
        finally:
            with self._lock:
                entry.moving = False
                self._changed.notify_all()
        with self._lock:
            entry.location = Location.GPU
            entry.last_used = time.monotonic()  # so the idle monitor does not undo it
            self._event("restore", entry.name, started, before, moved,
                        "prefetched for the next queued job")
            return True

    def pressure(self) -> dict[str, Any]:
        """Whether memory is under pressure, why, and which models to unload (LRU first)."""
        with self._lock:
            usage, limit = self.usage(), self.config.max_memory_usage
            available = psutil.virtual_memory().available
            reasons = []
            if usage > self.config.pressure_ratio * limit:
                reasons.append(f"managed memory {format_bytes(usage)} is over "
                               f"{self.config.pressure_ratio:.0%} of the limit "
                               f"{format_bytes(limit)}")
            if available < self.config.min_available_bytes:
                reasons.append(f"system available RAM {format_bytes(available)} is under "
                               f"{format_bytes(self.config.min_available_bytes)}")
            return {"memory_pressure": bool(reasons), "reasons": reasons,
                    "usage_ratio": round(usage / limit, 4) if limit else 0.0,
                    "recommended_unload": [e.name for e in self._lru_candidates()]
                    if reasons else []}

    def cleanup(self, force: bool = False) -> dict[str, Any]:
        """Unload LRU unpinned idle models while there is pressure (all of them if `force`)."""
        with self._lock:
            freed, unloaded = 0, []
            for entry in self._lru_candidates():
                if not force and not self.pressure()["memory_pressure"]:
                    break
                freed += entry.held_bytes()
                unloaded.append(entry.name)
                self._release(entry, "cleanup" + (" (forced)" if force else " under pressure"))
            return {"unloaded": unloaded, "freed_bytes": freed,
                    "formatted_freed": format_bytes(freed, brief_labels=True)}

    # --- commands (from the API, through the worker) ---------------------------------

    def _named(self, name: str | None) -> list[Entry]:
        entries = [e for e in self._models.values()
                   if (name is None or e.name == name) and e.location is not Location.LOADING]
        if name is not None and not entries:
            raise UnknownModel(f"model {name!r} is not loaded on this worker")
        return entries

    def offload(self, name: str | None = None) -> list[dict[str, Any]]:
        """Offload one model (or every GPU model) to CPU RAM; a model in use is refused,
        one this manager does not hold raises UnknownModel (also without a GPU)."""
        with self._lock:
            entries = self._named(name)
            if not self.has_gpu:
                return []
            done = []
            for entry in entries:
                if entry.busy:
                    raise ModelBusy(f"{entry.name} is in use by a running job")
                event = self._offload(entry, "requested")
                if event:
                    done.append(event.as_dict())
            return done

    def release(self, name: str | None = None, *, include_pinned: bool = True) -> list[dict]:
        """Release one model (or all) fully; answers after the release was verified."""
        with self._lock:
            done = []
            for entry in self._named(name):
                if entry.busy:
                    raise ModelBusy(f"{entry.name} is in use by a running job")
                if entry.pinned and not include_pinned:
                    continue
                done.append(self._release(entry, "requested").as_dict())
            return done

    def release_all(self) -> None:
        with self._lock:
            for entry in list(self._models.values()):
                if not entry.busy:
                    self._release(entry, "worker stopping")

    def set_pinned(self, name: str, pinned: bool) -> None:
        with self._lock:
            for entry in self._named(name):
                entry.pinned = pinned

    def set_idle_timeout(self, seconds: float) -> None:
        with self._lock:
            self.config.idle_timeout = float(seconds)

    def set_limit(self, nbytes: int) -> dict[str, Any]:
        with self._lock:
            self.config.max_memory_usage = int(nbytes)
            return self.cleanup() if self.usage() > nbytes else {"unloaded": []}

    def record_oom(self, name: str, note: str) -> ModelEvent:
        """An out-of-memory error while `name` ran: free what the failed attempt left
        (garbage, the CUDA cache) and record the event. The model stays where it is,
        so the manager's view of it is still true."""
        with self._lock:
            before, started = rss_bytes(), time.perf_counter()
            gpu_before = cuda.gpu_reserved()
            gc.collect()
            cuda.empty_cuda_cache()
            if gpu_before:
                note += f"; GPU reserved {format_bytes(gpu_before - cuda.gpu_reserved())} freed"
            return self._event("oom", name, started, before, 0, note)

    def events_since(self, count: int) -> list[ModelEvent]:
        """Events recorded after the manager had recorded `count` of them."""
        with self._lock:
            return self.events[-(self.event_count - count):] if self.event_count > count else []

    def loaded(self) -> list[str]:
        with self._lock:
            return [e.name for e in self._models.values()]

    # --- idle monitor ---------------------------------------------------------------

    def tick(self, now: float | None = None) -> None:
        """One pass of the idle monitor (the thread calls it; tests may too)."""
        now = time.monotonic() if now is None else now
        with self._lock:
            for entry in list(self._models.values()):
                if entry.busy or entry.location is Location.LOADING:
                    continue
                idle = now - entry.last_used
                if entry.location is Location.GPU and idle > self.config.idle_timeout:
                    self._offload(entry, f"idle {idle:.0f} s on GPU")
                elif (entry.location is Location.CPU and not entry.pinned
                      and idle > self.config.release_timeout):
                    self._release(entry, f"idle {idle:.0f} s in RAM")
            if now - self._last_check >= self.config.check_interval:
                self._last_check = now
                if self.config.auto_cleanup and self.pressure()["memory_pressure"]:
                    log.warning("[ModelManager] memory pressure: %s",
                                "; ".join(self.pressure()["reasons"]))
                    self.cleanup()

    def start_monitor(self, interval: float = 0.5) -> None:
        if self._monitor is not None:
            return
        self._stop.clear()

        def run() -> None:
            while not self._stop.wait(interval):
                try:
                    self.tick()
                except Exception:  # noqa: BLE001 - the monitor must outlive one bad pass
                    log.exception("[ModelManager] idle monitor pass failed")

        self._monitor = threading.Thread(target=run, name="idle-monitor", daemon=True)
        self._monitor.start()

    def stop_monitor(self) -> None:
        self._stop.set()
        if self._monitor is not None:
            self._monitor.join(5)
            self._monitor = None

    @property
    def monitor_running(self) -> bool:
        return self._monitor is not None and self._monitor.is_alive()

    # --- status --------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        """Everything the memory and GPU endpoints show, as plain JSON."""
        with self._lock:
            now = time.monotonic()
            vm = psutil.virtual_memory()
            usage, limit = self.usage(), self.config.max_memory_usage
            models = [{
                "model_name": e.name, "location": e.location.value, "size_bytes": e.size,
                "held_bytes": e.held_bytes(), "formatted_size": format_bytes(e.size),
                "load_count": e.load_count, "pinned": e.pinned, "in_use": e.in_use,
                "idle_time_seconds": round(now - e.last_used, 1),
                "last_access": e.last_used_wall, "loaded_at": e.loaded_at,
            } for e in self._models.values()]
            return {
                "models": models, "has_gpu": self.has_gpu,
                "idle_timeout_seconds": self.config.idle_timeout,
                "release_timeout_seconds": self.config.release_timeout,
                "monitor_running": self.monitor_running,
                "total_models": len(models), "total_memory_usage": usage,
                "memory_limit": limit, "pressure": self.pressure(),
                "system_available": vm.available, "system_total": vm.total,
                "gpu_memory": cuda.gpu_memory(), "rss_bytes": rss_bytes(),
                "events": [e.as_dict() for e in self.events[-20:]],
            }


def _asked(question: Callable[[], bool]) -> bool:
    try:
        return bool(question())
    except Exception:  # noqa: BLE001 - a failed "keep it?" must not leave the model in use
        log.exception("[ModelManager] keep_on_gpu failed; offloading")
        return False
