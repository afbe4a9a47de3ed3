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

import enum
import gc
import logging
import threading
import time
import traceback
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import psutil

from backend.common.units import GiB, format_bytes
from backend.datasets.base import CacheMode
from backend.engine.memory.held import HeldModel
from backend.engine.memory.tracker import MemoryTracker, rss_bytes

log = logging.getLogger(__name__)

class Location(str, enum.Enum):
    UNLOADED = "unloaded"
    LOADING = "loading"
    GPU = "gpu"
    CPU = "cpu"


class MemoryLimitError(RuntimeError):
    """A model cannot be loaded under the memory limit."""


class ModelBusy(RuntimeError):
    """The model is in use by a running job."""


class UnknownModel(LookupError):
    """No model of that name is held by this manager."""


@dataclass
class ManagerConfig:
    max_memory_usage: int = 0  # 0 = 80% of RAM
    idle_timeout: float = 600.0
    release_timeout: float = 3600.0
    check_interval: float = 60.0
    auto_cleanup: bool = True
    pressure_ratio: float = 0.8
    min_available_bytes: int = 2 * GiB
    pinned_budget: int = 0  # 0 = 25% of RAM
    use_cache: bool = True
    gpu_cap_bytes: int = 0  # LBS_GPU_MEMORY_LIMIT x the first GPU's total; 0 = no cap

    @classmethod
    def from_settings(cls, settings: Any) -> ManagerConfig:
        return cls(max_memory_usage=settings.max_memory_usage,
                   gpu_cap_bytes=_gpu_cap(settings.gpu_memory_limit),
                   idle_timeout=settings.gpu_idle_timeout,
                   release_timeout=settings.release_timeout,
                   check_interval=settings.memory_check_interval,
                   auto_cleanup=settings.auto_cleanup_enabled,
                   pressure_ratio=settings.pressure_ratio,
                   min_available_bytes=int(settings.min_available_gb * GiB),
                   pinned_budget=settings.pinned_memory_budget,
                   use_cache=settings.use_model_cache)


@dataclass
class ModelEvent:
    """One load, offload, restore or release, with its duration, bytes and RSS."""

    kind: str
    model: str
    seconds: float
    rss_before: int
    rss_after: int
    bytes: int = 0
    note: str | None = None

    def as_dict(self) -> dict[str, Any]:
        out = {"kind": self.kind, "model": self.model, "seconds": round(self.seconds, 4),
               "bytes": self.bytes, "rss_before_bytes": self.rss_before,
               "rss_after_bytes": self.rss_after}
        if self.note:
            out["note"] = self.note
        return out


@dataclass
class _Entry:
    key: Hashable
    name: str
    runner: HeldModel | None  # None while it loads
    location: Location
    size: int
    load_count: int = 1
    pinned: bool = False
    in_use: bool = False
    moving: bool = False  # a prefetch copies it to the GPU outside the lock
    loaded_at: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.monotonic)
    last_used_wall: float = field(default_factory=time.time)

    @property
    def busy(self) -> bool:
        """In use by a job, or being copied by a prefetch: nothing else may move it."""
        return self.in_use or self.moving

    def held_bytes(self) -> int:
        """RAM and GPU bytes this model holds now (a GPU model may keep a CPU copy)."""
        return self.size + (self.runner.host_bytes() if self.runner is not None else 0)


