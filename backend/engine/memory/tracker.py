"""Memory readings of the worker process: RSS peaks and CUDA allocator peaks."""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MB = 1024 * 1024
_STATUS = Path("/proc/self/status")
_CLEAR_REFS = Path("/proc/self/clear_refs")


def rss_bytes() -> int:
    """Resident set size of this process now."""
    return psutil.Process().memory_info().rss


def _read_hwm() -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _reset_hwm() -> bool:
    try:
        _CLEAR_REFS.write_text("5")
        return True
    except OSError:
        return False


class MemoryTracker:
    """RSS at named checkpoints: delta and running total against a baseline, peak, history.

    Each checkpoint logs `[Memory] <name>: +123.4 MB RSS (total +456.7 MB)` and
    appends `(name, delta_mb, total_mb)` to `history`. `release_check` says how
    much RSS a release returned, or that it did not drop and why it may not have.
    """

    def __init__(self) -> None:
        self.baseline = self.last = self.peak = rss_bytes()
        self.history: list[tuple[str, float, float]] = []

    def checkpoint(self, name: str) -> tuple[float, float]:
        now = rss_bytes()
        delta_mb, total_mb = (now - self.last) / MB, (now - self.baseline) / MB
        self.last, self.peak = now, max(self.peak, now)
        self.history.append((name, round(delta_mb, 1), round(total_mb, 1)))
        del self.history[:-500]
        log.info("[Memory] %s: %+.1f MB RSS (total %+.1f MB)", name, delta_mb, total_mb)
        return delta_mb, total_mb

    def release_check(self, name: str, before_bytes: int,
                      expected_bytes: int | None = None) -> str:
        """Checkpoint after a release and describe what came back to the OS since
        `before_bytes` (RSS read just before the release)."""
        _, total_mb = self.checkpoint(name)
        delta_mb = (self.last - before_bytes) / MB
        freed = -delta_mb
        expected = f" of {expected_bytes / MB:.1f} MB expected" if expected_bytes else ""
        if freed > 0.5:
            return f"RSS returned {freed:.1f} MB{expected} (total {total_mb:+.1f} MB)"
        return (f"RSS did not drop ({delta_mb:+.1f} MB{expected}); the allocator may have "
                "kept the pages, the memory may already be reused, or references to the "
                "model may still be alive")


@dataclass
class PeakSampler:
    """Peak RSS of this process for a whole job and for each window (sample) in it.

    On Linux the kernel keeps the exact high-water mark (VmHWM), which
    /proc/self/clear_refs resets: each window resets it and reads it back, so
    no spike is missed and nothing runs in the background. Where that is not
    allowed, a thread samples RSS every `interval_s` instead (short spikes
    between two readings can then be missed).
    """

    interval_s: float = 0.01
    job_peak: int = 0
    _window_peak: int = 0
    _use_hwm: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PeakSampler:
        self._use_hwm = _reset_hwm() and _read_hwm() is not None
        self.job_peak = self._window_peak = rss_bytes()
        if not self._use_hwm:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
            self._thread.start()
        return self

    def _run(self) -> None:
        proc = psutil.Process()
        while not self._stop.wait(self.interval_s):
            self._note(proc.memory_info().rss)

    def _note(self, value: int) -> None:
        if value > self._window_peak:
            self._window_peak = value
        if value > self.job_peak:
            self.job_peak = value

    def _fold_hwm(self) -> None:
        if self._use_hwm:
            self._note(_read_hwm() or 0)

    def new_window(self) -> None:
        """Start a new window (a sample): its peak starts from the RSS now."""
        self._fold_hwm()  # what happened since the last reset still counts for the job
        if self._use_hwm:
            _reset_hwm()
        self._window_peak = rss_bytes()

    def window_peak(self) -> int:
        self._fold_hwm()
        self._note(rss_bytes())
        return self._window_peak

    def stop(self) -> int:
        """Stop sampling; the job's peak RSS in bytes."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._fold_hwm()
        self._note(rss_bytes())
        return self.job_peak


class CudaPeaks:
    """Torch allocator peaks per device, for a job and for each window (sample) in it.

    Torch keeps one resettable peak per device; to have both, the peak is folded
    into the job's running maximum before each window resets it. Without CUDA
    every reading is empty/None.
    """

    def __init__(self) -> None:
        import torch

        self._torch = torch
        self.devices = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if self.devices:
            # torch 2.13's reset_peak_memory_stats goes straight to the allocator
            # (torch/cuda/memory.py: no _lazy_init), which rejects every device before
            # CUDA starts ("Invalid device argument 0: did you call init?"), and
            # max_memory_allocated reads 0 until then. The worker starts CUDA early by
            # chance; the CLI and bench/compare.py do not: start it here.
            torch.cuda.init()
        self._job: dict[int, dict[str, int]] = {
            i: {"max_allocated": 0, "max_reserved": 0} for i in range(self.devices)}
        self.nvml_peak: int | None = None  # this process's use as NVML sees it
        self.nvml_device_peak: int | None = None  # used on its GPUs since worker start

    def _sample_nvml(self) -> None:
        import os

        from backend.engine.memory.gpu import device_used_since_baseline, process_gpu_bytes

        used = process_gpu_bytes(os.getpid()) if self.devices else None
        if used is not None:
            self.nvml_peak = max(self.nvml_peak or 0, used)
        elif self.devices:  # unknown (a container's PID namespace): the device's use
            device = device_used_since_baseline()
            if device is not None:
                self.nvml_device_peak = max(self.nvml_device_peak or 0, device)

    def nvml_readings(self) -> list[tuple[str, str, int | None]]:
        """The job's NVML readings (sampled at sample boundaries, CUDA context
        included): this process's use, None when NVML could not tell it, and then
        the device-level use since the worker started, when known."""
        if not self.devices:
            return []
        readings = [("cuda_nvml_process_used", "cuda:all", self.nvml_peak)]
        if self.nvml_peak is None and self.nvml_device_peak is not None:
            readings.append(("cuda_nvml_device_used", "cuda:all", self.nvml_device_peak))
        return readings

    def _fold(self) -> None:
        cuda = self._torch.cuda
        for i, peaks in self._job.items():
            peaks["max_allocated"] = max(peaks["max_allocated"], cuda.max_memory_allocated(i))
            peaks["max_reserved"] = max(peaks["max_reserved"], cuda.max_memory_reserved(i))

    def reset(self) -> None:
        """Start the job: forget every earlier peak."""
        for i in range(self.devices):
            self._torch.cuda.reset_peak_memory_stats(i)
        for peaks in self._job.values():
            peaks.update(max_allocated=0, max_reserved=0)

    def new_window(self) -> None:
        self._fold()
        if self.devices:
            self._sample_nvml()
        for i in range(self.devices):
            self._torch.cuda.reset_peak_memory_stats(i)

    def window_peak(self) -> int | None:
        """Peak bytes allocated on all devices together in the current window."""
        if not self.devices:
            return None
        self._sample_nvml()
        return sum(self._torch.cuda.max_memory_allocated(i) for i in range(self.devices))

    def job_peaks(self) -> dict[str, dict[str, int]]:
        """Per-device `max_allocated` / `max_reserved` bytes of the whole job."""
        self._fold()
        return {f"cuda:{i}": dict(peaks) for i, peaks in self._job.items()}
