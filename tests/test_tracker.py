"""Memory peaks: a spike inside a window is caught, for the window and the job."""

from __future__ import annotations

import pytest

from backend.memory import tracker


@pytest.mark.parametrize("use_kernel_mark", [True, False])
def test_peak_sampler_sees_a_short_spike(monkeypatch, use_kernel_mark):
    if not use_kernel_mark:
        monkeypatch.setattr(tracker, "_reset_hwm", lambda: False)
    sampler = tracker.PeakSampler(interval_s=0.002).start()
    base = tracker.rss_bytes()
    sampler.new_window()
    spike = b"\x01" * (300 * 2**20)  # 300 MB, every page touched
    if not use_kernel_mark:
        import time

        time.sleep(0.05)  # the sampling thread needs to see it
    del spike
    window = sampler.window_peak()
    sampler.new_window()
    quiet = sampler.window_peak()
    job = sampler.stop()
    assert window - base > 250 * 2**20
    assert quiet - base < 100 * 2**20, "a new window starts from the RSS now"
    assert job >= window