class ModelManager:
    """Lazily loaded models of one worker; see the module docstring for the contract."""

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
        self.has_gpu = _cuda_available() if has_gpu is None else has_gpu
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)  # a load or a prefetch ended
        self._models: dict[Hashable, _Entry] = {}
        self.load_counts: dict[Hashable, int] = {}
        self.events: list[ModelEvent] = []
        self.event_count = 0  # events ever recorded; `events` keeps the last 200
        self.on_move: Callable[[ModelEvent], None] | None = None
        self.tracker = MemoryTracker()
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
                 estimate: int) -> _Entry:
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
            placeholder = _Entry(key, name, None, Location.LOADING, estimate, in_use=True)
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

    # --- moves ---------------------------------------------------------------------

    def _offload(self, entry: _Entry, why: str) -> ModelEvent | None:
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
            _empty_cuda_cache()  # the blocks pinned before the failure
            copied = entry.runner.offload(pin=False)
            how = f"pageable (pinning failed: {exc})"
        entry.location = Location.CPU
        _empty_cuda_cache()
        return self._event("offload", entry.name, started, before, copied,
                           f"{why}; host copy {how}")

    def _restore(self, entry: _Entry) -> ModelEvent:
        before, started = rss_bytes(), time.perf_counter()
        moved = entry.runner.restore()
        entry.location = Location.GPU
        return self._event("restore", entry.name, started, before, moved)

    def _release(self, entry: _Entry, why: str) -> ModelEvent:
        self._models.pop(entry.key, None)
        before, started = rss_bytes(), time.perf_counter()
        gpu_before = _gpu_reserved()
        size = entry.size
        entry.runner.close()
        entry.runner = None
        gc.collect()
        _empty_cuda_cache()
        _trim_heap()
        check = self.tracker.release_check(f"release {entry.name}", before, expected_bytes=size)
        if gpu_before:
            check += f"; GPU reserved {format_bytes(gpu_before - _gpu_reserved())} freed"
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

    def _pinned_room(self, entry: _Entry) -> int:
        used = sum(_pinned_bytes(e) for e in self._models.values()
                   if e is not entry and e.runner is not None and e.runner.host_pinned)
        return self.config.pinned_budget - used

    # --- limits, eviction, pressure --------------------------------------------------

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

    def _lru_candidates(self) -> list[_Entry]:
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

    def _make_gpu_room(self, name: str, needed: int, keep: _Entry | None = None) -> None:
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
            free = (free_gpu_bytes or _free_gpu_bytes)()
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

    def _named(self, name: str | None) -> list[_Entry]:
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
            gpu_before = _gpu_reserved()
            gc.collect()
            _empty_cuda_cache()
            if gpu_before:
                note += f"; GPU reserved {format_bytes(gpu_before - _gpu_reserved())} freed"
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
                "gpu_memory": gpu_memory(), "rss_bytes": rss_bytes(),
                "events": [e.as_dict() for e in self.events[-20:]],
            }


def _pinned_bytes(entry: _Entry) -> int:
    """Pinned host memory the model's copy takes: what the host allocator rounds its
    blocks to (HeldModel.pinned_bytes; HFRunner's counts the rounding)."""
    return entry.runner.pinned_bytes()


def _asked(question: Callable[[], bool]) -> bool:
    try:
        return bool(question())
    except Exception:  # noqa: BLE001 - a failed "keep it?" must not leave the model in use
        log.exception("[ModelManager] keep_on_gpu failed; offloading")
        return False


def gpu_memory() -> dict[str, dict[str, float]]:
    """Per visible GPU: allocated/reserved by this process and total, in GB (2**30 bytes)."""
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return {}
    return {f"GPU_{i}": {
        "allocated_gb": round(torch.cuda.memory_allocated(i) / GiB, 3),
        "reserved_gb": round(torch.cuda.memory_reserved(i) / GiB, 3),
        "total_gb": round(torch.cuda.get_device_properties(i).total_memory / GiB, 3),
    } for i in range(torch.cuda.device_count())}


def _cuda_available() -> bool:
    import sys

    torch = sys.modules.get("torch")
    return bool(torch is not None and torch.cuda.is_available())


def _gpu_cap(fraction: float) -> int:
    """The cap on the models the manager keeps on the GPU: the limit's share of the
    first GPU, where a movable (single-device) model lives and where the loader caps
    it (memory/limits.py); not of every GPU together, which would let models pile up
    on the first GPU beyond its own cap."""
    import sys

    torch = sys.modules.get("torch")
    if fraction <= 0 or torch is None or not torch.cuda.is_available():
        return 0
    return int(fraction * torch.cuda.get_device_properties(0).total_memory)


def _free_gpu_bytes() -> int:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return torch.cuda.mem_get_info()[0]


def _gpu_reserved() -> int:
    import sys

    torch = sys.modules.get("torch")
    if torch is None or not torch.cuda.is_available():
        return 0
    return sum(torch.cuda.memory_reserved(i) for i in range(torch.cuda.device_count()))


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to release nothing
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        host_empty = getattr(torch._C, "_host_emptyCache", None)
        if host_empty is not None:  # the caching allocator for pinned host memory
            host_empty()


def _trim_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS really drops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
