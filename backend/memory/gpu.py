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


def process_gpu_bytes(pid: int) -> int | None:
    """GPU memory NVML sees `pid` using on all devices (non-torch allocations and the
    CUDA context included), or None without NVML/driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: nothing to read
        return None
    try:
        total = 0
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid and proc.usedGpuMemory:
                    total += proc.usedGpuMemory
        return total
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def pick_free_gpu(taken: set[str]) -> str | None:
    """Index (as text) of the GPU with the most free memory that no other worker has
    taken, for a worker started without CUDA_VISIBLE_DEVICES; None without NVML (then
    CUDA picks)."""
    free = [(str(g["index"]) not in taken, g["free_bytes"], str(g["index"]))
            for g in gpu_inventory(None)]
    return max(free)[2] if free else None


def gpu_inventory(indices: list[int] | None) -> list[dict]:
    """Name, total and free memory of the GPUs with these NVML indices (all when None),
    read with NVML; an empty list without NVML or a driver."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: no GPUs to report
        return []
    try:
        found = []
        count = pynvml.nvmlDeviceGetCount()
        for i in (range(count) if indices is None else [i for i in indices if i < count]):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            info = pynvml.nvmlDeviceGetMemoryInfo(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            found.append({"index": i, "name": name.decode() if isinstance(name, bytes) else name,
                          "total_bytes": int(info.total), "free_bytes": int(info.free)})
        return found
    except pynvml.NVMLError:
        return []
    finally:
        pynvml.nvmlShutdown()
