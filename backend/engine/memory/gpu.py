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
    CUDA context included), or None when NVML cannot say: no NVML or driver, `pid`
    not among the processes the driver lists (inside a container's PID namespace it
    lists host PIDs, so nothing matches os.getpid()), or listed without a figure
    (pynvml gives usedGpuMemory None where the driver does not report it)."""
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: nothing to read
        return None
    try:
        total, found = 0, False
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.pid == pid:
                    if proc.usedGpuMemory is None:
                        return None
                    total, found = total + proc.usedGpuMemory, True
        return total if found else None
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


_baseline: dict[int, int] = {}
"""Used bytes per NVML index when the worker started (see take_device_baseline)."""


def _device_used(indices: list[int] | None) -> dict[int, int] | None:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:  # noqa: BLE001 - ImportError or NVMLError: nothing to read
        return None
    try:
        count = pynvml.nvmlDeviceGetCount()
        return {i: int(pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(i)).used)
                for i in (range(count) if indices is None else indices) if i < count}
    except pynvml.NVMLError:
        return None
    finally:
        pynvml.nvmlShutdown()


def take_device_baseline(indices: list[int] | None) -> None:
    """Note the memory used on these GPUs (NVML indices; all when None) now, before
    this worker loads anything: the fallback reading when NVML cannot tell this
    process's own use (see `device_used_since_baseline`)."""
    _baseline.clear()
    _baseline.update(_device_used(indices) or {})


def device_used_since_baseline() -> int | None:
    """Bytes used on the baseline's GPUs beyond what was used when it was taken: this
    worker's use, plus whatever other processes on those GPUs started since. None
    without a baseline or NVML."""
    if not _baseline:
        return None
    now = _device_used(list(_baseline))
    if now is None:
        return None
    return sum(max(0, now[i] - base) for i, base in _baseline.items() if i in now)


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
