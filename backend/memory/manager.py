"""Model manager: which models a worker holds, and what happens to them after a job.

This is the seam the full manager (offload to CPU, restore, idle timeout, LRU
eviction, pins) grows from. Today it loads lazily on first use and applies the
dataset's cache mode after every job, also when the job raised:

- cached: the model stays loaded for the next job of the same model;
- uncached: the model is released fully (references dropped, gc, CUDA cache
  emptied), and RSS readings around the release are recorded.

LBS_USE_MODEL_CACHE=0 makes every job uncached. One manager per worker
process; it is not shared between threads running jobs at the same time.
"""

from __future__ import annotations

import gc
import logging
import time
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from backend.datasets.base import CacheMode
from backend.memory.tracker import rss_bytes
from backend.runners.base import Runner

log = logging.getLogger(__name__)


@dataclass
class ModelEvent:
    """One load or release, with its duration and the RSS before and after."""

    kind: str
    model: str
    seconds: float
    rss_before: int
    rss_after: int

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "model": self.model, "seconds": round(self.seconds, 4),
                "rss_before_bytes": self.rss_before, "rss_after_bytes": self.rss_after}


@dataclass
class _Entry:
    runner: Runner
    name: str
    load_count: int = 1
    last_used: float = field(default_factory=time.monotonic)


class ModelManager:
    """Lazily loaded models of one worker, keyed by whatever makes them differ."""

    def __init__(self, use_cache: bool = True):
        self.use_cache = use_cache
        self._models: dict[Hashable, _Entry] = {}
        self.load_counts: dict[Hashable, int] = {}
        self.events: list[ModelEvent] = []

    def loaded(self) -> list[str]:
        return [entry.name for entry in self._models.values()]

    @contextmanager
    def use(self, key: Hashable, name: str, load: Callable[[], Runner],
            cache_mode: CacheMode) -> Iterator[Runner]:
        """Yield the model for `key`, loading it with `load()` if needed; afterwards
        keep it (cached) or release it (uncached), whether or not the body raised."""
        entry = self._models.get(key)
        if entry is None:
            before = rss_bytes()
            started = time.perf_counter()
            runner = load()
            self.events.append(ModelEvent("load", name, time.perf_counter() - started,
                                          before, rss_bytes()))
            self.load_counts[key] = self.load_counts.get(key, 0) + 1
            entry = self._models[key] = _Entry(runner, name, self.load_counts[key])
        entry.last_used = time.monotonic()
        try:
            yield entry.runner
        finally:
            entry.last_used = time.monotonic()
            if cache_mode is CacheMode.UNCACHED or not self.use_cache:
                self.release(key)

    def release(self, key: Hashable) -> ModelEvent | None:
        """Drop the model for `key` entirely and return what the release measured."""
        entry = self._models.pop(key, None)
        if entry is None:
            return None
        before = rss_bytes()
        started = time.perf_counter()
        entry.runner.close()
        del entry
        gc.collect()
        _empty_cuda_cache()
        _trim_heap()
        event = ModelEvent("release", self._name_of(key), time.perf_counter() - started,
                           before, rss_bytes())
        self.events.append(event)
        log.info("[ModelManager] released %s: RSS %+.1f MB", event.model,
                 (event.rss_after - event.rss_before) / 2**20)
        return event

    def release_all(self) -> None:
        for key in list(self._models):
            self.release(key)

    def _name_of(self, key: Hashable) -> str:
        return key[0] if isinstance(key, tuple) and key else str(key)


def _empty_cuda_cache() -> None:
    import sys

    torch = sys.modules.get("torch")  # never import torch just to release nothing
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """Ask glibc to hand freed heap pages back to the OS, so RSS really drops."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
