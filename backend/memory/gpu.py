"""NVML helpers: GPU facts read without torch (the server uses them)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


def visible_gpu_count(cuda_visible_devices: str | None) -> int:
    """How many GPUs this machine shows to CUDA programs (0 without NVML or a driver).

    `cuda_visible_devices` is the CUDA_VISIBLE_DEVICES value in force, if any.
    """
    if cuda_visible_devices is not None:
        entries = [e for e in cuda_visible_devices.split(",") if e.strip() and e.strip() != "-1"]
        if not entries:
            return 0
    try:
        import pynvml
    except ImportError:
        return 0
    try:
        pynvml.nvmlInit()
        try:
            count = pynvml.nvmlDeviceGetCount()
        finally:
            pynvml.nvmlShutdown()
    except pynvml.NVMLError:
        return 0
    if cuda_visible_devices is not None:
        return min(count, len(entries))
    return count
