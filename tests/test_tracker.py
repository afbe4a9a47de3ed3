"""Memory peaks: a spike inside a window is caught, for the window and the job."""

from __future__ import annotations

import mmap
import time

import pytest

from backend.engine.memory import tracker


@pytest.mark.parametrize("use_kernel_mark", [True, False])
def test_peak_sampler_sees_a_short_spike(monkeypatch, use_kernel_mark):
    if not use_kernel_mark:
        monkeypatch.setattr(tracker, "_reset_hwm", lambda: False)
    sampler = tracker.PeakSampler(interval_s=0.002).start()
    base = tracker.rss_bytes()
    sampler.new_window()
    # An anonymous mapping, not a Python object: malloc may keep a freed block resident
    # (a busy heap in a long test process did), while munmap returns every page at once.
    spike = mmap.mmap(-1, 300 * 2**20)
    page = b"\x01" * mmap.PAGESIZE
    for _ in range(len(spike) // len(page)):  # every page touched
        spike.write(page)
    if not use_kernel_mark:
        time.sleep(0.05)  # the sampling thread needs to see it
    spike.close()
    window = sampler.window_peak()
    sampler.new_window()
    quiet = sampler.window_peak()
    job = sampler.stop()
    assert window - base > 250 * 2**20
    assert quiet - base < 100 * 2**20, "a new window starts from the RSS now"
    assert job >= window


def test_cuda_peaks_start_cuda_before_resetting(monkeypatch):
    """torch 2.13's reset_peak_memory_stats does not start CUDA and fails before it is
    started; the CLI and bench/compare.py reach CudaPeaks with nothing else having
    started it, so CudaPeaks must start it itself."""
    from tests.fake_cuda import FakeCuda, install

    fake = install(monkeypatch, FakeCuda([24 * 2**30, 24 * 2**30]))
    peaks = tracker.CudaPeaks()
    peaks.reset()
    fake.peaks[1] = 5 * 2**20
    peaks.new_window()
    assert peaks.window_peak() == 0  # the new window starts from the reset
    fake.peaks[0] = 3 * 2**20
    assert peaks.window_peak() == 3 * 2**20
    assert peaks.job_peaks()["cuda:1"]["max_allocated"] == 5 * 2**20
    first_reset = fake.calls.index(("reset_peak_memory_stats", 0))
    assert ("init",) in fake.calls[:first_reset]
