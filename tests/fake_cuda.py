"""A stand-in for `torch.cuda` on machines without a GPU, following torch 2.13's contract
where the code under test depends on it (torch/cuda/memory.py, torch/cuda/__init__.py):

- `is_available()` and `device_count()` do not start CUDA; `init()` does (`_lazy_init`).
- `reset_peak_memory_stats` calls `torch._C._cuda_resetPeakMemoryStats` without
  `_lazy_init`; before CUDA starts the caching allocator has no devices and rejects
  it ("Invalid device argument 0: did you call init?", c10 CUDACachingAllocator).
- `max_memory_allocated` / `max_memory_reserved` read `memory_stats`, which is `{}`
  before init (`memory_stats_as_nested_dict`), so they answer 0 instead of failing.
- `set_per_process_memory_fraction(fraction, device=None)` starts CUDA, requires a
  float in [0, 1] and sets the cap of that device's allocator.

Install it with `install(monkeypatch, fake)`; every call is recorded in `calls`.
"""

from __future__ import annotations

GiB = 1024**3


class FakeCuda:
    def __init__(self, totals: list[int] | None = None):
        self.totals = totals or [24 * GiB]
        self.initialized = False
        self.calls: list[tuple] = []
        self.peaks = {i: 0 for i in range(len(self.totals))}
        self.fractions: dict[int, float] = {}

    # --- starting CUDA -------------------------------------------------------------
    def is_available(self) -> bool:
        return True

    def device_count(self) -> int:
        return len(self.totals)

    def is_initialized(self) -> bool:
        return self.initialized

    def init(self) -> None:
        self.calls.append(("init",))
        self.initialized = True

    def current_device(self) -> int:
        self.initialized = True
        return 0

    # --- allocator statistics --------------------------------------------------------
    def _index(self, device) -> int:
        if device is None:
            return 0
        return device if isinstance(device, int) else int(str(device).split(":")[-1])

    def reset_peak_memory_stats(self, device=None) -> None:
        index = self._index(device)
        self.calls.append(("reset_peak_memory_stats", index))
        if not self.initialized or index >= len(self.totals):
            raise RuntimeError(f"Invalid device argument {index}: did you call init?")
        self.peaks[index] = 0

    def max_memory_allocated(self, device=None) -> int:
        return self.peaks[self._index(device)] if self.initialized else 0

    def max_memory_reserved(self, device=None) -> int:
        return self.max_memory_allocated(device)

    # --- the per-process cap -----------------------------------------------------------
    def set_per_process_memory_fraction(self, fraction, device=None) -> None:
        self.initialized = True  # _lazy_init()
        index = self.current_device() if device is None else self._index(device)
        if not isinstance(fraction, float):
            raise TypeError("Invalid type for fraction argument, must be `float`")
        if fraction < 0 or fraction > 1:
            raise ValueError(f"Invalid fraction value: {fraction}. Allowed range: 0~1")
        self.calls.append(("set_per_process_memory_fraction", fraction, index))
        self.fractions[index] = fraction

    def get_device_properties(self, device):
        class Props:
            total_memory = self.totals[self._index(device)]
        return Props()


def install(monkeypatch, fake: FakeCuda) -> FakeCuda:
    """Put the fake's functions on the real `torch.cuda` module for one test."""
    import torch

    for name in ("is_available", "device_count", "is_initialized", "init", "current_device",
                 "reset_peak_memory_stats", "max_memory_allocated", "max_memory_reserved",
                 "set_per_process_memory_fraction", "get_device_properties"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    return fake
