"""What the model manager keeps about each model it holds: where it is (`Location`),
its bytes, pins, use and last use (`Entry`); the events of its moves (`ModelEvent`);
the manager's settings (`ManagerConfig`) and the errors its callers handle."""

from __future__ import annotations

import enum
import time
from collections.abc import Hashable
from dataclasses import dataclass, field
from typing import Any

from backend.common.units import GiB
from backend.engine.contracts import HeldModel
from backend.engine.memory.cuda import gpu_cap


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
                   gpu_cap_bytes=gpu_cap(settings.gpu_memory_limit),
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
class Entry:
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

