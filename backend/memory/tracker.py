"""Memory readings of the worker process: RSS peaks and CUDA allocator peaks.

`PeakSampler` runs a background thread that reads the process RSS every few
milliseconds and keeps two running maxima: one for the whole job and one for
the current window (a sample). Short spikes between two readings can be
missed; on Linux the kernel's own high-water mark (VmHWM, reset through
/proc/self/clear_refs) closes that gap where the kernel allows it.
"""

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


@dataclass
class PeakSampler:
    """Samples RSS in a thread; `job_peak` and `window_peak()` are maxima in bytes."""

    interval_s: float = 0.005
    job_peak: int = 0
    _window_peak: int = 0
    _hwm_ok: bool = False
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> PeakSampler:
        self._hwm_ok = _reset_hwm()
        now = rss_bytes()
        self.job_peak = self._window_peak = now
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

    def new_window(self) -> None:
        """Start a new window (a sample): its peak starts from the RSS now."""
        self._window_peak = rss_bytes()

    def window_peak(self) -> int:
        self._note(rss_bytes())
        return self._window_peak

    def stop(self) -> int:
        """Stop sampling; the job's peak RSS in bytes (kernel high-water mark included)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._note(rss_bytes())
        if self._hwm_ok:
            hwm = _read_hwm()
            if hwm:
                self.job_peak = max(self.job_peak, hwm)
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
        self._job: dict[int, dict[str, int]] = {
            i: {"max_allocated": 0, "max_reserved": 0} for i in range(self.devices)}

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
        for i in range(self.devices):
            self._torch.cuda.reset_peak_memory_stats(i)

    def window_peak(self) -> int | None:
        """Peak bytes allocated on all devices together in the current window."""
        if not self.devices:
            return None
        return sum(self._torch.cuda.max_memory_allocated(i) for i in range(self.devices))

    def job_peaks(self) -> dict[str, dict[str, int]]:
        """Per-device `max_allocated` / `max_reserved` bytes of the whole job."""
        self._fold()
        return {f"cuda:{i}": dict(peaks) for i, peaks in self._job.items()}
